"""Lesion-level prediction: several photos of the same lesion combined into one estimate.

The combined estimate averages the photos' logits (the mean of calibrated log-odds), using only the photos
the quality gate accepts (all readable photos when forced); the answers about the lesion, if any, then
adjust the combined estimate once. Measured on the phone set's lesions with several photos:
benchmarks/bench_phone.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from .answers import Answers
from .errors import SkinscanError
from .predict import Prediction, Predictor
from .preprocess import ImageSource

MAX_PHOTOS = 16
# Photos of one spot whose own estimates lie this far apart (in probability) are not combined silently:
# one of them may show another spot, or be misleading; the combined estimate then carries a warning.
DISAGREEMENT = 0.5


@dataclass(frozen=True)
class LesionPrediction:
    """`combined` is the lesion's estimate; `photos` the per-photo (image-only) results it came from.
    `warning` says so when the photos' own estimates disagree strongly (see DISAGREEMENT)."""

    combined: Prediction
    photos: tuple[Prediction, ...]
    n_used: int
    warning: str | None = None

    def to_dict(self) -> dict:
        return {
            "combined": {
                **self.combined.to_dict(),
                "n_photos": len(self.photos),
                "n_used": self.n_used,
                "warning": self.warning,
            },
            "photos": [p.to_dict() for p in self.photos],
        }


def predict_lesion(
    predictor: Predictor,
    sources: Sequence[ImageSource],
    *,
    names: Sequence[str | None] | None = None,
    force: bool = False,
    answers: Answers | None = None,
) -> LesionPrediction:
    """Predict each photo of one lesion, then combine them (see the module docstring)."""
    if not 1 <= len(sources) <= MAX_PHOTOS:
        raise SkinscanError(f"a lesion takes 1 to {MAX_PHOTOS} photos, got {len(sources)}")
    return combine_photos(predictor, predictor.predict(sources, names=names, force=force), answers)


def combine_photos(
    predictor: Predictor, photos: Sequence[Prediction], answers: Answers | None = None
) -> LesionPrediction:
    """Combine per-photo (image-only) predictions of one lesion; answers adjust the combined estimate."""
    photos = tuple(photos)
    used = [i for i, p in enumerate(photos) if p.probability is not None and p.logit is not None]
    usable = [photos[i] for i in used]
    reasons = tuple(
        f"photo {p.path or i + 1} was set aside: {p.error or '; '.join(p.reasons) or 'it could not be judged'}"
        for i, p in enumerate(photos)
        if i not in used
    )
    n = len(photos)
    name = f"combined ({len(used)} of {n} photos)" if len(used) < n else f"combined ({n} photo{'s' * (n > 1)})"
    if not usable:
        combined = Prediction(
            path=name,
            probability=None,
            decision=None,
            threshold=predictor.threshold,
            quality="retake",
            reasons=reasons or ("no photo could be judged: retake the photos",),
        )
        return LesionPrediction(combined, photos, 0)
    logit = float(np.mean([p.logit for p in usable]))
    kinds = [p.photo_type for p in usable]
    photo_type = max(kinds, key=kinds.count)  # the photos' most common detected type (first on a tie)
    probability = float(predictor.calibrate(np.array([logit]), [photo_type])[0])
    threshold = predictor.threshold_for(photo_type)
    quality = "ok" if any(p.quality == "ok" for p in usable) else "retake"
    combined = dataclasses.replace(
        usable[0],
        path=name,
        logit=logit,
        probability=probability,
        decision="refer" if probability >= threshold else "monitor",
        threshold=threshold,
        photo_type=photo_type,
        cam=None,
        quality=quality,
        reasons=reasons,
        quality_report=None,
        timings_ms=MappingProxyType({"photos": round(sum(sum(p.timings_ms.values()) for p in photos), 3)}),
    )
    return LesionPrediction(predictor.adjust(combined, answers), photos, len(usable), _disagreement(usable))


def _disagreement(usable: Sequence[Prediction]) -> str | None:
    probs = [p.probability for p in usable if p.probability is not None]
    if len(probs) < 2 or max(probs) - min(probs) < DISAGREEMENT:
        return None
    return (
        f"the photos disagree strongly (from {min(probs):.0%} to {max(probs):.0%} on their own): check that they "
        "show the same spot; a combined estimate of photos this far apart can mislead, so look at each photo's "
        "own estimate too"
    )
