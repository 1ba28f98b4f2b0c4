"""Metrics, calibration and the operating threshold: the one home for AUC, ECE and friends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def roc_auc(y: Sequence[int], p: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score  # lazy: serving imports this module and must stay light

    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def expected_calibration_error(y: Sequence[int], p: Sequence[float], bins: int = 15) -> float:
    """ECE with `bins` equal-width probability bins (those of `reliability_bins`), weighted by bin size."""
    n = len(np.asarray(p))
    return float(sum(b["count"] / n * abs(b["frac_pos"] - b["mean_p"]) for b in reliability_bins(y, p, bins)))


def ece_if_calibrated(
    p: Sequence[float], bins: int = 15, n_sim: int = 1000, seed: int = 0, level: float = 0.90
) -> tuple[float, float, float]:
    """The ECE a perfectly calibrated model would show on a set this size with these probabilities: median
    and `level` interval over `n_sim` simulated sets (probabilities resampled, labels drawn as Bernoulli(p)).

    Binned ECE is biased upwards on small sets: on 118 photos a perfect model scores ~0.08, so an ECE is
    only evidence of miscalibration above this range."""
    p = np.asarray(p, dtype=float)
    rng = np.random.default_rng(seed)
    sims = []
    for _ in range(n_sim):
        q = rng.choice(p, len(p), replace=True)
        sims.append(expected_calibration_error((rng.random(len(q)) < q).astype(int), q, bins))
    lo, mid, hi = np.percentile(sims, [(1 - level) / 2 * 100, 50, (1 + level) / 2 * 100])
    return float(mid), float(lo), float(hi)


def reliability_bins(y: Sequence[int], p: Sequence[float], bins: int = 15) -> list[dict]:
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return [
        {
            "lo": b / bins,
            "hi": (b + 1) / bins,
            "count": int((idx == b).sum()),
            "mean_p": float(p[idx == b].mean()),
            "frac_pos": float(y[idx == b].mean()),
        }
        for b in range(bins)
        if (idx == b).any()
    ]


def fit_temperature(logits: Sequence[float], y: Sequence[int]) -> float:
    """Temperature T minimising the validation negative log-likelihood of sigmoid(logit / T)."""
    from scipy.optimize import minimize_scalar

    z, t = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - t * s))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def threshold_for_sensitivity(y: Sequence[int], p: Sequence[float], target: float) -> float:
    """The highest threshold t such that predicting `p >= t` keeps sensitivity >= target."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    pos = np.sort(p[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive cases: cannot choose a sensitivity-based threshold")
    n = len(pos)
    k = int(np.argmax(np.arange(1, n + 1) / n >= target)) + 1  # fewest positives at or above t (exact ratios)
    return float(pos[k - 1])


def operating_threshold(
    logits: np.ndarray,
    y: np.ndarray,
    sources: Sequence[str],
    target: float,
    *,
    min_cancers: int,
    every_source: bool = True,
) -> tuple[float, float, dict[str, float]]:
    """(temperature, threshold, {source: its own threshold}): a temperature fitted on all `logits`, then the
    highest threshold that keeps sensitivity >= `target` in every source with at least `min_cancers` cancers
    (on all records pooled if none has, or with `every_source=False`). The one rule behind the exported
    model's boundary (`train.operating_point`) and leave-one-source-out's per-type rules (`loso.decision_rule`)."""
    logits, y, src = np.asarray(logits), np.asarray(y), np.asarray(sources)
    temperature = fit_temperature(logits, y)
    p = sigmoid(logits / temperature)
    own = {
        str(s): threshold_for_sensitivity(y[src == s], p[src == s], target)
        for s in sorted(set(src.tolist()))
        if every_source and y[src == s].sum() >= min_cancers
    }
    threshold = min(own.values()) if own else threshold_for_sensitivity(y, p, target)
    return float(temperature), float(threshold), own


@dataclass(frozen=True)
class BinaryMetrics:
    n: int
    n_malignant: int
    auc: float
    auc_ci: tuple[float, float]
    average_precision: float
    sensitivity: float
    specificity: float
    accuracy: float
    ppv: float
    npv: float
    ece: float
    ece_if_calibrated: tuple[float, float, float]  # median and 90% range for a perfect model (see ece_if_calibrated)
    brier: float
    threshold: float | list[float]  # one, or the distinct per-image thresholds (calibration per photo type)
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_auc_ci(
    y: Sequence[int],
    p: Sequence[float],
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval for ROC AUC, resampling whole groups (patients) when given."""
    from sklearn.metrics import roc_auc_score

    y, p = np.asarray(y), np.asarray(p, dtype=float)
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(y))]
    else:
        g = np.asarray(groups)
        _, inv = np.unique(g, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inv))[:-1])
    aucs = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[i] for i in pick])
        if len(np.unique(y[idx])) == 2:
            aucs.append(roc_auc_score(y[idx], p[idx]))
    lo, hi = np.percentile(aucs, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a share of `k` in `n` (e.g. the photos a gate refuses), scipy's: unlike the
    normal approximation it stays inside [0, 1] and is not empty at k = 0, where a refusal rate lives."""
    from scipy.stats import binomtest

    if not 0 <= k <= n:
        raise ValueError(f"a share needs 0 <= k <= n (got k={k}, n={n})")
    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def binary_metrics(
    y: Sequence[int],
    p: Sequence[float],
    threshold: float | Sequence[float],
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
) -> BinaryMetrics:
    """Discrimination, calibration and the confusion matrix at `threshold` (predict malignant if p >= t);
    `threshold` may be one per image (a model that calibrates each photo type on its own)."""
    from sklearn.metrics import average_precision_score, brier_score_loss

    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    t = np.asarray(threshold, dtype=float)
    pred = p >= t
    distinct = sorted({float(v) for v in np.atleast_1d(t)})
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    tn, fn = int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    both = len(np.unique(y)) == 2
    return BinaryMetrics(
        n=len(y),
        n_malignant=int(y.sum()),
        auc=roc_auc(y, p),
        auc_ci=bootstrap_auc_ci(y, p, groups, n_boot=n_boot) if both else (float("nan"), float("nan")),
        average_precision=float(average_precision_score(y, p)) if both else float("nan"),
        sensitivity=ratio(tp, tp + fn),
        specificity=ratio(tn, tn + fp),
        accuracy=ratio(tp + tn, len(y)),
        ppv=ratio(tp, tp + fp),
        npv=ratio(tn, tn + fn),
        ece=expected_calibration_error(y, p),
        ece_if_calibrated=ece_if_calibrated(p, n_sim=n_boot),
        brier=float(brier_score_loss(y, p)),
        threshold=distinct[0] if len(distinct) == 1 else distinct,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )
