"""The bundled default model: its quality bar on the de-leaked archive test split, and its card."""

from __future__ import annotations

import numpy as np
import pytest

from skinscan.card import default_model_path
from skinscan.data import load_dataset, without_leaks
from skinscan.metrics import roc_auc
from skinscan.predict import Predictor


@pytest.fixture(scope="module")
def predictor():
    return Predictor()


def test_bundled_model_ships_inside_the_package(predictor):
    assert default_model_path().is_file()
    card = predictor.card
    for key in ("architecture", "preprocessing", "temperature", "threshold", "intended_use", "metrics", "licences"):
        assert getattr(card, key, None) is not None, key
    assert "not a diagnosis" in card.intended_use


@pytest.mark.data
def test_bundled_model_auc_on_deleaked_archive_test(predictor, isic_mvb):
    test = load_dataset(isic_mvb, split="test")
    clean = without_leaks(test, load_dataset(isic_mvb, split="train"))
    assert len(clean) == 646
    results = predictor.predict([r.path for r in clean], batch_size=32, force=True)
    assert all(r.ok for r in results)
    auc = roc_auc([r.label for r in clean], np.array([r.probability for r in results]))
    assert auc >= 0.96, f"bundled model AUC {auc:.4f} on the 646 de-leaked test images is below the 0.96 bar"
