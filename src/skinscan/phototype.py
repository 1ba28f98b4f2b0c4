"""Calibration per detected photo type: dermoscopic images and phone photos want different temperatures.

A network trained on both kinds is overconfident on phone photos: on the shipped model's validation split
the temperature that fits phone photos best is about 3, against about 1.2 for dermoscopic images, and one
temperature fitted on both (85% dermoscopic) leaves phone probabilities too extreme. So the model card may
carry a `photo_types` section:

- a linear probe on the model's own `embedding` output that tells a dermoscopic image from a phone photo
  (logistic regression on the training photos, labelled by their source, both types weighted alike). A
  photo counts as dermoscopic only when the probe is sure of it (`dermoscopic_min_probability`, 0.9 by
  default), else it is judged as a phone photo: the two mistakes do not cost the same. A phone photo taken
  for a dermoscopic one meets the dermoscopic threshold, which a phone photo's overconfident logits reach
  less often (missed cancers); a dermoscopic image taken for a phone photo only meets the softer phone
  threshold (one more referral). And skinscan's users send phone photos, not the training mix (85%
  dermoscopic). The README gives what the rule changes on the default model's validation split;
- one temperature per type, fitted on the validation photos of that (detected) type;
- one operating threshold per type (a calibrated probability). By default it is the training run's
  threshold, ONE decision boundary in logit units seen through each type's temperature. With
  cross-validated predictions (`cv_thresholds`: the out-of-fold logits of a K-fold run of the same recipe,
  `skinscan export --photo-types --thresholds-from CV_RUN`) each type gets the calibrated probability at
  which that source's out-of-fold predictions keep the target sensitivity: 191 phone cancers instead of the
  validation split's 27.

A card without the section calibrates every photo with the card's `temperature` and `threshold`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SkinscanError
from .metrics import expected_calibration_error, fit_temperature, sigmoid

CARD_SECTION = "photo_types"
SECTION_FORMAT = 2  # 2: a threshold per type (format 1: one `threshold_logit` for all)
PHOTO_TYPES = ("dermoscopic", "phone")
# what kind of photo each training source holds (others: pass `types` explicitly)
SOURCE_PHOTO_TYPE = {
    "isic-mvb": "dermoscopic",
    "ham10000": "dermoscopic",
    "isic-archive-pre2019": "dermoscopic",
    "pad-ufes-20-phone": "phone",
    # clinical (non-dermoscopic) photos: what a phone takes
    "fitzpatrick17k": "phone",
    "dermnet-nz": "phone",
    "sd-198": "phone",
}
MIN_TYPE_IMAGES = 20  # fewer validation photos of a type (or one class only): it keeps the global temperature
# the probe's P(dermoscopic) a photo needs to be judged as dermoscopic (else: phone); a section without the key
# (written before it existed) decides at even odds, 0.5
DERMOSCOPIC_MIN_PROBABILITY = 0.9


def _features(embeddings: np.ndarray) -> np.ndarray:
    from .quality import TRANSFORMS

    return TRANSFORMS["sqrt"](embeddings).astype(np.float64)


@dataclass(frozen=True, eq=False)
class PhotoTypes:
    """The card's `photo_types` section, ready to use."""

    weights: np.ndarray  # (D,) probe on sqrt(embedding): its score is the log-odds of "phone"
    bias: float
    temperatures: Mapping[str, float]
    thresholds: Mapping[str, float]  # calibrated probability, per type
    dermoscopic_min_probability: float = 0.5  # the probe's P(dermoscopic) needed to judge a photo as dermoscopic

    @classmethod
    def from_card(cls, card: Any) -> PhotoTypes | None:
        from .errors import ModelLoadError
        from .quality import decode_array

        d = getattr(card, CARD_SECTION, None) if not isinstance(card, Mapping) else card.get(CARD_SECTION)
        if d is None:
            return None
        try:
            if int(d["format"]) > SECTION_FORMAT:
                raise ValueError(f"format {d['format']} is newer than this skinscan; upgrade it")
            temps = {t: float(d["types"][t]["temperature"]) for t in PHOTO_TYPES}
            if min(temps.values()) <= 0:
                raise ValueError("temperatures must be positive")
            if int(d["format"]) == 1:  # one boundary in logit units
                thresholds = {t: float(sigmoid(float(d["threshold_logit"]) / temps[t])) for t in PHOTO_TYPES}
            else:
                thresholds = {t: float(d["types"][t]["threshold"]) for t in PHOTO_TYPES}
            if not all(0 < v < 1 for v in thresholds.values()):
                raise ValueError("thresholds must lie between 0 and 1")
            q = float(d["probe"].get("dermoscopic_min_probability", 0.5))
            if not 0 < q < 1:
                raise ValueError("probe.dermoscopic_min_probability must lie between 0 and 1")
            return cls(
                decode_array(d["probe"]["weights"], "photo_types.probe.weights"),
                float(d["probe"]["bias"]),
                temps,
                thresholds,
                q,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"the model card's {CARD_SECTION} section is invalid: {exc}") from None

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """The probe's log-odds that each row of `embeddings` (N, D) is a phone photo (both types alike)."""
        return _features(embeddings) @ self.weights.astype(np.float64) + self.bias

    def detect(self, embeddings: np.ndarray) -> list[str]:
        """'dermoscopic' or 'phone' for each row of `embeddings` (N, D): dermoscopic only where the probe's
        P(dermoscopic) reaches `dermoscopic_min_probability`."""
        return _as_types(self.scores(embeddings) > self.boundary)

    @property
    def boundary(self) -> float:
        """The probe score above which a photo is judged as a phone photo (0 at even odds)."""
        q = self.dermoscopic_min_probability
        return float(-np.log(q / (1 - q)))

    def threshold(self, photo_type: str) -> float:
        return self.thresholds[photo_type]


def require_both_types(types: Sequence[str]) -> None:
    """Calibration per photo type needs training photos of both types: a clear error otherwise."""
    present = set(types)
    if not set(PHOTO_TYPES) <= present:
        raise SkinscanError(
            "calibration per photo type needs training photos of both types (dermoscopic and phone); "
            f"this run has {' and '.join(sorted(present)) or 'no'} photos only: export it without --photo-types"
        )


def fit_photo_types(
    train_embeddings: np.ndarray,
    train_types: Sequence[str],
    train_groups: Sequence[str],
    val_embeddings: np.ndarray,
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    val_types: Sequence[str],
    *,
    temperature: float,
    threshold: float,
    cv: Mapping[str, Any] | None = None,
    dermoscopic_min_probability: float = DERMOSCOPIC_MIN_PROBABILITY,
    c: float = 0.1,
    folds: int = 5,
) -> dict:
    """The card section: the probe (fitted on the training photos; its accuracy cross-validated by
    `train_groups` on them and measured on the validation photos), then one temperature per DETECTED type
    on the validation photos, a photo being detected as dermoscopic where the probe's P(dermoscopic) reaches
    `dermoscopic_min_probability`. `temperature` and `threshold` are the card's global ones. Without `cv` each
    type's threshold is the global threshold's logit (temperature * logit(threshold)) seen through the type's
    temperature: one decision boundary. With `cv` (what `cv_thresholds` returns) each type takes its own."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GroupKFold

    from .quality import decode_array, encode_array

    if not 0 < dermoscopic_min_probability < 1:
        raise SkinscanError(f"dermoscopic_min_probability must lie between 0 and 1, not {dermoscopic_min_probability}")
    require_both_types(train_types)
    x = _features(train_embeddings)
    y = np.array([PHOTO_TYPES.index(t) for t in train_types])
    w = np.where(y == 1, 0.5 / (y == 1).sum(), 0.5 / (y == 0).sum()) * len(y)  # both types weigh the same
    held_out = np.zeros(len(y))
    for inside, outside in GroupKFold(n_splits=folds).split(x, y, np.asarray(train_groups)):
        m = LogisticRegression(C=c, max_iter=5000).fit(x[inside], y[inside], sample_weight=w[inside])
        held_out[outside] = m.decision_function(x[outside])
    model = LogisticRegression(C=c, max_iter=5000).fit(x, y, sample_weight=w)
    weights = decode_array(encode_array(model.coef_[0]), "fit")  # fitted = what the card stores
    probe = PhotoTypes(
        weights, float(model.intercept_[0]), dict.fromkeys(PHOTO_TYPES, temperature), {}, dermoscopic_min_probability
    )

    z_thr = float(temperature * np.log(threshold / (1 - threshold)))
    val_logits, val_labels = np.asarray(val_logits, dtype=np.float64), np.asarray(val_labels)
    val_scores = probe.scores(val_embeddings)
    detected, at_even_odds = (np.array(_as_types(val_scores > b)) for b in (probe.boundary, 0.0))
    truth = np.asarray(val_types)
    types: dict[str, dict] = {}
    for t in PHOTO_TYPES:
        m = detected == t
        own = int(m.sum()) >= MIN_TYPE_IMAGES and len(np.unique(val_labels[m])) == 2
        temp = fit_temperature(val_logits[m], val_labels[m]) if own else temperature
        thr = float(cv["types"][t]["threshold"]) if cv else float(sigmoid(z_thr / temp))
        entry: dict[str, Any] = {
            "temperature": temp,
            "threshold": thr,
            "threshold_logit": float(temp * np.log(thr / (1 - thr))),
            "fitted_on": f"{int(m.sum())} validation photos detected as {t}"
            if own
            else f"too few validation photos detected as {t} ({int(m.sum())}): the global temperature",
        }
        if cv:
            entry["threshold_cross_validation"] = cv["types"][t]["cross_validation"]
        if m.any():
            before, after = sigmoid(val_logits[m] / temperature), sigmoid(val_logits[m] / temp)
            entry["validation"] = {
                "n": int(m.sum()),
                "n_malignant": int(val_labels[m].sum()),
                "log_loss_global_temperature": float(log_loss(val_labels[m], before, labels=[0, 1])),
                "log_loss_own_temperature": float(log_loss(val_labels[m], after, labels=[0, 1])),
                "ece_global_temperature": expected_calibration_error(val_labels[m], before),
                "ece_own_temperature": expected_calibration_error(val_labels[m], after),
                "sensitivity_at_threshold": float((after[val_labels[m] == 1] >= thr).mean())
                if val_labels[m].any()
                else None,
            }
        types[t] = entry
    train_truth = y.astype(bool)
    return {
        "format": SECTION_FORMAT,
        "method": (
            f"logistic probe (L2, C={c:g}, both types weighted alike) on sqrt(embedding) tells dermoscopic images "
            f"from phone photos; a photo is judged as dermoscopic where the probe's P(dermoscopic) >= "
            f"{dermoscopic_min_probability:g}, else as a phone photo; a temperature per detected type fitted on the "
            "validation photos (negative log-likelihood)"
        ),
        "threshold_rule": cv["rule"]
        if cv
        else "the training run's threshold: one decision boundary in logit units for every type",
        "probe": {
            "transform": "sqrt",
            "weights": encode_array(weights),
            "bias": float(model.intercept_[0]),
            "dermoscopic_min_probability": float(dermoscopic_min_probability),
        },
        "types": types,
        "fit": {
            "train_photos": {t: int((y == i).sum()) for i, t in enumerate(PHOTO_TYPES)},
            "probe_accuracy_cross_validated": float(((held_out > probe.boundary) == train_truth).mean()),
            "probe_accuracy_validation": float((detected == truth).mean()),
            "probe_validation_confusion": _confusion(truth, detected),
            "probe_validation_confusion_at_even_odds": _confusion(truth, at_even_odds),
            "global_temperature": float(temperature),
            "global_threshold": float(threshold),
        },
    }


def _as_types(is_phone: np.ndarray) -> list[str]:
    return [PHOTO_TYPES[int(v)] for v in is_phone]


def _confusion(truth: np.ndarray, detected: np.ndarray) -> dict[str, int]:
    return {f"{a} as {b}": int(((truth == a) & (detected == b)).sum()) for a in PHOTO_TYPES for b in PHOTO_TYPES}


def cv_thresholds(
    folds: Sequence[int],
    sources: Sequence[str],
    labels: Sequence[int],
    logits: Sequence[float],
    *,
    target: float,
    run: str = "",
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
) -> dict:
    """A threshold per photo type from cross-validated predictions (`oof.csv` of a K-fold run: every photo
    scored by the fold model that did not train on it). Each fold model's logits of one source are put on a
    calibrated scale by their own temperature (fitted on that fold's photos of the source; fold models differ
    in scale), the folds are pooled, and the type's threshold is the highest calibrated probability that
    keeps the pooled sensitivity >= `target`: a probability, so it carries over to the model that ships,
    whose own per-type temperature puts its logits on the same calibrated scale. Each type's evidence also
    gives the pooled out-of-fold AUC (bootstrap interval resampling `groups`, e.g. patients, where given)
    and ECE: the cross-validated figures of the recipe, per source."""
    from .metrics import binary_metrics, threshold_for_sensitivity

    folds, sources = np.asarray(folds), np.asarray(sources)
    groups = np.asarray(groups) if groups is not None else np.arange(len(folds)).astype(str)
    labels, logits = np.asarray(labels).astype(int), np.asarray(logits, dtype=np.float64)
    unknown = sorted(set(sources) - set(SOURCE_PHOTO_TYPE))
    if unknown:
        raise SkinscanError(f"cannot tell which kind of photo {', '.join(unknown)} holds")
    require_both_types([SOURCE_PHOTO_TYPE[s] for s in sources])
    if len(np.unique(folds)) < 2:
        raise SkinscanError("thresholds from cross-validation need the out-of-fold predictions of 2 or more folds")
    types: dict[str, dict] = {}
    for source in sorted(set(sources)):
        t = SOURCE_PHOTO_TYPE[source]
        if t in types:
            raise SkinscanError(f"two sources hold {t} photos: the threshold per type needs one source per type")
        probs, ys, gs, fold_temps = [], [], [], {}
        for f in np.unique(folds):
            m = (folds == f) & (sources == source)
            if len(np.unique(labels[m])) < 2:
                raise SkinscanError(f"fold {f} holds {source} photos of one class only: no temperature to fit")
            temp = fit_temperature(logits[m], labels[m])
            fold_temps[str(int(f))] = temp
            probs.append(sigmoid(logits[m] / temp))
            ys.append(labels[m])
            gs.append(groups[m])
        p, y = np.concatenate(probs), np.concatenate(ys)
        thr = threshold_for_sensitivity(y, p, target)
        pooled = binary_metrics(y, p, thr, list(np.concatenate(gs)), n_boot=n_boot)
        types[t] = {
            "threshold": thr,
            "cross_validation": {
                "source": source,
                "n": len(y),
                "n_malignant": int(y.sum()),
                "sensitivity": pooled.sensitivity,
                "specificity": pooled.specificity,
                "auc": pooled.auc,
                "auc_ci": list(pooled.auc_ci),
                "ece": pooled.ece,
                "ece_if_calibrated": list(pooled.ece_if_calibrated),
                "fold_temperatures": fold_temps,
            },
        }
    where = f" of {run}" if run else ""
    return {
        "types": types,
        "rule": (
            f"per type, the highest calibrated probability that keeps sensitivity >= {target:g} on the pooled "
            f"out-of-fold predictions{where} ({len(np.unique(folds))} folds, each fold's logits calibrated by "
            "its own temperature per source)"
        ),
    }
