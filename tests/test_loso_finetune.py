"""The finetune protocol's in-source run on a tiny real subset: every training photo scored once by the fold
model that never trained on it, each fold's rule fitted on the other folds, the out-of-fold logits usable by
`fit-answers`."""

from __future__ import annotations

import csv
import json

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
