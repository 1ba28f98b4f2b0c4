"""Shortcut checks (skinscan.shortcuts): pasting the sources' marks, and the counterfactual on the default
model: a logo, text, ruler, vignette or ink circle pasted onto held-out benign photos must not move the
median photo's probability by 0.02 or more."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from skinscan.data import Record, load_dataset
from skinscan.errors import SkinscanError
from skinscan.predict import Prediction
from skinscan.preprocess import PreprocessSpec
from skinscan.shortcuts import (
    CONTROLS,
    PLACEMENTS,
    Placement,
    held_out,
    load_stamps,
    paste_stamp,
    perturbation_effects,
    spread,
    stamp_effects,
)
from skinscan.stamps import build_stamps, vignette

MAX_MEDIAN_CHANGE = 0.02  # issue 16: the bar for every stamp (median |change| of the probability)
ISIC_MVB_PHOTOS = 60  # isic-mvb test benign photos, spread evenly
PHOTOS_PER_SOURCE = 15  # benign photos of every other held-out source


@pytest.fixture(scope="module")
def stamps(data_root: Path, clinical_atlas, isic_archive_more, pad_ufes) -> dict[str, Image.Image]:
    """The stamps, cut from the datasets' photos (skinscan.stamps)."""
    return build_stamps(data_root)


def _square(colour: tuple[int, ...], size: tuple[int, int] = (10, 10)) -> Image.Image:
    return Image.new("RGBA", size, colour)


def _grey(size: tuple[int, int] = (100, 80), value: int = 128) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


# ------------------------------------------------------------------------------------------ paste_stamp
@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("size", [(100, 80), (60, 90), (224, 224)])
@pytest.mark.data
def test_paste_keeps_the_photo_size_and_leaves_the_input_unchanged(stamps, name, size):
    photo = _grey(size)
    before = photo.tobytes()
    out = paste_stamp(photo, stamps[name], name)
    assert out.size == size and out.mode == "RGB"
    assert photo.tobytes() == before
    assert out.tobytes() != before  # every stamp shows on a plain grey photo


def test_corner_stamp_lands_at_the_bottom_left_scaled_to_the_shorter_side():
    where = Placement("bottom-left", width=0.25, margin=(0.1, 0.1))
    out = np.array(paste_stamp(_grey((100, 80), 0), _square((255, 255, 255, 255)), where))
    # shorter side 80: a 20x20 stamp, 8 px from the left edge and from the bottom
    assert (out[52:72, 8:28] == 255).all()
    out[52:72, 8:28] = 0
    assert (out == 0).all()


def test_bottom_stamp_spans_the_width_and_centre_stamp_sits_in_the_middle():
    bottom = np.asarray(paste_stamp(_grey((100, 80), 0), _square((255, 255, 255, 255), (40, 4)), Placement("bottom")))
    assert (bottom[70:] == 255).all() and (bottom[:70] == 0).all()  # 40x4 -> 100x10 along the bottom edge
    centre = np.asarray(paste_stamp(_grey((100, 80), 0), _square((255, 255, 255, 255)), Placement("centre", width=0.5)))
    ys, xs = np.nonzero(centre[..., 0])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 59, 30, 69)  # 40x40 in the middle


def test_over_paints_with_alpha_and_multiply_darkens_by_the_stamp_colour():
    half_white = _square((255, 255, 255, 128), (100, 80))
    over = np.asarray(paste_stamp(_grey(value=100), half_white, Placement("fill")))
    assert np.allclose(over, 100 + (255 - 100) * 128 / 255, atol=1)
    white = np.asarray(paste_stamp(_grey(value=100), half_white, Placement("fill", blend="multiply")))
    assert (white == 100).all()  # a white filter absorbs nothing
    half_black = _square((0, 0, 0, 128), (100, 80))
    dark = np.asarray(paste_stamp(_grey(value=100), half_black, Placement("fill", blend="multiply")))
    assert np.allclose(dark, 100 * (1 - 128 / 255), atol=1)


def test_vignette_darkens_the_corners_not_the_centre():
    for size in ((224, 224), (288, 216)):
        out = np.asarray(paste_stamp(_grey(size, 180), vignette(), "vignette")).astype(int)
        h, w = out.shape[:2]
        for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
            assert out[y, x].max() < 20, (size, y, x)
        assert (out[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] == 180).all()


@pytest.mark.data
def test_real_stamps_show_where_their_source_puts_them(stamps):
    assert set(stamps) == set(PLACEMENTS)
    assert all(s.mode == "RGBA" for s in stamps.values())
    photo = _grey((288, 216), 100)
    grey = np.asarray(photo).astype(int)

    def changed(name: str) -> np.ndarray:
        return np.abs(np.asarray(paste_stamp(photo, stamps[name], name)).astype(int) - grey).max(-1) > 20

    for corner_mark in ("dermnet-logo", "sfs-text"):
        ys, xs = np.nonzero(changed(corner_mark))
        assert ys.min() > 216 * 0.6 and xs.max() < 288 * 0.35, corner_mark  # bottom left only
    ys, _ = np.nonzero(changed("ruler"))
    assert ys.min() > 216 * 0.85  # along the bottom edge
    ink = changed("ink-circle")
    ys, xs = np.nonzero(ink)
    assert abs(ys.mean() - 108) < 15 and abs(xs.mean() - 144) < 15  # a ring around the centre...
    assert not ink[98:118, 134:154].any()  # ...with the lesion's place left clear


# ------------------------------------------------------------------------------- counterfactual augmentation
@pytest.mark.data
def test_stamp_augmentation_pastes_every_mark_at_random_and_only_at_its_share(stamps):
    from skinscan.augment import build_augment
    from skinscan.shortcuts import random_stamp

    px = np.full((224, 224, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    seen = {name: 0 for name in stamps}
    for _ in range(60):
        out = random_stamp(px, stamps, rng)
        assert out.shape == px.shape and out.dtype == np.uint8 and (out != px).any()
        changed = (out != px).any(axis=2)
        # which mark: the vignette shades the corners, the ruler the bottom edge only, the ink the middle
        if changed[0, 0] and changed[0, -1]:
            seen["vignette"] += 1
        elif changed[-1].all() and not changed[:150].any():
            seen["ruler"] += 1
        elif changed[112, 40:184].any() and not changed[-1, :].all():
            seen["ink-circle"] += 1
        else:
            seen["dermnet-logo" if changed.sum() > 1500 else "sfs-text"] += 1
    assert all(n > 0 for n in seen.values()), seen  # every mark is drawn
    aug = build_augment("none", 224, stamps, stamp_p=0.3)
    share = np.mean([(aug(px, rng) != px).any() for _ in range(400)])
    assert 0.22 < share < 0.38  # about stamp_p of the draws, whatever their label
    assert (build_augment("none", 224, stamps, stamp_p=0.0)(px, rng) == px).all()
    with pytest.raises(ValueError, match="needs the stamps"):
        build_augment("none", 224, None, stamp_p=0.5)


def test_a_marked_draw_and_its_clean_twin_differ_by_the_mark_alone():
    """stamp_consistency compares a marked draw with its twin: the same photo through the same augmentation
    draw, without the mark; asking for twins never changes the draws themselves."""
    from skinscan.augment import build_augment

    px = (np.random.default_rng(1).random((256, 256, 3)) * 255).astype(np.uint8)
    clear = {name: Image.new("RGBA", (64, 64), (0, 0, 0, 0)) for name in PLACEMENTS}
    aug = build_augment("phone", 224, clear, stamp_p=1.0)
    for i in range(12):  # an invisible mark: the twin is the very same crop, flip, colour and noise
        marked, twin = aug.pair(px, np.random.default_rng(i))
        assert twin is not None and marked.shape == (224, 224, 3) and (marked == twin).all()
    solid = {name: Image.new("RGBA", (64, 64), (255, 0, 255, 255)) for name in PLACEMENTS}
    marked, twin = build_augment("none", 224, solid, stamp_p=1.0).pair(px, np.random.default_rng(0))
    assert (twin == px).all() and (marked != px).any()  # the twin is the photo, the draw carries the mark
    aug = build_augment("phone", 224, solid, stamp_p=0.3)
    pairs = [aug.pair(px, np.random.default_rng(i)) for i in range(40)]
    assert all((aug(px, np.random.default_rng(i)) == pairs[i][0]).all() for i in range(40))
    has_twin = [t is not None for _, t in pairs]
    assert 0 < sum(has_twin) < 40  # only the marked draws have one
    for marked, twin in (p for p, h in zip(pairs, has_twin, strict=True) if h):
        assert (marked != twin).any()


def test_the_penalty_compares_each_marked_draw_with_its_own_twin_and_reaches_both():
    torch = pytest.importorskip("torch", reason="needs the train extra")
    from skinscan.model import LesionNet
    from skinscan.train import _forward_with_twins

    torch.manual_seed(0)
    model = LesionNet(dropout=0.0, pretrained=False, image_size=64, n_diagnoses=10).train()
    params = model.backbone._global_params  # no stochastic depth: a twin's pass is then the draw's own
    model.backbone._global_params = params._replace(drop_connect_rate=0.0)
    x = torch.randn(4, 3, 64, 64)
    has_twin = torch.tensor([True, False, True, False])
    twins = torch.where(has_twin[:, None, None, None], x, torch.zeros_like(x))
    logits, diag_logits, shift = _forward_with_twins(model, x, twins, has_twin)
    assert logits.shape == (4,) and diag_logits.shape == (4, 10) and shift.shape == (2,)
    assert torch.allclose(shift, torch.zeros(2), atol=1e-4)  # an unmarked twin is the draw itself
    twins = twins.clone()
    twins[2, :, :16, :16] += 3.0  # a mark on the second marked draw's twin only
    twins.requires_grad_(True)
    _, _, shift = _forward_with_twins(model, x, twins, has_twin)
    assert abs(shift[0]) < 1e-4 < abs(shift[1])
    (grad,) = torch.autograd.grad((shift**2).sum(), [twins])
    assert grad[2].abs().sum() > 0 and grad[[1, 3]].abs().sum() == 0  # the twin's side too; unmarked draws have none
    logits, diag_logits, shift = _forward_with_twins(model, x, twins, torch.zeros(4, dtype=torch.bool))
    assert shift is None and logits.shape == (4,)


def test_stamp_consistency_needs_the_marks():
    from skinscan.config import load_config
    from skinscan.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^invalid setting: stamp_consistency needs stamp_augment > 0"):
        load_config(overrides={"stamp_consistency": 1.0})
    assert load_config(overrides={"stamp_consistency": 1.0, "stamp_augment": 0.3}).stamp_consistency == 1.0


@pytest.mark.data
@pytest.mark.slow
def test_training_with_stamp_consistency_records_how_far_the_marks_moved_the_logit(tmp_path, isic_mvb, stamps):
    pytest.importorskip("torch", reason="needs the train extra")
    import csv

    from skinscan.config import load_config
    from skinscan.train import train

    overrides = {"data": str(isic_mvb), "limit": 48, "epochs": 1, "batch_size": 16, "threads": 2}
    cfg = load_config(overrides={**overrides, "stamp_augment": 0.5, "stamp_consistency": 1.0})
    train(cfg, tmp_path / "run", progress=False)
    (row,) = csv.DictReader((tmp_path / "run" / "history.csv").open())
    assert np.isfinite(float(row["mark_shift_mean"])) and float(row["mark_shift_median_abs"]) > 0
    # with progressive resizing the clean twins shrink with their marked draws (one pass holds both)
    cfg = load_config(overrides={**cfg.model_dump(), "epochs": 2, "small_size": 128, "small_epochs": 1})
    train(cfg, tmp_path / "small", progress=False)
    rows = list(csv.DictReader((tmp_path / "small" / "history.csv").open()))
    assert [r["train_size"] for r in rows] == ["128", "224"]
    assert all(float(r["mark_shift_median_abs"]) > 0 for r in rows)


def test_stamp_augmentation_without_the_datasets_is_a_clear_config_error(tmp_path):
    pytest.importorskip("torch", reason="needs the train extra")
    from skinscan.config import load_config
    from skinscan.errors import ConfigError
    from skinscan.train import _stamps

    assert _stamps(load_config(overrides={"data": str(tmp_path / "x")})) is None  # off by default
    cfg = load_config(overrides={"data": str(tmp_path / "x"), "stamp_augment": 0.3})
    with pytest.raises(ConfigError, match="stamps_from"):
        _stamps(cfg)


def test_load_stamps_reads_a_folder_and_names_what_is_missing(tmp_path):
    vignette().save(tmp_path / "vignette.png")
    assert load_stamps(tmp_path, ["vignette"])["vignette"].tobytes() == vignette().tobytes()
    with pytest.raises(SkinscanError, match="unknown stamp 'logo'"):
        load_stamps(tmp_path, ["logo"])
    with pytest.raises(SkinscanError, match=r"ruler\.png not found.*build_stamps"):
        load_stamps(tmp_path, ["ruler"])
    with pytest.raises(SkinscanError, match="missing there"):
        build_stamps(tmp_path)


# --------------------------------------------------------------------------- stamp_effects (stub model)
class _DarknessModel:
    """Stands in for a Predictor: probability = the photo's darkness, refer at 0.5."""

    spec = PreprocessSpec(size=32)

    def predict(self, images, *, batch_size=32, force=False):
        assert force  # the check scores every photo, retakes included
        out = []
        for img in images:
            p = 1.0 - float(np.asarray(img, dtype=float).mean()) / 255.0
            out.append(Prediction(None, p, "refer" if p >= 0.5 else "monitor", 0.5))
        return out


def test_stamp_effects_summarises_each_stamp_and_skips_photos_that_carry_it():
    photos = [_grey((40, 40), v) for v in (140, 135, 250, 20)]
    stamps = {"vignette": vignette(), "dermnet-logo": _square((255, 255, 255, 255))}
    report = stamp_effects(_DarknessModel(), photos, stamps, sources=["a", "dermnet-nz", "b", "c"])
    assert report.baseline == pytest.approx([1 - v / 255 for v in (140, 135, 250, 20)])
    assert [e.stamp for e in report.effects] == ["vignette", "dermnet-logo"]
    dark, logo = report["vignette"], report["dermnet-logo"]
    assert dark.n == 4 and logo.n == 3  # the DermNet photo already has the logo
    assert dark.mean_change > 0 and logo.mean_change < 0  # darker corners push up, a white logo down
    assert dark.flipped == pytest.approx(0.5)  # the two photos just under 0.5 cross it
    assert 0 < dark.median_abs_change <= dark.p90_abs_change
    with pytest.raises(KeyError, match="no stamp 'ruler'"):
        report["ruler"]
    dermnet = report.for_source("dermnet-nz")
    assert dermnet["vignette"].n == 1 and dermnet["dermnet-logo"].n == 0
    assert dermnet["dermnet-logo"].to_dict()["median_abs_change"] is None  # JSON has no NaN
    assert dermnet.baseline == pytest.approx([1 - 135 / 255])


def test_stamp_effects_pastes_inside_the_square_the_model_sees():
    # a landscape photo: the model sees its centre square, so the corner mark goes in that square's corner
    seen = []

    class Recorder(_DarknessModel):
        def predict(self, images, **kw):
            seen.extend(images)
            return super().predict(images, **kw)

    report = stamp_effects(Recorder(), [_grey((120, 40), 100)], {"sfs-text": _square((255, 255, 255, 255))})
    assert [img.size for img in seen] == [(32, 32), (32, 32)]
    assert report["sfs-text"].mean_change < 0  # the white mark is in view


def test_stamp_effects_refuses_what_it_cannot_check():
    stamps = {"sfs-text": _square((255, 255, 255, 255))}
    with pytest.raises(SkinscanError, match="no photos"):
        stamp_effects(_DarknessModel(), [], stamps)
    with pytest.raises(SkinscanError, match="one source per photo"):
        stamp_effects(_DarknessModel(), [_grey()], stamps, sources=[])
    with pytest.raises(SkinscanError, match="pasted on no photo"):
        stamp_effects(_DarknessModel(), [_grey()], stamps, sources=["fitzpatrick17k"])
    with pytest.raises(SkinscanError, match="no placement"):
        stamp_effects(_DarknessModel(), [_grey()], {"sticker": _square((0, 0, 0, 255))})


def test_perturbation_effects_measures_changes_that_carry_no_mark():
    """The controls: a model that reads only the left half moves under the mirror and not under a 4-px shift
    (the left half stays dark); a uniform photo moves under none; every change keeps the square's size."""
    seen = []

    class LeftHalf(_DarknessModel):
        def predict(self, images, **kw):
            seen.extend(images)
            out = []
            for img in images:
                p = 1.0 - float(np.asarray(img, dtype=float)[:, :16].mean()) / 255.0
                out.append(Prediction(None, p, "refer" if p >= 0.5 else "monitor", 0.5))
            return out

    pixels = np.concatenate([np.full((32, 16, 3), 20, np.uint8), np.full((32, 16, 3), 230, np.uint8)], axis=1)
    report = perturbation_effects(LeftHalf(), [Image.fromarray(pixels), _grey((48, 32), 128)], sources=["a", "b"])
    assert report.stamps == tuple(CONTROLS) == ("mirror", "shift-4px", "jpeg-q90")
    assert {img.size for img in seen} == {(32, 32)}
    half = report.for_source("a")
    assert half["mirror"].mean_change == pytest.approx(-(230 - 20) / 255) and half["mirror"].flipped == 1.0
    assert half["shift-4px"].median_abs_change == pytest.approx(0.0)
    assert half["jpeg-q90"].median_abs_change < 0.01  # JPEG keeps each 8x8 block's mean
    uniform = report.for_source("b")
    assert all(uniform[name].median_abs_change < 0.005 for name in CONTROLS)
    # the JPEG copy of a textured photo differs from it, a little
    noise = Image.fromarray(np.random.default_rng(0).integers(60, 200, (32, 32, 3), dtype=np.uint8))
    seen.clear()
    perturbation_effects(LeftHalf(), [noise], {"jpeg-q90": CONTROLS["jpeg-q90"]})
    diff = np.abs(np.asarray(seen[1], dtype=int) - np.asarray(seen[0], dtype=int))
    assert 0 < diff.mean() < 30


# --------------------------------------------------------------------------------------------- held_out
def _rec(source: str, key: str, split: str | None = None, group: str | None = None) -> Record:
    return Record(Path(key), 0, source, key, split=split, group=group or key, dataset=source)


def _card(**data) -> SimpleNamespace:
    return SimpleNamespace(model_extra={"training": {"data": data}})


def test_held_out_keeps_test_splits_unseen_sources_and_validation_photos():
    records = [
        _rec("isic-mvb", "train/benign/1.jpg", "train", "dup:7"),
        _rec("isic-mvb", "test/benign/1.jpg", "test", "dup:7"),  # a near-copy of a trained photo
        _rec("isic-mvb", "test/benign/2.jpg", "test"),
        _rec("pad-ufes-20-phone", "images/a.jpg", group="patient:1"),
        _rec("pad-ufes-20-phone", "images/b.jpg", group="patient:2"),
        _rec("dermnet-nz", "images/c.jpg"),
    ]
    card = _card(per_source={"isic-mvb": 1, "pad-ufes-20-phone": 2}, val_keys=["pad-ufes-20-phone/images/b.jpg"])
    assert [r.key for r in held_out(records, card)] == ["test/benign/2.jpg", "images/b.jpg", "images/c.jpg"]
    # a card that lists no sources: only test splits count as held out (unknown is not unseen)
    assert [r.key for r in held_out(records, _card())] == ["test/benign/2.jpg"]


def test_spread_picks_evenly():
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread([1, 2], 5) == [1, 2]


# ------------------------------------------------------------------------- the default model (real data)
@pytest.fixture(scope="module")
def default_report(isic_mvb, pad_ufes, clinical_atlas, predictor, stamps):
    """The default model on held-out benign photos: isic-mvb's test split (no bundled model trained on it),
    and the phone set's and the atlases' benign photos that the card lists as validation (`val_keys`) or
    whose source it never trained on."""
    records = [r for path in (isic_mvb, pad_ufes, clinical_atlas) for r in load_dataset(path)]
    benign = [r for r in held_out(records, predictor.card) if r.label == 0]
    photos: list[Record] = []
    for source in sorted({r.source for r in benign}):
        mine = sorted((r for r in benign if r.source == source), key=lambda r: r.key)
        photos += spread(mine, ISIC_MVB_PHOTOS if source == "isic-mvb" else PHOTOS_PER_SOURCE)
    assert sum(r.source == "isic-mvb" for r in photos) == ISIC_MVB_PHOTOS
    return stamp_effects(predictor, [r.path for r in photos], stamps, sources=[r.source for r in photos])


# Measured on the default model 2026.12.07-sources (benchmarks/results/shortcuts-default, 477-577 held-out
# benign photos), trained with the marks pasted on at random (stamp_augment 0.3): the DermNet logo (0.044 on
# 2026.12.03-sources) and "SFS" pass; the three below still move it by more than the bar. Known failures, left
# visible, not a looser bar. strict: a model that passes turns these red until the marks are taken off this list.
KNOWN_SHORTCUTS = {
    "ruler": "median |change| 0.038 on 577 photos (2026.12.03-sources: 0.038)",
    "ink-circle": "median |change| 0.053 on 577 photos (2026.12.03-sources: 0.073, raising it by +0.045 on average)",
    "vignette": "median |change| 0.064 on 577 photos, raises it (mean +0.049; 2026.12.03-sources: 0.158, +0.18)",
}


@pytest.mark.data
@pytest.mark.parametrize(
    "stamp",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_SHORTCUTS[name]))
        if name in KNOWN_SHORTCUTS
        else name
        for name in PLACEMENTS
    ],
)
def test_a_stamp_does_not_move_the_default_model_on_held_out_benign_photos(default_report, stamp):
    e = default_report[stamp]
    assert e.median_abs_change < MAX_MEDIAN_CHANGE, (
        f"{stamp} moves the default model's probability by a median {e.median_abs_change:.4f} on {e.n} held-out "
        f"benign photos (mean {e.mean_change:+.4f}, p90 {e.p90_abs_change:.4f}, decisions flipped {e.flipped:.1%}): "
        "the model responds to the mark, not only to the lesion"
    )


def test_the_tradeoff_plot_draws_the_committed_results_and_names_the_shipped_default(tmp_path):
    """benchmarks/plot_shortcuts_tradeoff.py reads what bench_shortcuts.py and bench_sources.py wrote: each run's
    mean AUC is the mean over its units, its marks are the benchmark's, and the run it calls shipped is the
    bundled default (a new default left with stale results turns this red)."""
    import json
    import subprocess
    import sys

    from skinscan.predict import Predictor

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "plot_shortcuts_tradeoff.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    runs = json.loads((tmp_path / "tradeoff.json").read_text())
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000 and "| largest |" in (
        tmp_path / "tradeoff.md"
    ).read_text()
    for run in runs:
        assert run["mean_auc"] == pytest.approx(np.mean(list(run["auc"].values())))
        assert set(run["median_abs_change"]) == set(PLACEMENTS)
    shipped = [r for r in runs if "shipped" in r["label"]]
    assert len(shipped) == 1 and shipped[0]["model"] == Predictor().card.version
    default_marks = json.loads((root / "benchmarks/results/shortcuts-default/shortcuts.json").read_text())
    assert shipped[0]["median_abs_change"]["vignette"] == next(
        e["median_abs_change"] for e in default_marks["all"]["effects"] if e["stamp"] == "vignette"
    )
    # a folder that holds no results is a plain error, not a traceback
    missing = subprocess.run(
        [
            sys.executable,
            str(script),
            "--out",
            str(tmp_path / "x"),
            "--run",
            "gone",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "error: gone: no results at" in missing.stderr
    assert "Traceback" not in missing.stderr
