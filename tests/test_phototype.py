"""Calibration per detected photo type (skinscan.phototype): the probe, the fit, and how predictions use it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from skinscan.errors import ModelLoadError
from skinscan.metrics import expected_calibration_error, roc_auc, sigmoid
from skinscan.phototype import CARD_SECTION, PhotoTypes, cv_thresholds, fit_photo_types
from skinscan.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _synthetic(rng: np.random.Generator, n: int, temperatures: dict[str, float]):
    """Embeddings whose first feature tells the type; logits = T_type * true log-odds, labels drawn from them."""
    types = np.array(["dermoscopic"] * (n // 2) + ["phone"] * (n - n // 2))
    emb = rng.random((n, 16)).astype(np.float32)
    emb[:, 0] = np.where(types == "phone", 25.0, 0.25) + 0.1 * rng.random(n)  # a probe sure of either type
    log_odds = rng.normal(0, 2.0, n)
    labels = (rng.random(n) < sigmoid(log_odds)).astype(int)
    logits = log_odds * np.array([temperatures[t] for t in types])
    return emb, types, logits, labels


def test_fit_recovers_a_temperature_per_type_and_keeps_one_decision_boundary():
    rng = np.random.default_rng(0)
    truth = {"dermoscopic": 1.2, "phone": 3.0}
    emb, types, _, _ = _synthetic(rng, 400, truth)
    v_emb, v_types, v_logits, v_labels = _synthetic(rng, 4000, truth)
    section = fit_photo_types(
        emb, types, [f"g{i // 2}" for i in range(len(types))], v_emb, v_logits, v_labels, v_types,
        temperature=1.6, threshold=0.1,
    )  # fmt: skip
    assert section["fit"]["probe_accuracy_cross_validated"] > 0.99
    assert section["fit"]["probe_accuracy_validation"] > 0.99
    for t, want in truth.items():
        got = section["types"][t]
        assert got["temperature"] == pytest.approx(want, rel=0.15)
        assert got["validation"]["log_loss_own_temperature"] < got["validation"]["log_loss_global_temperature"]
    # without cross-validated thresholds, one boundary in logit units: the global threshold's logit seen
    # through each type's temperature
    z = 1.6 * np.log(0.1 / 0.9)
    types_back = PhotoTypes.from_card({CARD_SECTION: section})
    for t in truth:
        assert section["types"][t]["threshold_logit"] == pytest.approx(z)
        assert types_back.threshold(t) == pytest.approx(sigmoid(z / section["types"][t]["temperature"]))
    assert types_back.detect(v_emb[:50]) == list(v_types[:50])


def _oof(rng: np.random.Generator, n: int, fold_scales: list[float], source: str, spread: float):
    """Out-of-fold logits of one source: each fold model sees the true log-odds on its own scale."""
    folds = rng.integers(0, len(fold_scales), n)
    log_odds = rng.normal(0, spread, n)
    labels = (rng.random(n) < sigmoid(log_odds)).astype(int)
    return folds, [source] * n, labels, log_odds * np.take(fold_scales, folds)


def test_thresholds_from_cross_validation_keep_the_target_on_each_source():
    rng = np.random.default_rng(2)
    derm = _oof(rng, 3000, [1.0, 1.5, 2.0], "isic-mvb", 3.0)
    phone = _oof(rng, 2400, [2.0, 4.0, 3.0], "pad-ufes-20-phone", 1.5)  # harder: less separable
    folds, sources, labels, logits = (np.concatenate([a, b]) for a, b in zip(derm, phone, strict=True))
    patients = [f"p{i // 2}" for i in range(len(folds))]  # two photos per patient
    cv = cv_thresholds(folds, sources, labels, logits, target=0.9, run="cv-run", groups=patients, n_boot=200)
    assert set(cv["types"]) == {"dermoscopic", "phone"} and "0.9" in cv["rule"] and "cv-run" in cv["rule"]
    for t, scales, data in (("dermoscopic", [1.0, 1.5, 2.0], derm), ("phone", [2.0, 4.0, 3.0], phone)):
        got = cv["types"][t]
        assert [got["cross_validation"]["fold_temperatures"][str(f)] for f in range(3)] == pytest.approx(
            scales, rel=0.2
        )
        f, _, y, z = data
        temps = np.array([got["cross_validation"]["fold_temperatures"][str(i)] for i in f])
        p = sigmoid(z / temps)
        sens = (p[y == 1] >= got["threshold"]).mean()
        assert sens >= 0.9 and sens == pytest.approx(got["cross_validation"]["sensitivity"])
        assert (p[y == 1] >= np.nextafter(got["threshold"], 1)).mean() < 0.9  # the highest such threshold
        # the pooled out-of-fold figures of the source, with an interval
        c = got["cross_validation"]
        assert c["auc"] == pytest.approx(roc_auc(y, p)) and c["auc_ci"][0] < c["auc"] < c["auc_ci"][1]
        assert c["ece"] == pytest.approx(expected_calibration_error(y, p))
        assert c["ece"] < 0.05  # each fold's own temperature calibrates it (the data are calibrated by design)
    # the less separable phone photos need a lower probability to keep the same sensitivity
    assert cv["types"]["phone"]["threshold"] < cv["types"]["dermoscopic"]["threshold"]

    # a threshold per type in the card section, read back as is
    emb, types, _, _ = _synthetic(rng, 200, {"dermoscopic": 1.0, "phone": 3.0})
    v_emb, v_types, v_logits, v_labels = _synthetic(rng, 400, {"dermoscopic": 1.0, "phone": 3.0})
    section = fit_photo_types(
        emb, types, [str(i) for i in range(len(types))], v_emb, v_logits, v_labels, v_types,
        temperature=1.7, threshold=0.2, cv=cv,
    )  # fmt: skip
    assert section["format"] == 2 and section["threshold_rule"] == cv["rule"]
    back = PhotoTypes.from_card({CARD_SECTION: section})
    for t, data in (("dermoscopic", derm), ("phone", phone)):
        assert back.threshold(t) == cv["types"][t]["threshold"]
        assert section["types"][t]["threshold_cross_validation"]["n"] == len(data[0])
        temp = section["types"][t]["temperature"]
        assert sigmoid(section["types"][t]["threshold_logit"] / temp) == pytest.approx(back.threshold(t))


def test_thresholds_from_cross_validation_refuse_what_they_cannot_use():
    from skinscan.errors import SkinscanError

    rng = np.random.default_rng(3)
    folds, sources, labels, logits = _oof(rng, 300, [1.0, 2.0], "isic-mvb", 2.0)
    with pytest.raises(SkinscanError, match="both types"):
        cv_thresholds(folds, sources, labels, logits, target=0.95)
    with pytest.raises(SkinscanError, match="cannot tell"):
        cv_thresholds(folds, ["elsewhere"] * 300, labels, logits, target=0.95)
    phone = _oof(rng, 200, [1.0, 2.0], "pad-ufes-20-phone", 2.0)
    both = [np.concatenate([a, b]) for a, b in zip((folds, sources, labels, logits), phone, strict=True)]
    with pytest.raises(SkinscanError, match="2 or more folds"):
        cv_thresholds(np.zeros(500, int), *both[1:], target=0.95)


def test_a_format_1_section_keeps_one_boundary():
    from skinscan.quality import encode_array

    temps = {"dermoscopic": 1.2, "phone": 2.5}
    section = {
        "format": 1,
        "probe": {"weights": encode_array(np.zeros(4)), "bias": 0.0},
        "threshold_logit": -2.5,
        "types": {t: {"temperature": v} for t, v in temps.items()},
    }
    back = PhotoTypes.from_card({CARD_SECTION: section})
    for t, v in temps.items():
        assert back.threshold(t) == pytest.approx(sigmoid(-2.5 / v))


def test_a_photo_is_judged_dermoscopic_only_where_the_probe_is_sure():
    from skinscan.errors import SkinscanError
    from skinscan.quality import encode_array

    # one feature: the probe's score is 2 * sqrt(x) - 3, so x = ((score + 3) / 2) ** 2
    scores = np.array([-2.9, -2.5, -1.0, 0.5, 3.0])
    emb = (((scores + 3) / 2) ** 2)[:, None]
    section = {
        "format": 2,
        "probe": {"weights": encode_array(np.array([2.0])), "bias": -3.0},
        "types": {t: {"temperature": 1.0, "threshold": 0.2} for t in ("dermoscopic", "phone")},
    }
    even = PhotoTypes.from_card({CARD_SECTION: section})  # a section written before the key: even odds
    assert even.dermoscopic_min_probability == 0.5 and even.boundary == 0
    assert even.scores(emb) == pytest.approx(scores)
    assert even.detect(emb) == ["dermoscopic"] * 3 + ["phone"] * 2
    section["probe"]["dermoscopic_min_probability"] = 0.9  # P(dermoscopic) >= 0.9: score <= -log(9) = -2.197
    sure = PhotoTypes.from_card({CARD_SECTION: section})
    assert sure.boundary == pytest.approx(-np.log(9))
    assert sure.detect(emb) == ["dermoscopic"] * 2 + ["phone"] * 3
    section["probe"]["dermoscopic_min_probability"] = 1.0
    with pytest.raises(ModelLoadError, match="dermoscopic_min_probability"):
        PhotoTypes.from_card({CARD_SECTION: section})

    # the fit stores the rule, detects the validation photos with it and counts what it changed
    rng = np.random.default_rng(4)
    t_emb, t_types, _, _ = _synthetic(rng, 300, {"dermoscopic": 1.0, "phone": 2.0})
    v_emb, v_types, v_logits, v_labels = _synthetic(rng, 600, {"dermoscopic": 1.0, "phone": 2.0})
    v_emb[:, 0] = rng.uniform(0.25, 25.0, len(v_emb))  # many photos between the two types
    fits = {}
    for q in (0.5, 0.9):
        fits[q] = fit_photo_types(
            t_emb, t_types, [str(i) for i in range(len(t_types))], v_emb, v_logits, v_labels, v_types,
            temperature=1.5, threshold=0.2, dermoscopic_min_probability=q,
        )  # fmt: skip
        assert fits[q]["probe"]["dermoscopic_min_probability"] == q
        assert f">= {q:g}" in fits[q]["method"]
    as_phone = {q: f["types"]["phone"]["validation"]["n"] for q, f in fits.items()}
    assert as_phone[0.9] > as_phone[0.5]
    assert fits[0.9]["fit"]["probe_validation_confusion_at_even_odds"] == fits[0.5]["fit"]["probe_validation_confusion"]
    with pytest.raises(SkinscanError, match="between 0 and 1"):
        fit_photo_types(
            t_emb, t_types, list(map(str, range(len(t_types)))), v_emb, v_logits, v_labels, v_types,
            temperature=1.5, threshold=0.2, dermoscopic_min_probability=0,
        )  # fmt: skip


def test_a_type_with_too_few_validation_photos_keeps_the_global_temperature():
    rng = np.random.default_rng(1)
    emb, types, _, _ = _synthetic(rng, 200, {"dermoscopic": 1.0, "phone": 3.0})
    v_emb, v_types, v_logits, v_labels = _synthetic(rng, 400, {"dermoscopic": 1.0, "phone": 3.0})
    keep = (v_types == "dermoscopic") | (np.arange(len(v_types)) % 40 == 0)  # ~5 phone photos
    section = fit_photo_types(
        emb, types, [str(i) for i in range(len(types))], v_emb[keep], v_logits[keep], v_labels[keep], v_types[keep],
        temperature=1.7, threshold=0.2,
    )  # fmt: skip
    assert section["types"]["phone"]["temperature"] == 1.7
    assert "too few" in section["types"]["phone"]["fitted_on"]


def test_the_default_model_tells_dermoscopic_from_phone_photos_and_calibrates_each(predictor):
    if predictor.photo_types is None:
        pytest.fail("the bundled default model should carry a photo_types section (export --photo-types)")
    names = sorted(p.name for p in EXAMPLES.glob("*.jpg"))  # four archive images, two phone photos
    results = predictor.predict([EXAMPLES / name for name in names], force=True)
    typed = dict(zip(names, (r.photo_type for r in results), strict=True))
    # a phone photo judged dermoscopic would get the threshold that refers less: never on these
    assert all(typed[n] == "phone" for n in names if n.startswith("phone-")), typed
    # the rule errs the other way: a dermoscopic image the probe is unsure of counts as a phone photo
    # (2026.12.07-sources: isic-malignant-1.jpg, hairs and bubbles and no field edge); the probe's
    # accuracy is measured on held-out photos below
    archive = [typed[n] for n in names if n.startswith("isic-")]
    assert archive.count("dermoscopic") >= 3, typed
    section = predictor.card.photo_types
    for r in results:
        t = predictor.photo_types.temperatures[r.photo_type]
        assert r.probability == pytest.approx(float(sigmoid(r.logit / t)), abs=1e-9)
        assert r.threshold == predictor.threshold_for(r.photo_type) == section["types"][r.photo_type]["threshold"]
        assert r.decision == ("refer" if r.probability >= r.threshold else "monitor")
        # the type's threshold in logit units tells the same
        assert r.decision == ("refer" if r.logit >= section["types"][r.photo_type]["threshold_logit"] else "monitor")
    temps = predictor.photo_types.temperatures
    assert temps["phone"] > temps["dermoscopic"]  # phone photos need the softer temperature
    # a boundary per type, chosen again by `skinscan fit-thresholds` (the rule leave-one-source-out chose: a
    # sensitivity target in every source of the type, on the validation photos), in logit units, seen through
    # each type's temperature; the run's one boundary kept beside it
    card = predictor.card
    fit = section["threshold_fit"]
    assert fit["target"] > 0.95 and f">= {fit['target']:g} in every source" in section["threshold_rule"]
    boundary = card.temperature * np.log(card.threshold / (1 - card.threshold))
    for t in ("phone", "dermoscopic"):
        e = section["types"][t]
        assert e["threshold_logit"] == pytest.approx(e["temperature"] * np.log(e["threshold"] / (1 - e["threshold"])))
        assert fit["previous_thresholds"][t]["threshold_logit"] == pytest.approx(boundary, abs=1e-9)


def test_the_probe_on_real_photos(predictor, isic_mvb, pad_ufes):
    """Photos the probe never saw: the archive's test split and the model's validation phone photos."""
    from skinscan.data import load_dataset

    held_out = predictor.card.validation_keys
    phone = [r.path for r in load_dataset(pad_ufes) if r.uid in held_out][:60]
    assert len(phone) >= 40
    archive = [r.path for r in load_dataset(isic_mvb) if r.split == "test"][::10][:60]
    got = predictor.predict(phone + archive, force=True, batch_size=32)
    want = ["phone"] * len(phone) + ["dermoscopic"] * len(archive)
    accuracy = np.mean([r.photo_type == w for r, w in zip(got, want, strict=True)])
    assert accuracy >= 0.9, accuracy


def test_phone_photos_in_a_wide_frame_are_judged_as_phone_photos(predictor, pad_ufes):
    """A user's 4:3 frame with the lesion photo inside a wider field of skin resembles neither source; the
    probe's rule (dermoscopic only where it is sure) keeps most such frames on the phone photos' threshold."""
    from PIL import Image

    from skinscan.data import load_dataset

    held_out = predictor.card.validation_keys
    rng = np.random.default_rng(0)
    frames = []
    for r in [r for r in load_dataset(pad_ufes) if r.uid in held_out][:40]:
        with Image.open(r.path) as img:
            px = np.asarray(img.convert("RGB").resize((256, 256)), dtype=np.float64)
        skin = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]]).mean(axis=0)
        field = skin + rng.normal(0, 4, (480, 640, 3)) + np.linspace(-12, 12, 640)[None, :, None]
        field[112:368, 192:448] = px
        frames.append(Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)))
    got = predictor.predict(frames, force=True)
    as_phone = np.mean([r.photo_type == "phone" for r in got])
    assert predictor.photo_types.dermoscopic_min_probability > 0.5
    assert as_phone >= 0.75, as_phone
    # at even odds (the probe alone) no more of them would be (the phone-first default: 0.16 fewer; this
    # default, trained on clinical photos too, tells such frames apart better: 0.85 against 0.95)
    from skinscan.preprocess import load_pixels, normalise

    emb = predictor.run(normalise(np.stack([load_pixels(f, predictor.spec) for f in frames]), predictor.spec))
    scores = predictor.photo_types.scores(emb["embedding"])
    assert [("phone" if s > predictor.photo_types.boundary else "dermoscopic") for s in scores] == [
        r.photo_type for r in got
    ]
    assert (scores > 0).mean() <= as_phone


def test_answers_and_lesions_use_the_photo_types_temperature(predictor):
    from skinscan.answers import Answers
    from skinscan.lesion import predict_lesion

    photo = EXAMPLES / "phone-benign-nevus.jpg"
    plain = predictor(photo, force=True)
    answered = predictor(photo, force=True, answers=Answers(bleed="yes"))
    t = predictor.temperature_for(plain.photo_type)
    shift = sum(a.log_odds for a in answered.adjustments)
    assert answered.probability == pytest.approx(float(sigmoid(plain.logit / t + shift)), abs=1e-9)
    assert answered.threshold == plain.threshold
    lesion = predict_lesion(predictor, [photo, EXAMPLES / "phone-malignant-bcc.jpg"], force=True).combined
    assert lesion.photo_type == "phone"
    assert lesion.probability == pytest.approx(float(sigmoid(lesion.logit / t)), abs=1e-9)


def test_a_card_without_the_section_calibrates_every_photo_alike(tmp_path, model_path):
    from skinscan.card import write_card

    copy = tmp_path / "plain.onnx"
    copy.write_bytes(model_path.read_bytes())
    card = json.loads(model_path.with_suffix(".card.json").read_text())
    card.pop(CARD_SECTION, None)
    write_card(copy, card)
    plain = Predictor(copy)
    r = plain(EXAMPLES / "phone-benign-nevus.jpg", force=True)
    assert plain.photo_types is None and r.photo_type is None
    assert r.probability == pytest.approx(float(sigmoid(r.logit / plain.card.temperature)), abs=1e-9)
    assert r.threshold == plain.card.threshold

    card[CARD_SECTION] = {"format": 1, "probe": {"weights": "nonsense", "bias": 0}, "types": {}}
    write_card(copy, card)
    with pytest.raises(ModelLoadError, match="photo_types"):
        Predictor(copy)
