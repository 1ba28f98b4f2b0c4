"""Lesion-level prediction: several photos of one lesion combined (Python API, CLI and HTTP)."""

from __future__ import annotations

import base64
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from skinscan.errors import SkinscanError
from skinscan.lesion import DISAGREEMENT, MAX_PHOTOS, predict_lesion
from skinscan.service import Settings, create_app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PHOTOS = [EXAMPLES / "phone-malignant-bcc.jpg", EXAMPLES / "phone-benign-nevus.jpg", EXAMPLES / "isic-benign-1.jpg"]


def test_combined_estimate_is_the_mean_calibrated_logit(predictor):
    result = predict_lesion(predictor, PHOTOS, force=True)
    logits = [p.logit for p in result.photos]
    assert result.n_used == 3 and len(result.photos) == 3
    assert result.combined.logit == pytest.approx(float(np.mean(logits)))
    # two phone photos and a dermoscopic one: the lesion is calibrated as its photos' most common type
    assert result.combined.photo_type == "phone" and [p.photo_type for p in result.photos].count("phone") == 2
    expected = 1 / (1 + np.exp(-np.mean(logits) / predictor.temperature_for("phone")))
    assert result.combined.probability == pytest.approx(expected)
    assert result.combined.threshold == predictor.threshold_for("phone")
    assert result.combined.decision == ("refer" if expected >= predictor.threshold_for("phone") else "monitor")
    assert min(p.probability for p in result.photos) <= result.combined.probability
    assert result.combined.probability <= max(p.probability for p in result.photos)


def test_one_photo_lesion_equals_the_photo(predictor):
    single = predict_lesion(predictor, PHOTOS[:1], force=True)
    assert single.combined.probability == pytest.approx(predictor(PHOTOS[0], force=True).probability)


def test_unreadable_photos_are_set_aside_with_a_reason(predictor, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo")
    result = predict_lesion(predictor, [PHOTOS[0], bad], force=True)
    assert result.n_used == 1
    assert result.combined.probability == pytest.approx(result.photos[0].probability)
    assert any("bad.jpg" in r and "set aside" in r for r in result.combined.reasons)
    only_bad = predict_lesion(predictor, [bad])
    assert only_bad.combined.probability is None and only_bad.combined.quality == "retake"


def test_photo_count_is_checked(predictor):
    with pytest.raises(SkinscanError, match="1 to"):
        predict_lesion(predictor, [])
    with pytest.raises(SkinscanError, match="1 to"):
        predict_lesion(predictor, PHOTOS[:1] * (MAX_PHOTOS + 1))


def test_cli_lesion_prints_each_photo_and_the_combination():
    out = subprocess.run(
        [sys.executable, "-m", "skinscan", "predict", "--lesion", "--force", *map(str, PHOTOS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(out.stdout.splitlines()))  # piped: CSV rows, each photo then the combination
    assert [r["path"] for r in rows] == [*map(str, PHOTOS), "combined (3 photos)"]


def test_cli_lesion_table_labels_agree_and_show_the_answers(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo")
    out = subprocess.run(
        [sys.executable, "-m", "skinscan", "predict", "--lesion", "--force", "--format", "table", "--bleed", "yes",
         str(PHOTOS[0]), str(PHOTOS[1]), str(bad)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert out.returncode == 3, out.stderr  # one photo could not be read
    text = " ".join(out.stdout.split())
    assert text.count("combined (2 of 3 photos)") == 2  # the table's row and the summary line: one label
    assert "bleeding: odds x" in text and "photo alone" in text
    assert "warning: the photos disagree strongly" in text


def test_strongly_disagreeing_photos_carry_a_warning(predictor):
    agree = predict_lesion(predictor, [PHOTOS[0], PHOTOS[0]], force=True)
    assert agree.warning is None and agree.to_dict()["combined"]["warning"] is None
    apart = predict_lesion(predictor, [EXAMPLES / "isic-malignant-1.jpg", EXAMPLES / "isic-benign-2.jpg"])
    probs = sorted(p.probability for p in apart.photos)
    assert probs[1] - probs[0] >= DISAGREEMENT
    assert (
        apart.warning.startswith("the photos disagree strongly")
        and f"{probs[0]:.0%} to {probs[1]:.0%}" in apart.warning
    )


def test_http_lesion_endpoint(predictor):
    client = TestClient(create_app(Settings(model=predictor.model_path), predictor=predictor))
    with client:
        images = [base64.b64encode(p.read_bytes()).decode() for p in PHOTOS] + ["bm90IGFuIGltYWdl"]
        r = client.post("/v1/predict/lesion?force=true", json={"images": images})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["combined"]["n_photos"] == 4 and body["combined"]["n_used"] == 3
        assert len(body["photos"]) == 4 and body["photos"][3]["error"]
        direct = predict_lesion(predictor, PHOTOS, force=True)
        assert body["combined"]["probability"] == pytest.approx(direct.combined.probability, abs=1e-6)
        too_many = client.post("/v1/predict/lesion", json={"images": images[:1] * (MAX_PHOTOS + 1)})
        assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_images"
