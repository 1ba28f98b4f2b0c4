"""Training, resume and export end to end on a tiny real subset; ONNX agrees with torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the train extra")

from skinscan import train as train_mod  # noqa: E402
from skinscan.config import load_config  # noqa: E402
from skinscan.export import export, load_run_model, parity_check, validation_image_paths  # noqa: E402
from skinscan.predict import Predictor  # noqa: E402
from skinscan.preprocess import load_pixels, normalise  # noqa: E402

pytestmark = [pytest.mark.data, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, isic_mvb):
    out = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_config(overrides={"data": str(isic_mvb), "limit": 64, "epochs": 2, "batch_size": 16, "threads": 2})
    result = train_mod.train(cfg, out, progress=False)
    return cfg, out, result


def test_training_writes_a_complete_run(tiny_run):
    _, out, result = tiny_run
    for name in ("best.pt", "last.pt", "config.yaml", "data.json", "history.csv", "calibration.json"):
        assert (out / name).is_file(), name
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss,train_auc,val_loss,val_auc")
    assert len(history) == 3  # header + 2 epochs
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["temperature"] > 0 and 0 < cal["threshold"] < 1
    assert cal["validation"]["sensitivity"] >= cal["target_sensitivity"]
    assert result.best_epoch in (1, 2)


def test_existing_run_is_not_overwritten(tiny_run):
    from skinscan.errors import ConfigError

    cfg, out, _ = tiny_run
    with pytest.raises(ConfigError, match="--resume"):
        train_mod.train(cfg, out, progress=False)


def test_interrupted_training_resumes_without_losing_epochs(tmp_path, isic_mvb, monkeypatch):
    cfg = load_config(overrides={"data": str(isic_mvb), "limit": 48, "epochs": 2, "batch_size": 16, "threads": 2})
    out = tmp_path / "run"
    real = train_mod.predict_logits
    calls = {"n": 0}

    def interrupt_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "predict_logits", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, out, progress=False)
    first = (out / "history.csv").read_text().splitlines()
    assert len(first) == 2  # epoch 1 was saved before the interruption
    monkeypatch.setattr(train_mod, "predict_logits", real)
    train_mod.train(cfg, out, resume=True, progress=False)
    resumed = (out / "history.csv").read_text().splitlines()
    assert len(resumed) == 3
    assert resumed[1] == first[1]  # the finished epoch was kept, not redone


def test_export_writes_onnx_with_card_and_matches_torch(tiny_run, tmp_path):
    _, out, _ = tiny_run
    images = validation_image_paths(out, limit=8)
    assert images, "the run lists its validation images"
    onnx_path = export(out, tmp_path, name="tiny", version_tag="test", check_images=images)
    predictor = Predictor(onnx_path)
    assert predictor.card.name == "tiny" and predictor.card.version == "test"
    assert predictor.card.parity_max_abs_logit_diff <= 1e-4
    assert (tmp_path / "tiny.card.json").is_file()
    # ONNX Runtime vs torch on real images, through the one preprocessing function
    net, _ = load_run_model(out)
    batch = normalise(np.stack([load_pixels(p, predictor.spec) for p in images]), predictor.spec)
    assert parity_check(onnx_path, net, batch) <= 1e-4
    with torch.inference_mode():
        expected = net(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(predictor.run(batch)["logit"], expected, atol=1e-4)
    # calibrated probabilities follow the card's temperature
    results = predictor.predict(images, force=True)
    logits = np.array([r.logit for r in results])
    probs = np.array([r.probability for r in results])
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits / predictor.card.temperature)), rtol=1e-6)


def test_int8_quantisation_keeps_the_card_and_stays_close(tiny_run, tmp_path):
    from skinscan.export import quantize_int8

    _, out, _ = tiny_run
    images = validation_image_paths(out, limit=8)
    fp32 = export(out, tmp_path, name="tiny", version_tag="test", check_images=images)
    q = quantize_int8(fp32, images, tmp_path / "tiny-int8.onnx")
    p32, p8 = Predictor(fp32), Predictor(q)
    assert p8.card.name == "tiny-int8" and p8.card.threshold == p32.card.threshold
    assert p8.card.quantization["calibration_images"] == len(images)
    a = np.array([r.probability for r in p32.predict(images, force=True)])
    b = np.array([r.probability for r in p8.predict(images, force=True)])
    assert np.abs(a - b).max() <= p8.card.quantization["max_abs_probability_diff_on_calibration_images"] + 1e-6
    assert np.abs(a - b).mean() < 0.1


def test_the_weights_digest_survives_a_card_rewrite_and_is_parsed_once(tiny_run, tmp_path, monkeypatch):
    # an export embeds the same photos several times (photo types, gate); the cache of those outputs is keyed
    # by the graph and weights, so a rewritten card keeps it, and each file version is parsed once
    import onnx

    from skinscan.card import write_card
    from skinscan.export import _weights_digest, quantize_int8

    _, out, _ = tiny_run
    images = validation_image_paths(out, limit=4)
    fp32 = export(out, tmp_path, name="tiny", version_tag="test", check_images=images)
    parsed = []
    load = onnx.load
    monkeypatch.setattr(onnx, "load", lambda path, *a, **k: parsed.append(path) or load(path, *a, **k))
    first = _weights_digest(fp32)
    assert _weights_digest(fp32) == first and len(parsed) == 1
    card = Predictor(fp32).card.model_dump()
    write_card(fp32, card | {"version": "rewritten"})
    assert Predictor(fp32).card.version == "rewritten"
    assert _weights_digest(fp32) == first  # a new file version: parsed again, the same weights
    int8 = quantize_int8(fp32, images, tmp_path / "tiny-int8.onnx")
    assert _weights_digest(int8) != first


def test_runs_with_one_split_seed_export_as_one_ensemble(tiny_run, tmp_path, isic_mvb):
    from skinscan.errors import SkinscanError
    from skinscan.export import ensemble_calibration
    from skinscan.metrics import fit_temperature

    cfg, out, _ = tiny_run
    other = tmp_path / "seed1"
    train_mod.train(cfg.model_copy(update={"seed": 1, "split_seed": cfg.seed}), other, progress=False)
    a, b = (json.loads((r / "data.json").read_text()) for r in (out, other))
    assert a["val_keys"] == b["val_keys"]  # same validation split, other initialisation and shuffling
    images = validation_image_paths(out, limit=8)
    onnx_path = export([out, other], tmp_path, name="pair", version_tag="test", check_images=images)
    predictor = Predictor(onnx_path)
    assert predictor.card.parity_max_abs_logit_diff <= 1e-4
    assert [m["seed"] for m in predictor.card.training["members"]] == [0, 1]
    nets = [load_run_model(r)[0] for r in (out, other)]
    batch = normalise(np.stack([load_pixels(p, predictor.spec) for p in images]), predictor.spec)
    with torch.inference_mode():
        each = [net(torch.from_numpy(batch)).numpy() for net in nets]
        first_embedding = nets[0].features(torch.from_numpy(batch)).mean(dim=(2, 3)).numpy()
    outputs = predictor.run(batch)
    np.testing.assert_allclose(outputs["logit"], np.mean(each, axis=0), atol=1e-4)
    np.testing.assert_allclose(outputs["cam"].mean(axis=(1, 2)), outputs["logit"], atol=1e-4)  # still exact
    np.testing.assert_allclose(outputs["embedding"], first_embedding, atol=1e-4)
    # calibrated on the mean of the members' validation logits
    val = [np.load(r / "val_predictions.npz") for r in (out, other)]
    mean_logits = (val[0]["logits"] + val[1]["logits"]) / 2
    assert predictor.card.temperature == pytest.approx(fit_temperature(mean_logits, val[0]["labels"]))
    assert ensemble_calibration([out, other])["validation"]["n"] == len(mean_logits)

    stranger = tmp_path / "split1"
    train_mod.train(cfg.model_copy(update={"seed": 1}), stranger, progress=False)  # its own split
    with pytest.raises(SkinscanError, match="split_seed"):
        export([out, stranger], tmp_path / "bad", name="bad", check_images=images)


def test_export_photo_types_on_a_one_kind_run_is_a_clear_error(tiny_run, tmp_path, capsys):
    from skinscan.cli import main

    _, out, _ = tiny_run  # archive images only: nothing to tell apart
    assert main(["export", str(out), "--out", str(tmp_path / "models"), "--name", "tiny", "--photo-types"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "both types" in err and "without --photo-types" in err
    assert not (tmp_path / "models").exists()  # refused before any export work


def test_export_thresholds_from_refuses_a_run_it_cannot_use(tiny_run, tmp_path, capsys):
    from skinscan.cli import main

    _, out, _ = tiny_run
    models = tmp_path / "models"
    base = ["export", str(out), "--out", str(models), "--name", "tiny"]
    assert main([*base, "--thresholds-from", str(out)]) == 2
    assert "add --photo-types" in capsys.readouterr().err
    assert main([*base, "--dermoscopic-min-probability", "0.9"]) == 2
    assert "add --photo-types" in capsys.readouterr().err
    assert main([*base, "--photo-types", "--dermoscopic-min-probability", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err

    cv_run = tmp_path / "cv"
    cv_run.mkdir()
    assert main([*base, "--photo-types", "--thresholds-from", str(cv_run)]) == 2
    assert "no oof.csv" in capsys.readouterr().err

    (cv_run / "oof.csv").write_text("fold,source,key,patient,label,logit\n")
    (cv_run / "data.json").write_text(json.dumps({"records_sha256": "other photos"}))
    assert main([*base, "--photo-types", "--thresholds-from", str(cv_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "records_sha256 differs" in err
    assert not models.exists()  # refused before any export work


def test_export_thresholds_per_photo_type_from_a_k_fold_run(tmp_path, isic_mvb, pad_ufes, capsys):
    """A tiny two-source run and a K-fold run of the same photos: export --photo-types --thresholds-from."""
    import csv

    from skinscan.cli import main
    from skinscan.metrics import sigmoid

    over = {"data": [str(isic_mvb), str(pad_ufes)], "limit": 160, "epochs": 1, "batch_size": 16, "threads": 2}
    run, cv_run, models = tmp_path / "run", tmp_path / "cv", tmp_path / "models"
    train_mod.train(load_config(overrides=over), run, progress=False)
    train_mod.train(load_config(overrides={**over, "folds": 2}), cv_run, progress=False)
    args = ["export", str(run), "--out", str(models), "--name", "two", "--photo-types"]
    gate = ["--gate", str(REPO / "tests" / "assets" / "nonlesion" / "tune")]
    assert main([*args, "--thresholds-from", str(cv_run), "--dermoscopic-min-probability", "0.8", *gate]) == 0
    printed = capsys.readouterr().out
    assert "quality gate stored in the model card" in printed
    section = json.loads((models / "two.card.json").read_text())["photo_types"]
    target = load_config(overrides=over).target_sensitivity
    with (cv_run / "oof.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for t, source in (("dermoscopic", "isic-mvb"), ("phone", "pad-ufes-20-phone")):
        entry = section["types"][t]
        thr, cv = entry["threshold"], entry["threshold_cross_validation"]
        mine = [r for r in rows if r["source"] == source]
        assert cv["source"] == source and cv["n"] == len(mine) > 0
        # each fold's logits through its temperature: the threshold keeps the target on the pooled photos
        # the library's own sigmoid: a hand-written one differs in the last bit, and the threshold is a p itself
        p = np.array([float(sigmoid(float(r["logit"]) / cv["fold_temperatures"][r["fold"]])) for r in mine])
        y = np.array([int(r["label"]) for r in mine])
        assert (p[y == 1] >= thr).mean() >= target
        assert f"{t} threshold {thr:.3f}" in printed
        assert cv["auc_ci"][0] <= cv["auc"] <= cv["auc_ci"][1] and f"AUC {cv['auc']:.3f}" in printed
    predictor = Predictor(models / "two.onnx")
    assert predictor.photo_types.thresholds == {t: section["types"][t]["threshold"] for t in section["types"]}
    assert predictor.photo_types.dermoscopic_min_probability == section["probe"]["dermoscopic_min_probability"] == 0.8
    assert "P(dermoscopic) >= 0.8" in printed
    gate_fit = json.loads((models / "two.card.json").read_text())["quality_gate"]["fit"]
    assert gate_fit["unreadable_train_images"] == 0 and gate_fit["nonlesion_dir"].endswith("nonlesion/tune")
    assert str(cv_run) in section["threshold_rule"]


def test_diagnosis_head_trains_masked_exports_and_predicts(tmp_path, isic_mvb, pad_ufes, data_root, capsys):
    """A tiny many-source run with the diagnosis head: isic-mvb's malignant images (no diagnosis) are
    masked, the balanced sampler draws a fixed number per epoch, and the head reaches the Predictor, the
    CLI's CSV and the card with the training prior divided out."""
    import csv

    from skinscan.cli import main
    from skinscan.data import DIAGNOSES

    atlas = data_root / "clinical-atlas"
    over = {
        "data": [str(isic_mvb), str(pad_ufes), str(atlas)],
        "exclude_sources": ["dermnet-nz", "sd-198"],  # the atlas's Fitzpatrick17k photos only
        "limit": 400,
        "epochs": 1,
        "batch_size": 16,
        "threads": 2,
        "diagnosis_weight": 0.5,
        "source_balance": 0.0,
        "diagnosis_balance": 0.5,
        "samples_per_epoch": 48,
    }
    run = tmp_path / "run"
    train_mod.train(load_config(overrides=over), run, progress=False)
    cal = json.loads((run / "calibration.json").read_text())
    prior = cal["diagnosis_prior"]
    assert set(prior) == set(DIAGNOSES) and sum(prior.values()) == pytest.approx(1.0)
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 2  # one epoch of 48 draws = 3 steps, whatever the data's size
    info = json.loads((run / "data.json").read_text())
    assert set(info["per_source"]) == {"isic-mvb", "pad-ufes-20-phone", "fitzpatrick17k"}

    images = validation_image_paths(run, limit=6)
    onnx_path = export(run, tmp_path / "m", name="diag", version_tag="test", check_images=images)
    predictor = Predictor(onnx_path)
    assert predictor.card.outputs[-1] == "diagnosis" and predictor.card.diagnosis["classes"] == list(DIAGNOSES)
    # the graph divides the prior out: log-probabilities = log_softmax(raw - log prior)
    net, _ = load_run_model(run)
    batch = normalise(np.stack([load_pixels(p, predictor.spec) for p in images]), predictor.spec)
    with torch.inference_mode():
        raw = net.forward_both(torch.from_numpy(batch))[1].numpy()
    p = np.array([prior[c] for c in DIAGNOSES])
    shifted = raw - np.log(np.where(p > 0, p, 1)) + np.where(p > 0, 0, -1e4)
    expected = shifted - np.logaddexp.reduce(shifted, axis=1, keepdims=True)
    np.testing.assert_allclose(predictor.run(batch)["diagnosis"], expected, atol=1e-4)
    results = predictor.predict(images, force=True)
    for r, row in zip(results, expected, strict=True):
        assert r.diagnosis == DIAGNOSES[int(np.argmax(row))]
        assert sum(r.diagnoses.values()) == pytest.approx(1.0, abs=1e-3)
    out = tmp_path / "rows.csv"
    assert main(["predict", *map(str, images), "--model", str(onnx_path), "--force", "-q", "-o", str(out)]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["diagnosis"] for row in rows] == [r.diagnosis for r in results]

    # the card's balanced accuracy per source, on the run's validation photos, as the model scores them
    from skinscan.export import add_diagnosis_figures
    from skinscan.train import load_training_records

    val_keys = set(info["val_keys"])
    val = [r for r in load_training_records(load_config(run / "config.yaml"))[0] if r.uid in val_keys]
    figures = add_diagnosis_figures(onnx_path, val)
    predictor = Predictor(onnx_path)
    assert predictor.card.diagnosis["balanced_accuracy"] == figures and figures
    for source, f in figures.items():
        recs = [r for r in val if r.source == source and r.diagnosis]
        assert f["n"] == len(recs) and 0 <= f["diagnosis_balanced_accuracy"] <= 1
        told = predictor.predict([r.path for r in recs], force=True)
        said = {r.path: p.diagnosis for r, p in zip(recs, told, strict=True)}
        for c, recall in f["diagnosis_recall"].items():
            mine = [said[r.path] == c for r in recs if r.diagnosis == c]
            assert recall == pytest.approx(np.mean(mine))


def test_progressive_resizing_trains_small_first_then_at_full_size(tmp_path, isic_mvb, monkeypatch):
    """small_epochs train at small_size (the same draws, shrunk), the later ones and validation at image_size;
    history.csv says which size each epoch trained at."""
    from skinscan.model import LesionNet

    seen: list[tuple[bool, int]] = []
    real = LesionNet.features

    def recording(self, x):
        seen.append((self.training, x.shape[-1]))
        return real(self, x)

    monkeypatch.setattr(LesionNet, "features", recording)
    over = {"data": str(isic_mvb), "limit": 48, "epochs": 2, "batch_size": 16, "threads": 2}
    cfg = load_config(overrides={**over, "small_size": 128, "small_epochs": 1})
    train_mod.train(cfg, tmp_path / "run", progress=False)
    train_sizes = [size for training, size in seen if training]
    steps = len(train_sizes) // 2
    assert steps > 0 and train_sizes == [128] * steps + [224] * steps
    assert {size for training, size in seen if not training} == {224}  # validation and calibration
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    sizes = [line.split(",")[history[0].split(",").index("train_size")] for line in history[1:]]
    assert sizes == ["128", "224"]


def test_history_of_a_run_resumed_from_an_older_version_keeps_every_column(tmp_path):
    """A run interrupted before `train_size` existed resumes with rows that have it: no row is lost."""
    path = tmp_path / "history.csv"
    train_mod._write_csv(path, [{"epoch": 1, "val_auc": 0.7}, {"epoch": 2, "val_auc": 0.8, "train_size": 224}])
    assert path.read_text().splitlines() == ["epoch,val_auc,train_size", "1,0.7,", "2,0.8,224"]
