"""The quality gate per held-out source (`skinscan.loso.gate_loso`, measured by
benchmarks/bench_gate_sources.py), on a small real subset embedded by the default model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skinscan import loso
from skinscan.data import Record, load_dataset
from skinscan.errors import SkinscanError
from skinscan.export import _picture
from skinscan.loso import SKIN_TYPE_GROUPS, GateInputs
from skinscan.predict import Predictor
from skinscan.quality import CARD_SECTION, NOT_A_LESION, QualityGate

NONLESION = Path(__file__).resolve().parents[1] / "tests" / "assets" / "nonlesion"
HELD_OUT = "fitzpatrick17k"  # the source that records skin types


def _embed(predictor: Predictor, paths: list[Path]) -> tuple[GateInputs, np.ndarray]:
    """What the gate reads, as the Predictor serves it; and the model's pixels (for the gate's own measures)."""
    decoded = [predictor.decode(p) for p in paths]
    assert all(d.error is None for d in decoded)
    embeddings = np.concatenate(
        [predictor.run(np.stack([d.image for d in decoded[i : i + 32]]))["embedding"] for i in range(0, len(paths), 32)]
    )
    inputs = GateInputs(embeddings, [d.measures for d in decoded], [d.shorter_side for d in decoded])
    return inputs, np.stack([d.pixels for d in decoded])


@pytest.fixture(scope="module")
def subset(data_root: Path, isic_mvb: Path, pad_ufes: Path, predictor: Predictor) -> dict:
    if not (data_root / "clinical-atlas" / "labels.csv").is_file():
        pytest.skip(f"{data_root / 'clinical-atlas'} not found")
    atlas = [r for r in load_dataset(data_root / "clinical-atlas") if r.source == HELD_OUT]
    held: list[Record] = []
    for group in ("I-II", "III-IV", "V-VI", None):  # 8 photos per skin-type group, 4 without a skin type
        held += [r for r in atlas if SKIN_TYPE_GROUPS.get(r.skin_type) == group][: 8 if group else 4]
    # at least 100 photos stay for the fit without HELD_OUT (fit_quality_gate's minimum for 5 folds)
    records = load_dataset(isic_mvb, split="test")[::15] + load_dataset(pad_ufes)[::10] + held
    tune = sorted((NONLESION / "tune").glob("*.jpg"))[::3]
    holdout = sorted((NONLESION / "holdout").glob("*.jpg"))[::8]
    inputs, pixels = _embed(predictor, [r.path for r in records])
    return {
        "records": records,
        "inputs": inputs,
        "pixels": pixels,
        "tune": _embed(predictor, tune)[0],
        "tune_groups": [_picture(p) for p in tune],
        "holdout": _embed(predictor, holdout)[0],
    }


@pytest.mark.data
def test_held_out_source_never_reaches_the_fit_and_refusals_are_per_group(subset: dict, monkeypatch) -> None:
    records, inputs = subset["records"], subset["inputs"]
    fits: list[tuple[np.ndarray, dict, dict]] = []
    real_fit = loso.fit_quality_gate

    def spy(train_embeddings, nonlesion_embeddings, **kwargs):
        section = real_fit(train_embeddings, nonlesion_embeddings, **kwargs)
        fits.append((np.array(train_embeddings), kwargs, section))
        return section

    monkeypatch.setattr(loso, "fit_quality_gate", spy)
    result = loso.gate_loso(records, inputs, subset["tune"], subset["tune_groups"], subset["holdout"], units=[HELD_OUT])

    # The fit without the source: exactly the other sources' rows, none of the held-out source's photos.
    assert len(fits) == 2  # without HELD_OUT, then on every source (outer_folds=0: no other fit)
    (without, kwargs, section), (everything, kwargs_all, _) = fits
    is_held = np.array([r.source == HELD_OUT for r in records])
    fitted_rows = {row.tobytes() for row in without}
    assert not any(row.tobytes() in fitted_rows for row in inputs.embeddings[is_held])
    assert len(without) == (~is_held).sum() and np.array_equal(without, inputs.embeddings[~is_held])
    assert set(kwargs["train_sources"]) == {"isic-mvb", "pad-ufes-20-phone"}
    assert kwargs["train_groups"] == [f"{r.source}/{r.group}" for r in records if r.source != HELD_OUT]
    assert len(everything) == len(records) and HELD_OUT in kwargs_all["train_sources"]

    # Refusals per skin-type group: the held-out photos of each group (those without a skin type in none),
    # judged by that gate, here with the gate's own numpy pixel measures of the model's pixels.
    entry = result["held_out"][HELD_OUT]
    assert entry["n"] == is_held.sum() == 28
    gate = QualityGate.from_card({CARD_SECTION: section}, ["embedding"])
    ix = np.flatnonzero(is_held)
    reports = gate.check(subset["pixels"][ix], [inputs.shorter_sides[i] for i in ix], inputs.embeddings[ix])
    refused = np.array([not r.ok for r in reports])
    not_lesion = np.array([NOT_A_LESION in r.problems for r in reports])
    groups = np.array([SKIN_TYPE_GROUPS.get(records[i].skin_type, "") for i in ix])
    assert set(entry["by_skin_type_group"]) == {"I-II", "III-IV", "V-VI"}
    for g, figures in entry["by_skin_type_group"].items():
        assert figures["refused"]["n"] == (groups == g).sum() == 8
        assert figures["refused"]["k"] == refused[groups == g].sum()
        assert figures["not_a_lesion"]["k"] == not_lesion[groups == g].sum()
        lo, hi = figures["refused"]["ci95"]
        assert lo <= figures["refused"]["share"] <= hi
    assert entry["refused"]["k"] == refused.sum() and entry["not_a_lesion"]["k"] == not_lesion.sum()
    assert entry["nonlesion_holdout"]["flagged"]["k"] == loso.gate_refusals(gate, subset["holdout"])[0].sum()

    # The gate on every source: in-sample figures for every source, the phone set's by its skin types.
    shipped = result["all_sources"]["in_sample"]
    assert set(shipped) == {"isic-mvb", "pad-ufes-20-phone", HELD_OUT}
    assert sum(f["n"] for f in shipped.values()) == len(records)
    assert "by_skin_type_group" in shipped["pad-ufes-20-phone"] and "by_skin_type_group" not in shipped["isic-mvb"]
    assert "cross_fitted" not in result["all_sources"]


@pytest.mark.data
def test_a_source_to_hold_out_must_exist(subset: dict) -> None:
    with pytest.raises(SkinscanError, match="no record of source 'dermnet-nz'"):
        loso.fit_gate(subset["records"], subset["inputs"], subset["tune"], subset["tune_groups"], without="dermnet-nz")


def test_gate_inputs_need_one_of_each_per_picture() -> None:
    with pytest.raises(ValueError, match="one of each per picture"):
        GateInputs(np.zeros((3, 4)), [{}] * 3, [None] * 2)
    inputs = GateInputs(np.arange(12.0).reshape(3, 4), [{"a": 1.0}, {"a": 2.0}, {"a": 3.0}], [100, None, 300])
    taken = inputs.take([2, 0])
    assert len(taken) == 2 and taken.shorter_sides == [300, 100] and taken.embeddings[0, 0] == 8.0
