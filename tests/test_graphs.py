"""The graphs around the network (skinscan.graphs) against the NumPy/Pillow code they mirror, on real photos:
the server and the web page run the graphs; training and fitting run the NumPy code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinscan.explain import influence
from skinscan.graphs import MEASURES, PROBLEM_ORDER, prepare_graph
from skinscan.preprocess import DECODE_SIDE_FACTOR, decode_image, load_pixels, normalise, resize_for_model
from skinscan.quality import pixel_measures

REPO = Path(__file__).resolve().parents[1]


def _photos(isic_mvb: Path, pad_ufes: Path, n: int = 24) -> list[Path]:
    archive = sorted((isic_mvb / "test").glob("*/*.jpg"))[
        :: max(1, len(list((isic_mvb / "test").glob("*/*.jpg"))) // n)
    ][:n]
    phone = sorted((pad_ufes / "images").glob("*.jpg"))[::37][:n]
    return [*archive, *phone, *sorted((REPO / "examples").glob("*.jpg"))]


@pytest.fixture(scope="module")
def photos(isic_mvb: Path, pad_ufes: Path) -> list[Path]:
    return _photos(isic_mvb, pad_ufes)


def _before(predictor, img: Image.Image):
    return predictor._before.run(None, {"pixels": np.asarray(img, dtype=np.uint8)})


@pytest.mark.data
def test_before_graph_matches_pillow_and_numpy(predictor, photos) -> None:
    spec = predictor.spec
    odd = [Image.open(photos[-1]).convert("RGB").resize(s, Image.BICUBIC) for s in ((901, 333), (250, 640), (224, 224))]
    for img in [decode_image(p, min_side=DECODE_SIDE_FACTOR * spec.size) for p in photos] + odd:
        image, square, measures = _before(predictor, img)
        ref = resize_for_model(img, spec).astype(int)
        diff = np.abs(square.astype(int) - ref)
        # ONNX Runtime's antialiased bilinear resize is Pillow's up to rounding: a few levels here and there
        # (measured on 118 phone photos of up to 4 x 224 px: at most 8 levels, on at most 0.5% of the pixels)
        assert diff.max() <= 10 and (diff > 1).mean() < 0.01, (img.size, diff.max(), (diff > 1).mean())
        np.testing.assert_allclose(image[0], normalise(square, spec), atol=2e-5)
        expected = pixel_measures(square)
        np.testing.assert_allclose(measures, [expected[k] for k in MEASURES], rtol=1e-4, atol=1e-4)


@pytest.mark.data
def test_before_graph_masks_as_normalise_does(predictor, photos) -> None:
    import onnxruntime as ort

    spec = replace(predictor.spec, mask="disc")
    session = ort.InferenceSession(prepare_graph(spec).SerializeToString(), providers=["CPUExecutionProvider"])
    for path in photos[::4]:
        image, square, measures = session.run(None, {"pixels": load_pixels(path, spec)})
        np.testing.assert_allclose(image[0], normalise(square, spec), atol=2e-5)
        assert np.all(image[0][:, 0, 0] == image[0][:, -1, -1])  # the corners are black on every photo
        # the quality gate still measures the whole square
        np.testing.assert_allclose(measures, [pixel_measures(square)[k] for k in MEASURES], rtol=1e-4, atol=1e-4)


@pytest.mark.data
def test_after_graph_matches_numpy(predictor, photos) -> None:
    squares = np.stack([_before(predictor, decode_image(p, min_side=DECODE_SIDE_FACTOR * 224))[1] for p in photos])
    out = predictor.run(normalise(squares, predictor.spec))
    sides = [400] * (len(photos) - 2) + [100, None]  # two photos judged too small / of unknown size
    measures = np.array([[pixel_measures(s)[k] for k in MEASURES] for s in squares])
    done = predictor.finish(out, sides, measures)

    types = predictor.detect_photo_types(out["embedding"], len(photos))
    assert [("phone" if v else "dermoscopic") for v in done["is_phone"]] == types
    assert {"phone", "dermoscopic"} <= set(types)  # both calibrations are exercised
    np.testing.assert_allclose(done["probability"], predictor.calibrate(out["logit"], types), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(done["threshold"], [predictor.threshold_for(t) for t in types])
    np.testing.assert_allclose(done["ood_score"], predictor.gate.ood.scores(out["embedding"]), rtol=1e-5)
    reports = predictor.gate.check(squares, sides, out["embedding"])
    assert [tuple(c for c, on in zip(PROBLEM_ORDER, row, strict=True) if on) for row in done["problems"]] == [
        r.problems for r in reports
    ]
    assert any(r.problems for r in reports)
    for cam, grid in zip(out["cam"], done["influence"], strict=True):
        np.testing.assert_allclose(grid, influence(cam), atol=1e-6)


@pytest.mark.data
def test_predictor_runs_the_graphs_with_the_same_results(predictor, photos) -> None:
    """The Predictor's results (graphs) against the NumPy path (Pillow resize, normalise, gate.check)."""
    results = predictor.predict(photos, force=True)
    squares = np.stack([load_pixels(p, predictor.spec) for p in photos])
    out = predictor.run(normalise(squares, predictor.spec))
    types = predictor.detect_photo_types(out["embedding"], len(photos))
    reference = predictor.calibrate(out["logit"], types)
    reports = predictor.gate.check(squares, [r.quality_report.shorter_side for r in results], out["embedding"])
    got = np.array([r.probability for r in results])
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-9)
    assert [r.photo_type for r in results] == types
    assert [r.quality for r in results] == [q.verdict for q in reports]
