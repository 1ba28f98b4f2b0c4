"""Sources as a first-class idea: readers of the new datasets, grouped folds across sources, the sampler's
balance by source and diagnosis, and the leave-one-source-out protocol's decision rule and figures."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from skinscan.data import (
    DIAGNOSES,
    Record,
    diagnosis_class,
    diagnosis_prior,
    grouped_kfold,
    load_dataset,
    read_labels_csv,
    sampling_weights,
)
from skinscan.errors import DatasetError


def _rec(i: int, source: str, label: int, diagnosis: str | None, group: str | None = None) -> Record:
    return Record(Path(f"{i}.jpg"), label, source, f"{i}.jpg", group=group or f"g{i}", diagnosis=diagnosis)


# ------------------------------------------------------------------------------------------ readers (real)
@pytest.fixture(scope="module")
def archive_more(isic_archive_more: Path) -> list[Record]:
    return load_dataset(isic_archive_more)


@pytest.fixture(scope="module")
def atlas(clinical_atlas: Path) -> list[Record]:
    return load_dataset(clinical_atlas)


@pytest.mark.data
def test_archive_more_records_carry_collection_diagnosis_and_lesion_groups(archive_more):
    assert len(archive_more) == 4384
    assert Counter(r.source for r in archive_more) == {"ham10000": 2169, "isic-archive-pre2019": 2215}
    assert all(r.dataset == "isic-archive-more" and r.uid.startswith("isic-archive-more/images/") for r in archive_more)
    assert {r.diagnosis for r in archive_more} <= set(DIAGNOSES)
    assert Counter(r.diagnosis for r in archive_more if r.source == "ham10000")["benign_keratosis"] == 1090
    # every image of one HAM lesion shares one group, so no fold splits a lesion
    by_lesion: dict[str, set[str]] = {}
    for r in archive_more:
        if r.lesion:
            by_lesion.setdefault(r.lesion, set()).add(r.group)
    assert by_lesion and all(len(g) == 1 for g in by_lesion.values())
    assert sum(n > 1 for n in Counter(r.lesion for r in archive_more if r.lesion).values()) == 571


@pytest.mark.data
def test_atlas_records_carry_source_skin_type_and_near_duplicate_groups(atlas):
    assert Counter(r.source for r in atlas) == {"fitzpatrick17k": 2619, "dermnet-nz": 1486, "sd-198": 300}
    fitz = [r for r in atlas if r.source == "fitzpatrick17k"]
    assert sum(r.skin_type is not None for r in fitz) == 2619 - 105
    assert Counter(r.skin_type for r in fitz)[6] == 71
    assert all(r.skin_type is None for r in atlas if r.source != "fitzpatrick17k")
    dup = Counter(r.group for r in atlas if r.meta.get("dup_group"))
    assert dup and max(dup.values()) >= 2  # near-duplicates share a group


@pytest.mark.data
def test_phone_and_archive_diagnoses_map_onto_the_classes(pad_ufes, isic_mvb):
    phone = load_dataset(pad_ufes)
    assert Counter(r.diagnosis for r in phone) == {
        "bcc": 189,
        "actinic_keratosis": 142,
        "nevus": 122,
        "benign_keratosis": 82,
        "scc": 32,
        "melanoma": 19,
    }
    mvb = load_dataset(isic_mvb, split="train")
    assert {r.diagnosis for r in mvb if r.label == 0} == {"nevus"}  # every benign image is a HAM nevus
    assert {r.diagnosis for r in mvb if r.label == 1} == {None}  # malignant: diagnosis unknown, masked


@pytest.mark.data
def test_grouped_folds_never_split_a_lesion_or_near_duplicate_group_across_sources(archive_more, atlas):
    records = archive_more[::3] + atlas[::3]
    seen: dict[str, int] = {}
    for k, (_, val) in enumerate(grouped_kfold(records, 5, seed=0)):
        for r in val:
            assert seen.setdefault(f"{r.source}/{r.group}", k) == k


def test_labels_csv_links_lesions_and_near_duplicates_into_one_group(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "file,malignant,lesion_id,dup_group,collection,diagnosis_group\n"
        "a.jpg,1,L1,,HAM10000,bcc\n"
        "b.jpg,1,L1,7,HAM10000,bcc\n"
        "c.jpg,0,L2,7,HAM10000,nevus\n"  # shares near-copy group 7 with b: one group with L1
        "d.jpg,0,,,HAM10000,NEV\n"
        "e.jpg,0,,,HAM10000,rash\n"
    )
    a, b, c, d, e = read_labels_csv(tmp_path / "labels.csv")
    assert a.group == b.group == c.group != d.group
    assert d.group == "d.jpg" and a.source == "ham10000"
    assert (a.diagnosis, c.diagnosis, d.diagnosis, e.diagnosis) == ("bcc", "nevus", "nevus", None)


def test_diagnosis_class_maps_codes_and_rejects_unknown_names():
    assert diagnosis_class("MEL") == "melanoma" and diagnosis_class("ACK") == "actinic_keratosis"
    assert diagnosis_class(" other_benign ") == "other_benign"
    assert diagnosis_class("eczema") is None and diagnosis_class("") is None


# ---------------------------------------------------------------------------------------------- sampling
def _mixed() -> list[Record]:
    recs = [_rec(i, "big", int(i < 100), "melanoma" if i < 100 else "nevus") for i in range(900)]
    recs += [_rec(1000 + i, "small", int(i < 10), "bcc" if i < 10 else "nevus") for i in range(100)]
    return recs


def _shares(records, w, key):
    out: Counter = Counter()
    for r, v in zip(records, w, strict=True):
        out[key(r)] += v
    return out


def test_natural_mix_draws_every_image_alike():
    recs = _mixed()
    w = sampling_weights(recs)
    assert np.allclose(w, 1 / len(recs))


def test_source_balance_zero_gives_every_source_the_same_share():
    recs = _mixed()
    w = sampling_weights(recs, source_balance=0.0)
    assert _shares(recs, w, lambda r: r.source) == pytest.approx({"big": 0.5, "small": 0.5})
    half = sampling_weights(recs, source_balance=0.5)
    assert _shares(recs, half, lambda r: r.source)["big"] == pytest.approx(30 / 40)  # sqrt(900) : sqrt(100)


def test_diagnosis_balance_evens_the_diagnoses_inside_each_source():
    recs = _mixed()
    w = sampling_weights(recs, source_balance=0.0, diagnosis_balance=0.0)
    small = _shares(
        [r for r in recs if r.source == "small"], w[[r.source == "small" for r in recs]], lambda r: r.diagnosis
    )
    assert small == pytest.approx({"bcc": 0.25, "nevus": 0.25})
    prior = diagnosis_prior(recs, w)
    assert prior[DIAGNOSES.index("melanoma")] == pytest.approx(0.25)
    assert prior[DIAGNOSES.index("nevus")] == pytest.approx(0.5)
    assert prior.sum() == pytest.approx(1.0)


def test_source_weights_must_name_every_source():
    recs = _mixed()
    w = sampling_weights(recs, {"big": 3.0, "small": 1.0})
    assert _shares(recs, w, lambda r: r.source)["big"] == pytest.approx(0.75)
    with pytest.raises(DatasetError, match="small"):
        sampling_weights(recs, {"big": 1.0})


# --------------------------------------------------------------------------------------- leave-one-source-out
def _synthetic(seed: int = 0):
    """Three sources of 'dermoscopic' and 'phone' kinds; features carry the label plus a source offset."""
    from skinscan.loso import photo_type  # noqa: F401  (the sources below are known kinds)

    rng = np.random.default_rng(seed)
    recs, xs = [], []
    specs = (("isic-mvb", 0.0, 300), ("ham10000", 1.5, 300), ("fitzpatrick17k", -1.0, 300), ("dermnet-nz", 0.5, 200))
    for s, offset, n in specs:
        for i in range(n):
            y = int(rng.random() < 0.4)
            d = ("melanoma" if i % 2 else "bcc") if y else ("nevus" if i % 3 else "actinic_keratosis")
            recs.append(_rec(len(recs), s, y, d))
            xs.append(rng.normal(size=8) + np.r_[1.2 * y, offset, 0.8 * (d == "melanoma"), np.zeros(5)])
    return recs, np.array(xs, dtype=np.float32)


def test_decision_rule_keeps_the_target_in_every_training_source_of_a_type():
    from skinscan import metrics
    from skinscan.loso import apply_rule, decision_rule

    recs, x = _synthetic()
    logits = x[:, 0] * 2 + np.random.default_rng(1).normal(size=len(x))
    rule = decision_rule(logits, recs, 0.95)
    assert set(rule) == {"dermoscopic", "phone"}
    p, t = apply_rule(logits, recs, rule)
    for s in ("isic-mvb", "ham10000", "fitzpatrick17k", "dermnet-nz"):
        m = np.array([r.source == s for r in recs])
        y = np.array([r.label for r in recs])[m]
        assert (p[m][y == 1] >= t[m][y == 1]).mean() >= 0.95
    # the threshold of a type is the strictest source's: one source alone would allow a higher one
    derm = np.array([r.source in ("isic-mvb", "ham10000") for r in recs])
    y = np.array([r.label for r in recs])
    alone = metrics.threshold_for_sensitivity(y[derm], p[derm], 0.95)
    assert rule["dermoscopic"]["threshold"] <= alone + 1e-12


def test_decision_rule_variants_one_boundary_and_pooled():
    from skinscan.loso import apply_rule, decision_rule

    recs, x = _synthetic()
    logits = x[:, 0] * 2 + np.random.default_rng(1).normal(size=len(x))
    y = np.array([r.label for r in recs])
    one = decision_rule(logits, recs, 0.95, per_type=False, min_cancers=5)
    assert set(one) == {"any"}  # one temperature and threshold for every photo, as the export sets them
    p, t = apply_rule(logits, recs, one)
    assert len(set(t)) == 1
    for s in ("isic-mvb", "ham10000", "fitzpatrick17k", "dermnet-nz"):
        m = np.array([r.source == s for r in recs])
        assert (p[m][y[m] == 1] >= t[m][y[m] == 1]).mean() >= 0.95
    # pooled over a type's sources the target holds on the pool only, so its threshold is never stricter
    every, pooled = decision_rule(logits, recs, 0.95), decision_rule(logits, recs, 0.95, every_source=False)
    for kind in ("dermoscopic", "phone"):
        assert pooled[kind]["threshold"] >= every[kind]["threshold"] - 1e-12
    # a higher target lowers every threshold
    stricter = decision_rule(logits, recs, 0.98)
    assert all(stricter[k]["threshold"] <= every[k]["threshold"] + 1e-12 for k in every)


def test_frozen_loso_never_lets_the_held_out_unit_choose_its_rule():
    from skinscan.loso import Recipe, frozen_loso

    recs, x = _synthetic()
    recipe = Recipe("t", source_balance=0.5, diagnosis_balance=0.5, components=None)
    a = frozen_loso(recs, x, recipe, units=["dermnet-nz"], in_source_folds=2, n_boot=50)
    flipped = [
        Record(r.path, 1 - r.label, r.source, r.key, group=r.group, diagnosis=r.diagnosis)
        if r.source == "dermnet-nz"
        else r
        for r in recs
    ]
    b = frozen_loso(flipped, x, recipe, units=["dermnet-nz"], in_source_folds=2, n_boot=50)
    held_a, held_b = a["held_out"]["dermnet-nz"], b["held_out"]["dermnet-nz"]
    assert held_a["rule"] == held_b["rule"]  # chosen on the other sources only
    assert held_a["auc"] > 0.75 and held_b["auc"] < 0.25  # the same scores, judged against flipped labels
    assert held_a["n"] == 200 and 0 <= held_a["specificity_without_ak"] <= 1
    assert held_a["diagnosis_balanced_accuracy"] > 0.3  # chance: 0.25 over 4 classes; features carry the label
    assert set(a["in_source"]) == {"isic-mvb", "ham10000", "fitzpatrick17k", "dermnet-nz"}


def test_loso_command_refuses_an_unknown_unit(tmp_path, capsys, pad_ufes):
    pytest.importorskip("torch", reason="needs the train extra")
    from skinscan.cli import main

    code = main(["loso", "--data", str(pad_ufes), "--units", "nowhere", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --units: no source named nowhere") and "pad-ufes-20-phone" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ the diagnosis in the results
def test_predictor_service_and_cli_carry_the_diagnosis(diagnosis_model, tmp_path, capsys):
    import base64
    import csv

    from fastapi.testclient import TestClient

    from skinscan.cli import main
    from skinscan.data import DIAGNOSIS_LABELS
    from skinscan.predict import Predictor
    from skinscan.preprocess import load_pixels, normalise
    from skinscan.service import Settings, create_app

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))[:3]
    predictor = Predictor(diagnosis_model)
    batch = normalise(np.stack([load_pixels(p, predictor.spec) for p in examples]), predictor.spec)
    logp = predictor.run(batch)["diagnosis"]
    results = predictor.predict(examples, force=True)
    for r, row in zip(results, logp, strict=True):
        assert r.diagnosis == DIAGNOSES[int(np.argmax(row))]
        assert r.diagnoses == pytest.approx(dict(zip(DIAGNOSES, np.exp(row), strict=True)), abs=1e-4)
        assert r.to_dict()["diagnosis_label"] == DIAGNOSIS_LABELS[r.diagnosis]
    # a retake that is not forced carries no diagnosis either: nothing is said about a photo not judged
    assert all(r.diagnosis is None for r in predictor.predict(examples) if r.probability is None)

    with TestClient(create_app(Settings(model=diagnosis_model), predictor=predictor)) as client:
        image = base64.b64encode(examples[0].read_bytes()).decode()
        body = client.post("/v1/predict?force=true", json={"image": image}).json()
        schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictResponse"]["properties"]
    assert body["diagnosis"] == results[0].diagnosis and body["diagnosis_label"] == DIAGNOSIS_LABELS[body["diagnosis"]]
    assert set(body["diagnoses"]) == set(DIAGNOSES)
    assert {"diagnosis", "diagnosis_label", "diagnoses"} <= set(schema)

    out = tmp_path / "rows.csv"
    assert main(["predict", *map(str, examples), "--model", str(diagnosis_model), "--force", "-q", "-o", str(out)]) == 0
    with out.open(newline="") as f:
        assert [row["diagnosis"] for row in csv.DictReader(f)] == [r.diagnosis for r in results]
    assert (
        Predictor(_without_diagnosis(diagnosis_model, tmp_path)).predict(examples[:1], force=True)[0].diagnosis is None
    )


def _without_diagnosis(model_path: Path, folder: Path) -> Path:
    """A copy of a model without its `diagnosis` output (and card section): no head, no diagnosis, no guess."""
    onnx = pytest.importorskip("onnx")
    from skinscan.card import CARD_KEY, write_card

    model = onnx.load(str(model_path))
    keep = [o for o in model.graph.output if o.name != "diagnosis"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    out = folder / "no-diagnosis.onnx"
    onnx.save(model, str(out))
    card = json.loads({p.key: p.value for p in model.metadata_props}[CARD_KEY])
    card["outputs"] = [o for o in card["outputs"] if o != "diagnosis"]
    card.pop("diagnosis", None)
    write_card(out, card)
    return out


@pytest.mark.data
def test_settings_that_name_sources_must_name_ones_the_data_holds(pad_ufes, data_root):
    pytest.importorskip("torch", reason="needs the train extra")
    from skinscan.config import load_config
    from skinscan.errors import ConfigError
    from skinscan.train import load_training_records

    data = [str(pad_ufes), str(data_root / "clinical-atlas")]
    for key, value in (("exclude_sources", ["dermnet"]), ("source_weights", {"dermnet": 1.0})):
        with pytest.raises(ConfigError, match=r"names unknown source\(s\) \['dermnet'\]; sources: .*'dermnet-nz'"):
            load_training_records(load_config(overrides={"data": data, key: value}))
    records, info = load_training_records(load_config(overrides={"data": data, "exclude_sources": ["sd-198"]}))
    assert "sd-198" not in info["per_source"] and info["excluded_images"] == 300
    assert {r.source for r in records} == {"pad-ufes-20-phone", "fitzpatrick17k", "dermnet-nz"}
