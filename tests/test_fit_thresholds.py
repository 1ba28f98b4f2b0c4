"""`skinscan fit-thresholds`: a bundled model's threshold per photo type chosen again on its validation photos
by the rule leave-one-source-out chose (`export.refit_type_thresholds`, `loso.decision_rule`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the train extra")

from skinscan.cli import main
from skinscan.data import load_dataset
from skinscan.errors import SkinscanError
from skinscan.export import refit_type_thresholds
from skinscan.loso import MIN_CANCERS_FOR_THRESHOLD
from skinscan.phototype import SOURCE_PHOTO_TYPE
from skinscan.predict import Predictor


def _copy(model: Path, to: Path) -> Path:
    for suffix in (".onnx", ".card.json"):
        shutil.copy(model.with_suffix("").with_suffix(suffix), to.with_suffix("").with_suffix(suffix))
    return to


@pytest.fixture
def model_copy(tmp_path: Path, model_path: Path) -> Path:
    return _copy(model_path, tmp_path / "m.onnx")


def _sensitivity(logits: np.ndarray, labels: np.ndarray, boundary: float) -> float:
    return float((logits[labels == 1] >= boundary).mean())


@pytest.mark.data
def test_each_type_takes_the_highest_boundary_that_keeps_the_target_in_every_source(
    model_copy: Path, predictor: Predictor, isic_mvb: Path, pad_ufes: Path
) -> None:
    held_out = predictor.card.validation_keys
    # two sources with >= 20 validation cancers, one of each type (the whole validation set takes minutes)
    records = [r for d in (isic_mvb, pad_ufes) for r in load_dataset(d) if r.uid in held_out]
    target = 0.97
    int8 = _copy(
        predictor.model_path.with_name(predictor.model_path.stem + "-int8.onnx"), model_copy.parent / "m-int8.onnx"
    )
    section = refit_type_thresholds(model_copy, records, target, builds=[int8])
    assert Predictor(int8).card.photo_types == section  # the int8 build carries the same decisions

    # The rewritten card is what a Predictor of the file serves, the previous thresholds kept beside.
    served = Predictor(model_copy)
    before = predictor.card.photo_types["types"]
    exported = predictor.card.photo_types["threshold_fit"]["previous_thresholds"]
    assert section["threshold_fit"]["previous_rule"] == predictor.card.photo_types["threshold_fit"]["previous_rule"]
    for t, entry in section["types"].items():
        assert served.threshold_for(t) == pytest.approx(entry["threshold"])
        assert entry["threshold_logit"] == pytest.approx(
            entry["temperature"] * np.log(entry["threshold"] / (1 - entry["threshold"]))
        )
        assert entry["temperature"] == before[t]["temperature"]  # the temperatures stay
        # the bundled card was fitted before: a refit keeps what the export chose as the record
        assert section["threshold_fit"]["previous_thresholds"][t] == exported[t]
        assert exported[t]["threshold"] != before[t]["threshold"]
    assert f">= {target:g}" in served.card.photo_types["threshold_rule"]
    beside = json.loads(model_copy.with_suffix("").with_suffix(".card.json").read_text())
    assert beside["photo_types"]["types"] == served.card.photo_types["types"]
    for key in ("quality_gate", "answers"):  # the rest of the card untouched
        assert getattr(served.card, key) == getattr(predictor.card, key)

    # Each type's boundary keeps the target in its source (the photo's type its source's), and it is the
    # highest that does: moving it past the next cancer above it drops the source under the target.
    outs = [
        served.run(np.stack([served.decode(r.path).image for r in records[i : i + 32]]))
        for i in range(0, len(records), 32)
    ]
    logits, embeddings = (np.concatenate([o[k] for o in outs]) for k in ("logit", "embedding"))
    labels = np.array([r.label for r in records])
    src = np.array([r.source for r in records])
    for source in ("isic-mvb", "pad-ufes-20-phone"):
        m = src == source
        assert labels[m].sum() >= MIN_CANCERS_FOR_THRESHOLD
        z = section["types"][SOURCE_PHOTO_TYPE[source]]["threshold_logit"]
        assert _sensitivity(logits[m], labels[m], z - 1e-4) >= target
        above = np.sort(logits[m & (labels == 1)])
        next_up = above[above > z + 1e-4][0]
        assert _sensitivity(logits[m], labels[m], next_up + 1e-4) < target

    # As served (each photo by its detected type), per source, with the photos' counts.
    fit = section["threshold_fit"]
    assert fit["validation_photos"] == len(records)
    assert {s: f["n"] for s, f in fit["as_served"].items()} == {s: int((src == s).sum()) for s in set(src)}
    detected = served.photo_types.detect(embeddings)
    refer = np.array([z >= section["types"][t]["threshold_logit"] for z, t in zip(logits, detected, strict=True)])
    for source, f in fit["as_served"].items():
        m = (src == source) & (labels == 1)
        assert f["sensitivity"] == pytest.approx(refer[m].mean(), abs=1e-9)


@pytest.mark.data
def test_the_command_needs_the_training_datasets_and_a_sensible_target(
    model_copy: Path, tmp_path: Path, capsys
) -> None:
    before = model_copy.read_bytes()
    assert main(["fit-thresholds", "--model", str(model_copy), "--data-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "--data-root" in err and "Traceback" not in err
    assert model_copy.read_bytes() == before  # nothing rewritten
    with pytest.raises(SkinscanError, match=r"between 0\.5 and 1"):
        refit_type_thresholds(model_copy, [], 1.2)


@pytest.mark.data
def test_only_builds_of_the_same_model_share_its_thresholds(model_copy: Path, tmp_path: Path, isic_mvb: Path) -> None:
    from skinscan.card import write_card

    other = _copy(model_copy, tmp_path / "other.onnx")
    card = Predictor(other).card.model_dump()
    card["photo_types"]["types"]["phone"]["temperature"] *= 1.1  # calibrated otherwise: another model
    write_card(other, card)
    before = model_copy.read_bytes()
    with pytest.raises(SkinscanError, match="not a build of the same model"):
        refit_type_thresholds(model_copy, load_dataset(isic_mvb)[:4], 0.98, builds=[other])
    assert model_copy.read_bytes() == before
