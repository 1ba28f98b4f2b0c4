"""AUC, calibration, temperature scaling, the operating threshold and bootstrap intervals, on synthetic data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from skinscan.metrics import (
    binary_metrics,
    bootstrap_auc_ci,
    ece_if_calibrated,
    expected_calibration_error,
    fit_temperature,
    operating_threshold,
    reliability_bins,
    roc_auc,
    sigmoid,
    threshold_for_sensitivity,
    wilson_interval,
)


def calibrated_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities p and labels drawn with exactly those probabilities."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, n)
    return (rng.uniform(0, 1, n) < p).astype(int), p


def scored_sample(n: int, seed: int, separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores where positives score higher on average (AUC well inside (0.5, 1))."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, sigmoid(rng.normal(separation * (2 * y - 1), 1.0))


# ---------------------------------------------------------------- basics
def test_sigmoid_is_stable_at_the_extremes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sigmoid(np.array([-1000.0, -5.0, 0.0, 5.0, 1000.0]))
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == 0.5
    assert np.allclose(out[1:4], 1 / (1 + np.exp(-np.array([-5.0, 0.0, 5.0]))))


@pytest.mark.parametrize("seed", range(3))
def test_roc_auc_matches_sklearn(seed: int) -> None:
    y, p = scored_sample(500, seed)
    p = np.round(p, 2)  # ties too
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert 0.6 < roc_auc(y, p) < 0.95


def test_roc_auc_extremes_and_single_class() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert np.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))


# ---------------------------------------------------------------- calibration
def test_ece_is_small_when_calibrated() -> None:
    y, p = calibrated_sample(20_000, seed=0)
    assert expected_calibration_error(y, p) < 0.02


def test_ece_is_large_when_overconfident() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 20_000)
    y = (rng.uniform(size=z.size) < sigmoid(z)).astype(int)

    calibrated = expected_calibration_error(y, sigmoid(z))
    overconfident = expected_calibration_error(y, sigmoid(4 * z))

    assert calibrated < 0.02
    assert overconfident > 0.1


def test_ece_if_calibrated_shrinks_with_set_size_and_brackets_a_calibrated_model() -> None:
    rng = np.random.default_rng(3)
    p = rng.beta(0.6, 0.8, 5000)
    small, large = ece_if_calibrated(p[:118]), ece_if_calibrated(p[:2000], n_sim=200)
    assert small[1] <= small[0] <= small[2] and large[0] < small[0] / 2
    assert 0.05 < small[0] < 0.12  # a perfect model scores ~0.08 on 118 images: the locked box's size
    y = (rng.random(118) < p[:118]).astype(int)  # labels that follow the probabilities
    assert small[1] * 0.5 <= expected_calibration_error(y, p[:118]) <= small[2] * 1.5
    overconfident = sigmoid(4 * (np.log(p[:118] / (1 - p[:118]))))
    assert expected_calibration_error(y, overconfident) > ece_if_calibrated(overconfident)[2]


def test_ece_of_known_bins() -> None:
    # all predictions 0.8 but only half are positive: ECE = |0.5 - 0.8|
    assert expected_calibration_error([1, 0, 1, 0], [0.8] * 4) == pytest.approx(0.3)
    # p = 1.0 falls in the last bin rather than out of range
    assert expected_calibration_error([1, 1], [1.0, 1.0]) == pytest.approx(0.0)


def test_reliability_bins_count_every_prediction() -> None:
    y, p = calibrated_sample(2_000, seed=2)
    bins = reliability_bins(y, p, bins=10)

    assert sum(b["count"] for b in bins) == len(p)
    for b in bins:
        assert b["lo"] <= b["mean_p"] <= b["hi"]
        assert abs(b["frac_pos"] - b["mean_p"]) < 0.1


@pytest.mark.parametrize("t0", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(t0: float) -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0, 4, 20_000)
    y = (rng.uniform(size=z.size) < sigmoid(z / t0)).astype(int)

    t = fit_temperature(z, y)

    assert t == pytest.approx(t0, abs=0.3 * t0 / 2)
    assert expected_calibration_error(y, sigmoid(z / t)) < expected_calibration_error(y, sigmoid(z))


# ---------------------------------------------------------------- operating threshold
def sensitivity_at(y: np.ndarray, p: np.ndarray, t: float) -> float:
    return float(np.mean(p[y == 1] >= t))


def highest_threshold_brute_force(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """Try every candidate threshold (each score): the highest with sensitivity >= target."""
    return max(t for t in np.unique(p) if sensitivity_at(y, p, t) >= target)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_keeps_sensitivity_and_is_the_highest(target: float) -> None:
    y, p = scored_sample(400, seed=4)

    t = threshold_for_sensitivity(y, p, target)

    assert sensitivity_at(y, p, t) >= target
    assert sensitivity_at(y, p, np.nextafter(t, 1.0)) < target, "any higher threshold loses sensitivity"
    assert t == highest_threshold_brute_force(y, p, target)


def test_threshold_with_tied_scores() -> None:
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.7, 0.7, 0.2, 0.7, 0.1])
    assert threshold_for_sensitivity(y, p, 0.75) == 0.7
    assert threshold_for_sensitivity(y, p, 0.5) == 0.7
    assert threshold_for_sensitivity(y, p, 0.25) == 0.9


@pytest.mark.parametrize(("target", "n_pos"), [(0.56, 25), (0.55, 100)])
def test_threshold_is_highest_when_target_times_positives_is_whole(target: float, n_pos: int) -> None:
    # target * n_pos is a whole number k, but in floating point it lands a hair above k (0.56 * 25 =
    # 14.000000000000002): k positives already meet the target, so the k-th highest score is the answer.
    y = np.r_[np.ones(n_pos, int), np.zeros(10, int)]
    p = np.r_[np.linspace(0.99, 0.01, n_pos), np.full(10, 0.5)]
    k = round(target * n_pos)
    assert k / n_pos >= target

    assert threshold_for_sensitivity(y, p, target) == p[k - 1]


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=2, max_size=60).filter(
        lambda rows: any(pos for pos, _ in rows)
    ),
    target=st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99, 1.0]),
)
def test_threshold_property(scores: list[tuple[bool, int]], target: float) -> None:
    y = np.array([int(pos) for pos, _ in scores])
    p = np.array([s / 20 for _, s in scores])

    t = threshold_for_sensitivity(y, p, target)

    assert sensitivity_at(y, p, t) >= target
    assert t == highest_threshold_brute_force(y, p, target)


def test_threshold_needs_positives() -> None:
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity([0, 0, 0], [0.1, 0.2, 0.3], 0.95)


def test_operating_threshold_holds_the_target_in_every_source_with_enough_cancers() -> None:
    # three sources: "easy" separates well, "hard" barely, "few" has 3 cancers (below min_cancers)
    rng = np.random.default_rng(3)
    parts = [("easy", 400, 2.0), ("hard", 300, 0.5), ("few", 40, 0.0)]
    y = np.concatenate(
        [np.r_[np.ones(3 if s == "few" else n // 3), np.zeros(n - (3 if s == "few" else n // 3))] for s, n, _ in parts]
    )
    sep = np.concatenate([np.full(n, d) for _, n, d in parts])
    logits = rng.normal(sep * (2 * y - 1), 1.0)
    sources = [s for s, n, _ in parts for _ in range(n)]
    temperature, threshold, own = operating_threshold(logits, y, sources, 0.95, min_cancers=5)
    assert temperature == pytest.approx(fit_temperature(logits, y))
    assert set(own) == {"easy", "hard"} and threshold == min(own.values())
    p, src = sigmoid(logits / temperature), np.array(sources)
    for s in ("easy", "hard"):
        m = (src == s) & (y == 1)
        assert (p[m] >= threshold).mean() >= 0.95
    assert own["hard"] < own["easy"]  # the hard source sets the one threshold
    # pooled: the target on all records at once, never stricter than every source's
    _, pooled, none = operating_threshold(logits, y, sources, 0.95, min_cancers=5, every_source=False)
    assert none == {} and pooled == threshold_for_sensitivity(y, p, 0.95) and pooled >= threshold
    # no source with enough cancers: pooled as well
    assert operating_threshold(logits, y, sources, 0.95, min_cancers=1000)[1] == pooled


# ---------------------------------------------------------------- bootstrap intervals
def test_bootstrap_ci_contains_the_auc_and_is_reproducible() -> None:
    y, p = scored_sample(300, seed=5)
    auc = roc_auc(y, p)

    lo, hi = bootstrap_auc_ci(y, p, n_boot=300, seed=0)

    assert lo < auc < hi
    assert 0.01 < hi - lo < 0.2
    assert bootstrap_auc_ci(y, p, n_boot=300, seed=0) == (lo, hi)
    assert bootstrap_auc_ci(y, p, n_boot=300, seed=1) != (lo, hi)


def test_bootstrap_ci_narrows_with_more_data() -> None:
    small = bootstrap_auc_ci(*scored_sample(100, seed=6), n_boot=300)
    large = bootstrap_auc_ci(*scored_sample(2_000, seed=6), n_boot=300)
    assert large[1] - large[0] < (small[1] - small[0]) / 2


def test_grouped_bootstrap_resamples_whole_groups() -> None:
    # every patient photographed 4 times: the copies carry no new information, and only a
    # bootstrap over patients sees that (its interval matches one photo per patient)
    y1, p1 = scored_sample(150, seed=7)
    y, p = np.repeat(y1, 4), np.repeat(p1, 4)
    groups = np.repeat([f"patient{i}" for i in range(150)], 4)
    auc = roc_auc(y, p)

    single = bootstrap_auc_ci(y1, p1, n_boot=400)
    naive = bootstrap_auc_ci(y, p, n_boot=400)
    grouped = bootstrap_auc_ci(y, p, groups=groups, n_boot=400)

    width = {name: ci[1] - ci[0] for name, ci in (("single", single), ("naive", naive), ("grouped", grouped))}
    assert grouped[0] < auc < grouped[1]
    assert width["grouped"] > 1.5 * width["naive"]
    assert width["grouped"] == pytest.approx(width["single"], rel=0.35)


def test_grouped_bootstrap_accepts_unsorted_groups() -> None:
    y, p = scored_sample(200, seed=8)
    groups = np.random.default_rng(0).choice([f"g{i}" for i in range(40)], size=200)
    lo, hi = bootstrap_auc_ci(y, p, groups=groups, n_boot=200)
    assert lo < roc_auc(y, p) < hi


# ---------------------------------------------------------------- all together
def test_binary_metrics_confusion_matrix() -> None:
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.6]

    m = binary_metrics(y, p, threshold=0.6, n_boot=200)

    assert (m.tp, m.fn, m.fp, m.tn) == (2, 1, 2, 2)  # p >= threshold is "malignant"
    assert m.n == 7 and m.n_malignant == 3
    assert m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(2 / 4)
    assert m.ppv == pytest.approx(2 / 4) and m.npv == pytest.approx(2 / 3)
    assert m.accuracy == pytest.approx(4 / 7)
    assert m.auc == pytest.approx(roc_auc_score(y, p))
    assert m.to_dict()["threshold"] == 0.6


def test_binary_metrics_single_class_gives_nan_not_an_error() -> None:
    m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2], threshold=0.5, n_boot=50)
    assert np.isnan(m.auc) and np.isnan(m.sensitivity)
    assert all(np.isnan(v) for v in m.auc_ci)
    assert m.specificity == pytest.approx(2 / 3)


def test_figures_per_recorded_skin_type():
    from pathlib import Path

    from skinscan.data import Record
    from skinscan.evaluate import by_skin_type

    rng = np.random.default_rng(5)
    levels = ["2.0"] * 60 + ["1"] * 30 + [""] * 20 + ["5.0"] * 3  # as the phone set writes them
    labels = [int(rng.random() < 0.5) for _ in levels[:90]] + [0] * 20 + [1] * 3
    records = [
        Record(Path(f"{i}.jpg"), y, "phone", f"{i}.jpg", patient=f"P{i // 2}", meta={"fitspatrick": v})
        for i, (v, y) in enumerate(zip(levels, labels, strict=True))
    ]
    p = np.clip(np.array(labels) * 0.3 + rng.random(len(labels)) * 0.7, 0, 1)
    t = np.full(len(p), 0.5)
    got = by_skin_type(records, p, t, n_boot=100)
    assert list(got) == ["1", "2", "5", "not recorded"]  # "2.0" and "2" are one type; unrecorded last
    for level, ix in (("1", slice(60, 90)), ("2", slice(0, 60))):
        y = np.array(labels[ix])
        assert got[level]["n"] == len(y) and got[level]["n_malignant"] == y.sum()
        assert got[level]["auc"] == pytest.approx(roc_auc(y, p[ix]))
        assert got[level]["auc_ci"][0] <= got[level]["auc"] <= got[level]["auc_ci"][1]
        assert got[level]["sensitivity"] == pytest.approx((p[ix][y == 1] >= 0.5).mean())
    # one class only: no AUC, the one rate that exists
    assert got["not recorded"] == {"n": 20, "n_malignant": 0, "specificity": float((p[90:110] < 0.5).mean())}
    assert got["5"] == {"n": 3, "n_malignant": 3, "sensitivity": float((p[110:] >= 0.5).mean())}
    assert (
        by_skin_type(records[:5], p[:5], t[:5]) != {}
        and by_skin_type([Record(Path("a.jpg"), 1, "isic", "a.jpg")], p[:1], t[:1]) == {}
    )  # nothing recorded: no table


def test_skin_type_groups_of_leave_one_source_out_share_the_figures():
    """loso.skin_type_figures is evaluate.by_group over the groups I-II, III-IV, V-VI of Record.skin_type:
    records of types 1 and 2 are one group, unrecorded ones none, and the figures are by_group's."""
    from pathlib import Path

    from skinscan.data import Record
    from skinscan.evaluate import by_group
    from skinscan.loso import skin_type_figures

    rng = np.random.default_rng(7)
    types = [1] * 20 + [2] * 20 + [4] * 30 + [None] * 10 + [6] * 4
    labels = [int(rng.random() < 0.5) for _ in types[:70]] + [1] * 10 + [0] * 4
    records = [
        Record(Path(f"{i}.jpg"), y, "fitzpatrick17k", f"{i}.jpg", group=f"g{i}", skin_type=s)
        for i, (s, y) in enumerate(zip(types, labels, strict=True))
    ]
    p = np.clip(np.array(labels) * 0.3 + rng.random(len(labels)) * 0.7, 0, 1)
    t = np.full(len(p), 0.4)
    got = skin_type_figures(records, p, t, n_boot=50)
    assert list(got) == ["I-II", "III-IV", "V-VI"]
    assert got["I-II"]["n"] == 40 and got["III-IV"]["n"] == 30 and got["V-VI"] == {"n": 4, "n_malignant": 0,
        "specificity": float((p[80:] < 0.4).mean())}  # fmt: skip
    y = np.array(labels[:40])
    assert got["I-II"]["auc"] == pytest.approx(roc_auc(y, p[:40]))
    keys = ["I-II"] * 40 + ["III-IV"] * 30 + [None] * 14
    assert by_group(records, p, t, keys, ("III-IV",), n_boot=50) == {"III-IV": got["III-IV"]}


def test_wilson_interval_known_values_and_edges() -> None:
    # 81 of 100: Wilson's 95% interval by hand, p +- z sqrt(p q / n + z^2 / 4n^2) around (p + z^2/2n) / (1 + z^2/n)
    assert wilson_interval(81, 100) == pytest.approx((0.7222, 0.8749), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4) and wilson_interval(0, 20)[0] == 0.0
    assert wilson_interval(20, 20)[1] == 1.0
    lo, hi = wilson_interval(3, 40, level=0.5)
    assert lo < 3 / 40 < hi and (hi - lo) < np.subtract(*wilson_interval(3, 40)[::-1])  # narrower at 50%
    assert np.isnan(wilson_interval(0, 0)).all()
    with pytest.raises(ValueError, match="k <= n"):
        wilson_interval(5, 4)
