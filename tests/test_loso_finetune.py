"""The finetune protocol's in-source run on a tiny real subset: every training photo scored once by the fold
model that never trained on it, each fold's rule fitted on the other folds, the out-of-fold logits usable by
`fit-answers`."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the train extra")

from skinscan import loso  # noqa: E402
from skinscan.cli import main  # noqa: E402
from skinscan.config import load_config  # noqa: E402
from skinscan.train import load_training_records  # noqa: E402

pytestmark = [pytest.mark.data, pytest.mark.slow]


def test_in_source_run_scores_every_photo_once_with_rules_from_the_other_folds(tmp_path, isic_mvb, pad_ufes):
    over = {"data": [str(isic_mvb), str(pad_ufes)], "limit": 160, "epochs": 1, "batch_size": 16, "threads": 2}
    over["diagnosis_weight"] = 0.5  # the diagnosis head too: the folds are rescored for it
    cfg = load_config(overrides=over)
    records, _ = load_training_records(cfg)
    out = tmp_path / "loso"
    result = loso.finetune_loso(cfg, records, out, n_boot=20, progress=False, in_source_folds=2, held_out=False)

    assert result["held_out"] == {}
    run = out / "in-source"
    assert result["in_source_run"]["run"] == run.as_posix()
    for source in ("isic-mvb", "pad-ufes-20-phone"):
        assert result["in_source"][source]["n"] == sum(r.source == source for r in records)
        assert 0.0 <= result["in_source"][source]["auc"] <= 1.0
    assert "diagnosis_balanced_accuracy" in result["in_source"]["pad-ufes-20-phone"]["phone_diagnoses"]
    with (run / "oof.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["uid"] for r in rows) == sorted(r.uid for r in records)  # every photo, exactly once

    scores = [np.load(run / f"fold-{k}" / "fold_scores.npz") for k in range(2)]
    for k, s in enumerate(scores):
        val = np.load(run / f"fold-{k}" / "val_predictions.npz")  # written while training
        assert list(s["keys"]) == list(val["keys"])
        np.testing.assert_allclose(s["logits"], val["logits"], atol=1e-3)  # the checkpoint rescored alike
        assert s["diagnosis"].shape == (len(val["keys"]), 10) and np.isfinite(s["diagnosis"]).all()
    by_uid = {r.uid: r for r in records}
    for k in range(2):  # fold k's rule: fitted on the other fold's logits alone
        other = scores[1 - k]
        expected = loso.decision_rule(other["logits"], [by_uid[str(u)] for u in other["keys"]], cfg.target_sensitivity)
        assert result["in_source_run"]["rules"][k] == expected

    # resumed: nothing is trained or scored again, the figures are the same
    def written() -> dict:
        return {p: p.stat().st_mtime_ns for pattern in ("fold-*/*.pt", "fold-*/*.npz") for p in run.glob(pattern)}

    before = written()
    assert len(before) == 2 * 4  # best.pt, last.pt, val_predictions.npz, fold_scores.npz per fold
    again = loso.finetune_loso(cfg, records, out, n_boot=20, progress=False, in_source_folds=2, held_out=False)
    assert written() == before
    assert json.dumps(again["in_source"], sort_keys=True) == json.dumps(result["in_source"], sort_keys=True)


def test_loso_command_refuses_in_source_settings_it_cannot_run(tmp_path, capsys, pad_ufes):
    base = ["loso", "--data", str(pad_ufes), "--out", str(tmp_path / "r")]
    assert main([*base, "--in-source-folds", "1"]) == 2
    assert "give 2 or more folds, or 0 for none" in capsys.readouterr().err
    assert main([*base, "--in-source-only", "--units", "pad-ufes-20-phone"]) == 2
    assert "leave out --units" in capsys.readouterr().err
    assert main([*base, "--in-source-only", "--in-source-folds", "0"]) == 2
    assert not (tmp_path / "r").exists()


def test_gate_of_a_held_out_source_reads_the_features_of_the_network_trained_without_it(
    tmp_path, data_root, isic_mvb, pad_ufes, isic_archive_more, clinical_atlas
):
    from skinscan.data import IMAGE_SUFFIXES
    from skinscan.predict import Predictor

    unit = "pad-ufes-20-phone"
    over = {"data": [str(isic_mvb), str(pad_ufes)], "limit": 160, "epochs": 1, "batch_size": 16, "threads": 2}
    over["color_constancy"] = "shades-of-gray"  # the shipped model's preprocessing: it is the baseline
    cfg = load_config(overrides=over)
    records, _ = load_training_records(cfg)
    out = tmp_path / "loso"
    loso.finetune_loso(cfg, records, out, units=[unit], n_boot=20, progress=False, in_source_folds=0)

    # The unit's network is exported once into its run and reused; it is the network that scored the unit.
    models = loso.held_out_models(out, progress=False)
    assert list(models) == [unit] and models[unit].parent == out / f"held-out-{unit}" / "export"
    written = models[unit].stat().st_mtime_ns
    assert loso.held_out_models(out, progress=False) == models and models[unit].stat().st_mtime_ns == written
    kept = np.load(out / f"held-out-{unit}" / "held_out_predictions.npz")
    net = Predictor(models[unit])
    by_uid = {r.uid: r for r in records}
    first = [by_uid[str(k)] for k in kept["keys"][:6]]
    logits = net.run(np.stack([net.decode(r.path).image for r in first]))["logit"]
    np.testing.assert_allclose(logits, kept["logits"][:6], atol=2e-2)  # Pillow decode vs the training loader

    # The benchmark judges the unit by the gate fitted without it on that network's embeddings, beside the
    # same fit on the shipped network's: both from the embedding caches it wrote.
    report_dir, cache = tmp_path / "report", tmp_path / "cache"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gate_sources.py"
    args = ["--loso", str(out), "--data-root", str(data_root), "--limit-per-source", "30"]
    done = subprocess.run(
        [sys.executable, str(bench), *args, "--cache", str(cache), "--out", str(report_dir)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((report_dir / "gate_sources.json").read_text())
    assert set(report["held_out"]) == set(report["shipped_features"]) == {unit}
    assert report["networks"] == {unit: models[unit].as_posix()}
    shipped = Predictor()
    caches = {p.name for p in cache.glob("*.npz")}
    assert caches == {f"gate-inputs-{p.sha256[:16]}.npz" for p in (shipped, net)}
    z = np.load(cache / f"gate-inputs-{net.sha256[:16]}.npz")
    phone = [i for i, u in enumerate(z["uids"]) if str(u).startswith(f"{unit}/")]
    assert len(phone) == report["held_out"][unit]["n"] == 30
    held = report["held_out"][unit]
    assert held["n"] == report["shipped_features"][unit]["n"]
    assert held["nonlesion_holdout"]["flagged"]["n"] == report["nonlesion"]["holdout"]
    fitted = held["fit"]["train_images"]  # per source: the six others, none of the unit's
    assert unit not in fitted and sum(fitted.values()) == 6 * 30
    assert fitted == report["shipped_features"][unit]["fit"]["train_images"]
    # Each figure is the gate fitted on its own network's cached embeddings: recomputed here, the same.
    spec = importlib.util.spec_from_file_location("bench_gate_sources", bench)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sample = mod.read_records(data_root, 30)
    nonlesion = [p for p in bench.parents[1].glob("tests/assets/nonlesion/*/*") if p.suffix.lower() in IMAGE_SUFFIXES]
    stores, _ = mod.embed_cached(
        [shipped, net], [(f"nonlesion/{p.parent.name}/{p.name}", p) for p in nonlesion], cache, 32
    )
    tune = sorted(p for p in nonlesion if p.parent.name == "tune" and f"nonlesion/tune/{p.name}" in stores[0])
    holdout = sorted(p for p in nonlesion if p.parent.name == "holdout" and f"nonlesion/holdout/{p.name}" in stores[0])
    again = mod.loso_gates(sample, stores, [unit], tune, holdout, progress=lambda m: None)
    for key in ("held_out", "shipped_features"):
        for field in ("refused", "not_a_lesion"):
            assert again[key][unit][field] == report[key][unit][field]
        assert again[key][unit]["nonlesion_holdout"] == report[key][unit]["nonlesion_holdout"]
    text = (report_dir / "gate_sources.md").read_text()
    assert "features never saw it" in text and (report_dir / "gate_sources.png").stat().st_size > 10_000
