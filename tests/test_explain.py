"""Heatmaps (skinscan.explain): the maths on small arrays, the overlay's geometry, the service's
`explain=true`, the CLI's `--explain`, and, with a model, that the map lands on the lesion."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from skinscan.cli import main
from skinscan.explain import (
    HEATMAP_LEGEND,
    colorize,
    explain,
    influence,
    model_box,
    overlay,
    smooth_upsample,
    upsample,
)
from skinscan.predict import Predictor
from skinscan.preprocess import load_pixels

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
# Until the bundled model is trained, a barely trained stand-in with the same outputs (see the report):
# `skinscan export /tmp/smoke --out /tmp/web-model`.


def skin_with_lesion(
    size: tuple[int, int], centre: tuple[float, float], radius: float, seed: int, *, skin=(222, 178, 150)
) -> tuple[Image.Image, np.ndarray]:
    """A lighter skin-toned photo with one dark, slightly irregular brown blob; and the blob's mask."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    shade = 1 + 0.08 * (xx / w - 0.5) + 0.05 * (yy / h - 0.5)  # uneven light
    base = np.asarray(skin, dtype=np.float32)[None, None] * shade[..., None]
    base += rng.normal(0, 4, (h, w, 1))  # skin texture
    angle = np.arctan2(yy - centre[1], xx - centre[0])
    wobble = 1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.08 * np.sin(5 * angle + rng.uniform(0, 6.3))
    mask = np.hypot(xx - centre[0], (yy - centre[1]) * rng.uniform(0.8, 1.2)) < radius * wobble
    lesion = np.asarray(rng.choice([(92, 56, 40), (70, 45, 35), (120, 75, 50)]), dtype=np.float32)
    pixels = np.where(mask[..., None], lesion + rng.normal(0, 8, (h, w, 3)), base)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(1.2))
    return img, mask


# ---------------------------------------------------------------- the maths
def test_influence_is_the_distance_from_the_typical_cell_either_way() -> None:
    cam = np.zeros((5, 5))
    cam[1, 1] = -6.0  # strong evidence against malignancy (a benign-looking lesion)
    cam[3, 3] = 3.0  # some evidence for it
    heat = influence(cam)
    assert heat.min() == 0 and heat.max() == 1
    assert heat[1, 1] == 1 and heat[3, 3] == pytest.approx(0.5) and heat[0, 0] == 0
    assert np.allclose(influence(-cam), heat)  # the direction does not matter, the strength does
    assert np.allclose(influence(cam + 100), heat)  # nor does the head's bias
    assert np.allclose(influence(cam * 3), heat)  # relative: per image


def test_a_flat_map_is_drawn_flat_not_magnified() -> None:
    assert not influence(np.full((7, 7), 3.2)).any()
    assert not influence(np.full((7, 7), 3.2) + np.eye(7) * 1e-9).any()


@pytest.mark.parametrize("bad", [np.zeros(7), np.zeros((0, 7)), np.array([[1.0, np.nan]])])
def test_influence_refuses_what_is_not_a_map(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="class activation map"):
        influence(bad)


def test_bilinear_upsampling() -> None:
    grid = np.zeros((7, 7))
    grid[2, 5] = 1.0
    up = upsample(grid, 224, 224)
    assert up.shape == (224, 224)
    assert up.min() >= 0 and up.max() <= 1  # a convex combination: never outside the grid's range
    # the peak lies at that cell's centre (32 px cells)
    assert np.unravel_index(up.argmax(), up.shape) in {(2 * 32 + dy, 5 * 32 + dx) for dy in (15, 16) for dx in (15, 16)}
    # a linear ramp stays linear between cell centres; edges are clamped (constant half a cell)
    ramp = upsample(np.tile(np.arange(7.0), (7, 1)), 70, 7)
    assert np.allclose(np.diff(ramp[0, 5:65]), 0.1)
    assert np.allclose(ramp[0, :5], 0) and np.allclose(ramp[0, 65:], 6)
    # non-square output, and a 1x1 grid
    assert upsample(np.ones((7, 7)), 50, 30).shape == (30, 50)
    assert np.allclose(upsample(np.array([[4.0]]), 5, 3), 4)


def test_colour_map_runs_from_blue_to_red() -> None:
    rgb = colorize(np.array([0.0, 0.25, 0.5, 1.0]))
    assert rgb.shape == (4, 3) and rgb.dtype == np.uint8
    high = rgb[-1].astype(int)
    assert high[0] > 120 and high[2] < 20  # dark red
    assert rgb[1, 2] > 200 and rgb[1, 0] < 60  # a quarter of the way: blue
    assert np.array_equal(colorize(np.array([-1.0, 2.0])), colorize(np.array([0.0, 1.0])))  # clipped


# ---------------------------------------------------------------- the overlay's geometry
@pytest.mark.parametrize("size", [(320, 240), (240, 320), (224, 224), (97, 61)])
def test_overlay_has_the_photo_size_and_dims_what_the_model_did_not_see(size: tuple[int, int]) -> None:
    photo = Image.new("RGB", size, (200, 160, 140))
    cam = np.zeros((7, 7))
    cam[3, 3] = 5.0
    out = overlay(photo, cam)
    assert out.size == size and out.mode == "RGB"
    left, top, right, bottom = model_box(*size)
    assert right - left == bottom - top == min(size)
    pixels = np.asarray(out).astype(int)
    centre = pixels[(top + bottom) // 2, (left + right) // 2]
    assert centre[0] > centre[2] + 40  # the hot cell: red over the photo
    if size[0] != size[1]:  # the strips outside the centre square are greyed, not coloured
        outside = pixels[0, 0] if left > 0 or top > 0 else None
        assert outside is not None
        assert np.allclose(outside, 0.55 * np.array([200, 160, 140]) + 0.45 * 128, atol=1)


def test_overlay_max_side_keeps_the_aspect_ratio() -> None:
    out = overlay(
        Image.new("RGB", (3000, 2000), (180, 140, 120)), np.random.default_rng(0).normal(size=(7, 7)), max_side=1024
    )
    assert out.size == (1024, 683)
    assert overlay(Image.new("RGB", (300, 200)), np.ones((7, 7)), max_side=1024).size == (300, 200)  # never enlarged
    with pytest.raises(ValueError, match="alpha"):
        overlay(Image.new("RGB", (8, 8)), np.ones((7, 7)), alpha=1.5)


def test_a_lone_hot_cell_is_drawn_as_a_smooth_round_spot_and_the_rest_stays_uncoloured() -> None:
    """A small nevus lights one cell: no hard-edged square (bilinear's tent), no tint where nothing swayed
    the estimate (the legend says uncoloured parts swayed it least)."""
    skin = np.array([200, 160, 140])
    cam = np.zeros((7, 7))
    cam[3, 3] = 5.0
    out = np.asarray(overlay(Image.new("RGB", (224, 224), tuple(skin)), cam)).astype(int)
    tint = np.abs(out - skin).sum(axis=2)  # how far each pixel is from the bare photo
    assert tint[112, 112] > 150  # the hot cell is coloured
    assert tint[:20, :20].max() <= 3 and tint[-20:, -20:].max() <= 3  # far away: the photo as it is
    weight = smooth_upsample(influence(cam), 224, 224)
    bilinear = upsample(influence(cam), 224, 224)  # what it was
    # no edges: the smooth map's slope changes gently; bilinear's kinks (the square's edges) jump
    kinks = [np.abs(np.diff(m, 2, axis=1)).max() for m in (weight, bilinear)]
    assert kinks[0] < 0.1 * kinks[1]
    r = 40  # round: as strong at distance r along an axis as along a diagonal
    assert weight[112, 112 + r] == pytest.approx(weight[112 + round(r / 2**0.5), 112 + round(r / 2**0.5)], rel=0.08)
    # bilinear's is a square: its corners reach further than its sides
    assert bilinear[112, 112 + r] < 0.5 * bilinear[112 + round(r / 2**0.5), 112 + round(r / 2**0.5)]


def test_the_heatmap_is_described_one_way_everywhere() -> None:
    from skinscan.cli import build_parser

    page = (Path(__file__).resolve().parents[1] / "src/skinscan/web/index.html").read_text()
    assert " ".join(HEATMAP_LEGEND.split()) in " ".join(page.split()).replace("Coloured", "coloured", 1)
    predict = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions if a.dest == "explain"
    )
    assert HEATMAP_LEGEND in predict.help
    from skinscan.service import PredictResponse

    assert HEATMAP_LEGEND in PredictResponse.model_fields["heatmap_png"].description
    for stale in ("pushed the risk up", "blue marks"):
        assert stale not in page and stale not in predict.help


# ---------------------------------------------------------------- with a model
def test_model_maps_are_exact_and_not_constant(predictor: Predictor) -> None:
    results = predictor.predict(EXAMPLES)
    for r in results:
        assert r.ok and r.cam is not None and r.cam.shape == (7, 7)
        assert r.cam.mean() == pytest.approx(r.logit, abs=1e-3)  # exact for a global-pool + linear head
        assert np.ptp(r.cam) > 1e-3, f"{r.path}: constant map"
        assert np.ptp(influence(r.cam)) == pytest.approx(1.0)


def test_explain_matches_the_image_size_including_exif_rotation(predictor: Predictor, tmp_path: Path) -> None:
    for path in EXAMPLES[:2]:
        assert explain(path, predictor(path)).size == Image.open(path).size
    img, _ = skin_with_lesion((320, 240), (200, 120), 30, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    # a synthetic blob is no lesion photo for the gated model: force it, the overlay's geometry is under test
    assert explain(path, predictor(path, force=True)).size == (240, 320)
    assert explain(path, predictor(path, force=True), max_side=160).size == (120, 160)


def _otsu(gray: np.ndarray) -> float:
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(np.argmax(between))


def _lesion_mask(pixels: np.ndarray) -> np.ndarray:
    """Dark pixels (Otsu on grey levels), keeping the dark region that holds or is nearest the centre:
    dermoscopy photos also have dark vignetted corners, which are not the lesion."""
    from scipy import ndimage

    gray = np.asarray(Image.fromarray(pixels).convert("L"))
    dark = gray <= _otsu(gray)
    labels, n = ndimage.label(dark)
    if n == 0:
        return dark
    h, w = gray.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - h / 2, xx - w / 2)
    nearest = min(range(1, n + 1), key=lambda k: dist[labels == k].min())
    return labels == nearest


def _peak_rates(predictor: Predictor, images: list, force: bool = False) -> tuple[float, float, int]:
    """(share of images whose heatmap peaks on the lesion, share where it peaks on the outer ring of
    cells, number of images with a map). On the lesion: at least half of the hottest cell's pixels are in
    the lesion mask, measured on exactly the square the model saw. Photos that the quality gate sends
    back for a retake have no map and are not counted, unless `force` (synthetic pictures, which a gate
    fitted on real lesion photos rightly finds unlike them)."""
    on_lesion = on_border = 0
    results = predictor.predict(images, batch_size=16, force=force)
    mapped = [(s, r) for s, r in zip(images, results, strict=True) if r.ok and r.cam is not None]
    assert len(mapped) >= 0.75 * len(images), f"only {len(mapped)} of {len(images)} photos have a map"
    for source, result in mapped:
        pixels = load_pixels(source, predictor.spec)
        mask = _lesion_mask(pixels)
        rows, cols = result.cam.shape
        heat = influence(result.cam)
        i, j = np.unravel_index(np.argmax(heat), heat.shape)
        ch, cw = mask.shape[0] / rows, mask.shape[1] / cols
        cell = mask[round(i * ch) : round((i + 1) * ch), round(j * cw) : round((j + 1) * cw)]
        on_lesion += cell.mean() >= 0.5
        on_border += i in (0, rows - 1) or j in (0, cols - 1)
    return on_lesion / len(mapped), on_border / len(mapped), len(mapped)


def test_map_peaks_on_synthetic_dark_lesions_more_than_on_the_border(predictor: Predictor) -> None:
    rng = np.random.default_rng(7)
    images = []
    for k in range(40):
        w, h = rng.choice([(320, 240), (240, 320), (300, 300)])
        side = min(w, h)
        # somewhere inside the centre square (what the model sees), clear of its outer ring of cells
        cx = (w - side) / 2 + side * rng.uniform(0.3, 0.7)
        cy = (h - side) / 2 + side * rng.uniform(0.3, 0.7)
        skin = tuple(int(c) for c in rng.choice([(232, 196, 172), (222, 178, 150), (198, 150, 118)]))
        img, _ = skin_with_lesion((int(w), int(h)), (cx, cy), side * rng.uniform(0.1, 0.18), seed=k, skin=skin)
        images.append(img)
    on_lesion, on_border, n = _peak_rates(predictor, images, force=True)
    print(f"synthetic: peak on the lesion {on_lesion:.0%}, on the border {on_border:.0%} of {n}")
    # the criterion; the default phone-trained model peaks on 47.5% of these blobs and on the border
    # far less often (real photos: tests below also require >= 50% on the lesion)
    assert on_lesion > on_border


@pytest.mark.data
def test_map_peaks_on_real_lesions_more_than_on_the_border(predictor: Predictor, data_root: Path) -> None:
    folder = data_root / "isic-mvb" / "test"
    if not folder.is_dir():
        pytest.skip(f"{folder}: isic-mvb test split not found")
    paths = []
    for label in ("benign", "malignant"):
        files = sorted((folder / label).glob("*.jpg"))
        paths += files[:: max(1, len(files) // 40)][:40]  # 40 of each, spread over the folder
    on_lesion, on_border, n = _peak_rates(predictor, paths)
    print(f"isic-mvb test: peak on the lesion {on_lesion:.0%}, on the border {on_border:.0%} of {n}")
    assert on_lesion > on_border
    assert on_lesion >= 0.5


# ---------------------------------------------------------------- service and CLI
def test_service_explain_returns_an_overlay_and_the_raw_map(predictor: Predictor) -> None:
    from fastapi.testclient import TestClient

    from skinscan.service import Settings, create_app

    img, _ = skin_with_lesion((400, 300), (200, 150), 40, seed=3)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    jpeg = buf.getvalue()
    with TestClient(create_app(Settings(model=predictor.model_path), predictor=predictor)) as client:
        # a synthetic picture: the gate may call it "not a lesion", so the checks are forced
        plain = client.post("/v1/predict?force=true", content=jpeg, headers={"content-type": "image/jpeg"})
        assert plain.status_code == 200, plain.text
        assert "heatmap_png" not in plain.json() and "heatmap" not in plain.json()
        r = client.post("/v1/predict?explain=true&force=true", files={"file": ("a.jpg", jpeg, "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["probability"] == pytest.approx(plain.json()["probability"], abs=1e-9)
        png = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
        assert png.format == "PNG" and png.size == (400, 300)
        grid = np.array(body["heatmap"])
        assert grid.shape == (7, 7) and np.mean(grid) == pytest.approx(predictor(jpeg, force=True).logit, abs=1e-3)
        assert body["timing_ms"]["explain"] > 0
        big = io.BytesIO()
        img.resize((2400, 1800)).save(big, "JPEG")
        r = client.post("/v1/predict?explain=1&force=1", content=big.getvalue(), headers={"content-type": "image/jpeg"})
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["heatmap_png"]))).size == (1024, 768)
        bad = client.post("/v1/predict?explain=maybe", content=jpeg, headers={"content-type": "image/jpeg"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
        nope = client.post("/v1/predict?explain=true", content=b"not an image", headers={"content-type": "image/png"})
        assert nope.status_code == 422 and nope.json()["error"]["code"] == "invalid_image"


def test_service_explain_without_a_cam_output_says_so(model_path: Path, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from skinscan.service import Settings, create_app

    predictor = Predictor(model_path)  # as if its model had no `cam` output
    predict = predictor.predict_decoded
    monkeypatch.setattr(predictor, "predict_decoded", lambda *a, **k: [replace(p, cam=None) for p in predict(*a, **k)])
    jpeg = EXAMPLES[0].read_bytes()
    with TestClient(create_app(Settings(model=model_path), predictor=predictor)) as client:
        assert client.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 200
        r = client.post("/v1/predict?explain=true", content=jpeg, headers={"content-type": "image/jpeg"})
        assert r.status_code == 501 and r.json()["error"]["code"] == "explain_unavailable"
        assert "re-export" in r.json()["error"]["message"]


def test_cli_predict_explain_writes_overlays(model_path: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    skin_with_lesion((320, 240), (160, 120), 30, seed=1)[0].save(tmp_path / "a" / "mole.jpg")
    skin_with_lesion((240, 320), (120, 160), 30, seed=2)[0].save(tmp_path / "b" / "mole.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "heat"
    rows = tmp_path / "rows.json"
    code = main(
        [
            "predict",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--model",
            str(model_path),
            "--explain",
            str(out),
            "-o",
            str(rows),
            "--force",  # synthetic blobs are no lesion photos for the gated model
            "--format",
            "table",
        ]
    )
    assert code == 3  # broken.jpg could not be read: its row says so
    assert sorted(p.name for p in out.iterdir()) == ["mole-2.heatmap.png", "mole.heatmap.png"]  # names kept apart
    assert Image.open(out / "mole.heatmap.png").size == (320, 240)
    assert Image.open(out / "mole-2.heatmap.png").size == (240, 320)
    by_name = {Path(r["path"]).name: r for r in json.loads(rows.read_text())}
    assert by_name["broken.jpg"]["heatmap"] is None and by_name["mole.png"]["heatmap"].endswith("mole-2.heatmap.png")
    printed = " ".join(capsys.readouterr().out.split())
    assert "heatmap overlays in" in printed and " ".join(HEATMAP_LEGEND.split()) in printed
