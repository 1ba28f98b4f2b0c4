"""Leave-one-source-out evaluation: train on every source but one, score the one held out.

It is the proxy for image sets skinscan never sees (other cameras, dermatoscopes, skin types): each
held-out unit is a source (`Record.source`) that no choice saw, scored beside the in-source figure of one
pooled source-stratified grouped K-fold run. Two protocols:

- `frozen`: ImageNet EfficientNet-Lite features of every image (computed once, cached), then logistic
  regression heads for malignancy and diagnosis, drawn as the training sampler draws
  (`data.sampling_weights`). Minutes on a CPU: for choosing data, balance and decision rules. It cannot see
  augmentation or fine-tuning, so it ranks recipes, it does not predict the shipped model's figures.
- `finetune`: the whole training recipe per held-out unit (`train.train` without that source), scored by
  the best checkpoint. For a GPU (one Lite0 run takes about a minute there, close to an hour here).

Decisions travel the way the shipped model makes them: a temperature and a threshold per photo type
(dermoscopic or phone, known here from each source), fitted on out-of-fold predictions of the training
sources only; the threshold is the highest that keeps `target` sensitivity in every training source of
that type with enough cancers. The held-out unit then shows whether that sensitivity holds on a source
never seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics
from .data import DIAGNOSES, Record, grouped_kfold, prior_shift, sampling_weights
from .errors import SkinscanError
from .phototype import SOURCE_PHOTO_TYPE
from .preprocess import PreprocessSpec, load_pixels
from .quality import CARD_SECTION, NOT_A_LESION, QualityGate, fit_quality_gate

log = logging.getLogger(__name__)

MIN_CANCERS_FOR_THRESHOLD = 20  # a training source with fewer cancers does not set its type's threshold
SKIN_TYPE_GROUPS = {1: "I-II", 2: "I-II", 3: "III-IV", 4: "III-IV", 5: "V-VI", 6: "V-VI"}
SKIN_GROUP_ORDER = ("I-II", "III-IV", "V-VI")
PHONE_DIAGNOSES = ("melanoma", "bcc", "scc", "actinic_keratosis", "nevus", "benign_keratosis")


@dataclass(frozen=True)
class Recipe:
    """What a frozen-protocol head learns from: the sampler's balance and the diagnosis head's use."""

    name: str
    sources: tuple[str, ...] | None = None  # train only on these sources (None: every source but the held-out)
    source_weights: dict[str, float] | None = None
    source_balance: float = 1.0
    diagnosis_balance: float = 1.0
    target_sensitivity: float = 0.95
    C: float = 0.5  # inverse L2 strength of the logistic regressions (features standardised)
    components: int = 256  # principal components of the training features the heads see (speed; None: all)


# ---------------------------------------------------------------------------------------------- features
def embed(
    records: Sequence[Record],
    spec: PreprocessSpec,
    arch: str = "efficientnet-lite0",
    cache: Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """ImageNet features (global-average-pooled last feature map) of each record's preprocessed image.

    Cached in `cache` (an .npz keyed by record uid and the file's md5-free identity): a rerun embeds only
    the images it lacks. Needs the `train` extra (torch)."""
    from tqdm.auto import tqdm

    from .model import LesionNet
    from .train import torch

    stored: dict[str, np.ndarray] = {}
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            stored = dict(zip((str(k) for k in z["uids"]), z["features"], strict=True))
    todo = [r for r in records if r.uid not in stored]
    if todo:
        net = LesionNet(arch, pretrained=True, image_size=spec.size).eval().to(memory_format=torch.channels_last)
        from .preprocess import normalise

        bar = tqdm(total=len(todo), desc="embedding (ImageNet features)", unit="img", disable=not progress)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            px = np.stack([load_pixels(r.path, spec) for r in chunk])
            with torch.inference_mode():
                x = torch.from_numpy(normalise(px, spec)).contiguous(memory_format=torch.channels_last)
                feats = net.features(x).mean(dim=(2, 3)).numpy()
            stored.update(zip((r.uid for r in chunk), feats, strict=True))
            bar.update(len(chunk))
            if cache is not None and (i // batch_size) % 20 == 19:  # never lose more than ~1300 images' work
                _save_cache(cache, stored)
        bar.close()
        if cache is not None:
            _save_cache(cache, stored)
    return np.stack([stored[r.uid] for r in records]).astype(np.float32)


def _save_cache(path: Path, stored: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, uids=np.array(list(stored)), features=np.stack(list(stored.values())))
    tmp.replace(path)


def cache_name(spec: PreprocessSpec, arch: str) -> str:
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return f"features-{arch}-{digest}.npz"


# ------------------------------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class Scores:
    """Out-of-sample scores of some records: malignancy logits and balanced diagnosis log-probabilities."""

    logits: np.ndarray
    diagnosis: np.ndarray  # (N, len(DIAGNOSES)); -inf for classes the training data lacked


def fit_and_score(x_train: np.ndarray, train: Sequence[Record], x_test: np.ndarray, recipe: Recipe) -> Scores:
    """Logistic-regression heads fitted on `train` with the sampler's weights; scores of `x_test`.

    The diagnosis scores divide out the training prior (the sampler's diagnosis shares), so every class
    counts alike: balanced accuracy is what the diagnosis head is judged by."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    w = sampling_weights(train, recipe.source_weights, recipe.source_balance, recipe.diagnosis_balance)
    w = w * len(train)  # mean weight 1: C keeps its meaning
    steps = [StandardScaler()] + (
        [PCA(recipe.components, random_state=0), StandardScaler()] if recipe.components else []
    )
    scaler = make_pipeline(*steps).fit(x_train)  # fitted on the training images only
    xa, xb = scaler.transform(x_train), scaler.transform(x_test)
    y = np.array([r.label for r in train])
    mal = LogisticRegression(C=recipe.C, max_iter=2000).fit(xa, y, sample_weight=w)
    logits = mal.decision_function(xb)

    has = np.array([r.diagnosis is not None for r in train])
    diag = np.full((len(x_test), len(DIAGNOSES)), -np.inf)
    if has.sum() and len({r.diagnosis for r in train if r.diagnosis}) >= 2:
        d = np.array([DIAGNOSES.index(r.diagnosis) for r in train if r.diagnosis])
        head = LogisticRegression(C=recipe.C, max_iter=2000).fit(xa[has], d, sample_weight=w[has])
        prior = np.bincount(d, weights=w[has], minlength=len(DIAGNOSES))
        prior = prior / prior.sum()
        with np.errstate(divide="ignore"):
            logp = head.predict_log_proba(xb) - np.log(prior[head.classes_])
        diag[:, head.classes_] = logp
    return Scores(logits, diag)


# ----------------------------------------------------------------------------------------- decision rule
def photo_type(source: str) -> str:
    try:
        return SOURCE_PHOTO_TYPE[source]
    except KeyError:
        raise SkinscanError(f"source {source!r}: which kind of photo (dermoscopic or phone) is not known") from None


def decision_rule(
    logits: np.ndarray,
    records: Sequence[Record],
    target: float,
    *,
    per_type: bool = True,
    every_source: bool = True,
    min_cancers: int = MIN_CANCERS_FOR_THRESHOLD,
) -> dict[str, dict[str, float]]:
    """{photo type: {temperature, threshold}} from out-of-fold logits of training records: a temperature
    per type, then the highest threshold that keeps `target` sensitivity in every source of that type
    with at least `min_cancers` cancers (all of the type's records if none has). `per_type=False`: one
    temperature and threshold for every photo (key "any"), as `train.operating_point` sets the exported
    model's boundary; `every_source=False`: the target on the type's records pooled, not in each source."""
    y = np.array([r.label for r in records])
    types = np.array([photo_type(r.source) if per_type else "any" for r in records])
    src = np.array([r.source for r in records])
    rule = {}
    for t in sorted(set(types)):
        m = types == t
        temperature, threshold, _ = metrics.operating_threshold(
            logits[m], y[m], src[m], target, min_cancers=min_cancers, every_source=every_source
        )
        rule[t] = {"temperature": temperature, "threshold": threshold}
    return rule


def apply_rule(logits: np.ndarray, records: Sequence[Record], rule: dict[str, dict[str, float]]):
    """Calibrated probabilities and thresholds of each record under `rule` (its type's; the other type's
    when the rule has none of that type)."""
    p, t = np.empty(len(records)), np.empty(len(records))
    for i, r in enumerate(records):
        kind = photo_type(r.source)
        entry = rule.get(kind) or next(iter(rule.values()))
        p[i] = metrics.sigmoid(logits[i] / entry["temperature"])
        t[i] = entry["threshold"]
    return p, t


# ------------------------------------------------------------------------------------------------ figures
def unit_figures(records: Sequence[Record], p: np.ndarray, t: np.ndarray, diag: np.ndarray, n_boot: int) -> dict:
    """Everything reported for one held-out unit (or one source's out-of-fold predictions)."""
    y = np.array([r.label for r in records])
    groups = [r.patient or r.group for r in records]
    out: dict = {"n": len(records), "n_malignant": int(y.sum())}
    refer = p >= t
    if 0 < y.sum() < len(y):
        m = metrics.binary_metrics(y, p, t, groups, n_boot=n_boot)
        out |= {"auc": m.auc, "auc_ci": list(m.auc_ci), "sensitivity": m.sensitivity, "specificity": m.specificity}
        out |= {"ece": m.ece, "threshold": m.threshold}
    out |= referral_figures(records, refer)
    out |= diagnosis_figures(records, diag)
    skin = skin_type_figures(records, p, t, n_boot)
    if skin:
        out["by_skin_type_group"] = skin
    return out


def referral_figures(records: Sequence[Record], refer: np.ndarray) -> dict:
    """The decisions' figures beside sensitivity and specificity: melanoma sensitivity on its own (where
    melanomas are recorded) and specificity with actinic keratoses left out (where the benign photos hold
    some; AK is labelled benign but is treated, docs/sources.md)."""
    y = np.array([r.label for r in records])
    out: dict = {}
    mel = np.array([r.diagnosis == "melanoma" for r in records])
    if mel.any():
        out["melanoma_sensitivity"] = float(refer[mel].mean())
        out["n_melanoma"] = int(mel.sum())
    benign_no_ak = (y == 0) & np.array([r.diagnosis != "actinic_keratosis" for r in records])
    if benign_no_ak.any() and benign_no_ak.sum() < (y == 0).sum():
        out["specificity_without_ak"] = float((~refer[benign_no_ak]).mean())
    return out


def diagnosis_figures(records: Sequence[Record], diag: np.ndarray, classes: Sequence[str] | None = None) -> dict:
    """Balanced accuracy of the diagnosis scores over the classes present (>= 5 images each), restricted to
    `classes` when given; with each class's recall."""
    from sklearn.metrics import balanced_accuracy_score

    idx = [i for i, r in enumerate(records) if r.diagnosis and (classes is None or r.diagnosis in classes)]
    if not idx or not np.isfinite(diag[idx]).any():
        return {}
    truth = [records[i].diagnosis for i in idx]
    counts = {c: truth.count(c) for c in set(truth)}
    keep = [i for i, c in zip(idx, truth, strict=True) if counts[c] >= 5]
    if len({records[i].diagnosis for i in keep}) < 2:
        return {}
    y = [records[i].diagnosis for i in keep]
    pred = [DIAGNOSES[int(np.argmax(diag[i]))] for i in keep]
    recall = {c: float(np.mean([q == c for q, yy in zip(pred, y, strict=True) if yy == c])) for c in sorted(set(y))}
    with warnings.catch_warnings():  # predicting a class absent from `y` is a mistake like any other here
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        accuracy = float(balanced_accuracy_score(y, pred))
    return {"diagnosis_balanced_accuracy": accuracy, "diagnosis_recall": recall}


def skin_type_figures(records: Sequence[Record], p: np.ndarray, t: np.ndarray, n_boot: int) -> dict:
    """AUC [interval], sensitivity and specificity per skin-type group (I-II, III-IV, V-VI) where recorded."""
    from .evaluate import by_group

    return by_group(records, p, t, [SKIN_TYPE_GROUPS.get(r.skin_type) for r in records], SKIN_GROUP_ORDER, n_boot)


# ------------------------------------------------------------------------------------------------ protocol
def _oof(x: np.ndarray, records: Sequence[Record], recipe: Recipe, k: int, seed: int) -> Scores:
    """Out-of-fold scores of `records` from K grouped folds (each fold's heads fitted on the others)."""
    index = {r.uid: i for i, r in enumerate(records)}
    logits = np.empty(len(records))
    diag = np.full((len(records), len(DIAGNOSES)), -np.inf)
    for train, val in grouped_kfold(list(records), k, seed):
        ti = np.array([index[r.uid] for r in train])
        vi = np.array([index[r.uid] for r in val])
        s = fit_and_score(x[ti], train, x[vi], recipe)
        logits[vi], diag[vi] = s.logits, s.diagnosis
    return Scores(logits, diag)


def frozen_loso(
    records: Sequence[Record],
    x: np.ndarray,
    recipe: Recipe,
    units: Sequence[str] | None = None,
    inner_folds: int = 3,
    in_source_folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    progress: Callable[[str], None] | None = None,
    held_out: bool = True,
) -> dict:
    """The frozen protocol's table: per held-out unit, figures of heads trained on the other sources (the
    decision rule from their inner out-of-fold scores); and per source, the pooled in-source K-fold
    figures (each fold's rule from inner folds of its own training part; none when `in_source_folds` is 0).
    `held_out=False`: the in-source figures alone."""
    records = list(records)
    units = list(units or sorted({r.source for r in records})) if held_out else []
    src = np.array([r.source for r in records])
    allowed = np.ones(len(records), bool) if recipe.sources is None else np.isin(src, recipe.sources)
    out: dict = {"recipe": recipe.__dict__, "held_out": {}, "in_source": {}}
    for unit in units:
        if progress:
            progress(f"held out: {unit}")
        tr = np.flatnonzero((src != unit) & allowed)
        te = np.flatnonzero(src == unit)
        train = [records[i] for i in tr]
        inner = _oof(x[tr], train, recipe, inner_folds, seed)
        rule = decision_rule(inner.logits, train, recipe.target_sensitivity)
        s = fit_and_score(x[tr], train, x[te], recipe)
        test = [records[i] for i in te]
        p, t = apply_rule(s.logits, test, rule)
        out["held_out"][unit] = unit_figures(test, p, t, s.diagnosis, n_boot) | {"rule": rule}
        if unit == "pad-ufes-20-phone":
            out["held_out"][unit]["phone_diagnoses"] = diagnosis_figures(test, s.diagnosis, PHONE_DIAGNOSES)
    if not in_source_folds:
        return out
    # in-source: one pooled grouped K-fold over the allowed sources
    pool = np.flatnonzero(allowed)
    pooled = [records[i] for i in pool]
    if progress:
        progress(f"in-source {in_source_folds}-fold")
    index = {r.uid: i for i, r in enumerate(pooled)}
    p_all, t_all = np.empty(len(pooled)), np.empty(len(pooled))
    d_all = np.full((len(pooled), len(DIAGNOSES)), -np.inf)
    for train, val in grouped_kfold(pooled, in_source_folds, seed):
        ti = np.array([index[r.uid] for r in train])
        vi = np.array([index[r.uid] for r in val])
        inner = _oof(x[pool][ti], train, recipe, inner_folds, seed)
        rule = decision_rule(inner.logits, train, recipe.target_sensitivity)
        s = fit_and_score(x[pool][ti], train, x[pool][vi], recipe)
        p_all[vi], t_all[vi] = apply_rule(s.logits, val, rule)
        d_all[vi] = s.diagnosis
    psrc = np.array([r.source for r in pooled])
    for unit in sorted(set(psrc)):
        m = np.flatnonzero(psrc == unit)
        sub = [pooled[i] for i in m]
        out["in_source"][unit] = unit_figures(sub, p_all[m], t_all[m], d_all[m], n_boot)
        if unit == "pad-ufes-20-phone":
            out["in_source"][unit]["phone_diagnoses"] = diagnosis_figures(sub, d_all[m], PHONE_DIAGNOSES)
    return out


# ------------------------------------------------------------------------------------- finetune protocol
def finetune_loso(
    cfg,
    records: Sequence[Record],
    out: Path,
    units: Sequence[str] | None = None,
    n_boot: int = 1000,
    progress: bool = True,
    in_source_folds: int = 5,
    held_out: bool = True,
) -> dict:
    """The whole training recipe per held-out unit: `train.train(cfg without that source)` into
    `out/held-out-<unit>/` (resumed where a run is there), the decision rule from that run's validation
    predictions (training sources only), then its best checkpoint scores the unit (its logits are kept in
    the run's held_out_predictions.npz, so other decision rules can be compared without scoring again).
    Beside them (`in_source_folds` > 0) the in-source figures of `finetune_in_source`; `held_out=False`
    gives those alone."""
    from .train import load_training_records, train

    records = list(records)
    trainable = {r.source for r in load_training_records(cfg)[0]}
    units = list(units or sorted({r.source for r in records})) if held_out else []
    result: dict = {"recipe": {"protocol": "finetune", "config": cfg.model_dump()}, "held_out": {}}
    if in_source_folds:
        result |= finetune_in_source(cfg, out / "in-source", in_source_folds, n_boot, progress)
    for unit in units:
        run = out / f"held-out-{unit}"
        unit_cfg = cfg
        if unit in trainable:
            unit_cfg = cfg.model_copy(update={"exclude_sources": sorted({*(cfg.exclude_sources or []), unit})})
        if not (run / "calibration.json").is_file():
            train(unit_cfg, run, resume=(run / "config.yaml").is_file(), progress=progress)
        test = [r for r in records if r.source == unit]
        scores = kept_scores(run, test, run / "held_out_predictions.npz", progress)
        rule = run_rule(run, unit_cfg)
        p, t = apply_rule(scores.logits, test, rule)
        result["held_out"][unit] = unit_figures(test, p, t, scores.diagnosis, n_boot) | {"rule": rule}
        if unit == "pad-ufes-20-phone":
            result["held_out"][unit]["phone_diagnoses"] = diagnosis_figures(test, scores.diagnosis, PHONE_DIAGNOSES)
    return result


def finetune_in_source(cfg, run: Path, folds: int = 5, n_boot: int = 1000, progress: bool = True) -> dict:
    """The finetune protocol's in-source figures: one pooled source-stratified grouped K-fold run of the whole
    recipe (`train.train` with `folds=K` into `run`, resumed where folds are done; its oof.csv holds every
    training photo's out-of-fold logit). Each fold's best checkpoint scores its own validation fold again for
    the diagnosis head (kept in fold-k/fold_scores.npz), and each fold's decision rule is fitted on the other
    folds' out-of-fold logits, so no photo's threshold is chosen on itself. A fold's best epoch is chosen on
    its validation fold (the K-fold mode's early stopping), which flatters these figures a little; the
    held-out units carry no such bias."""
    from .train import load_training_records, train

    kcfg = cfg.model_copy(update={"folds": folds})
    train(kcfg, run, resume=(run / "config.yaml").is_file(), progress=progress)
    by_uid = {r.uid: r for r in load_training_records(kcfg)[0]}
    fold_recs, fold_scores = [], []
    for k in range(folds):
        fold = run / f"fold-{k}"
        recs = [by_uid[u] for u in json.loads((fold / "data.json").read_text())["val_keys"]]
        fold_recs.append(recs)
        fold_scores.append(kept_scores(fold, recs, fold / "fold_scores.npz", progress))
    pooled = [r for recs in fold_recs for r in recs]
    p_all, t_all = np.empty(len(pooled)), np.empty(len(pooled))
    rules, start = [], 0
    for k, (recs, scores) in enumerate(zip(fold_recs, fold_scores, strict=True)):
        others = [j for j in range(folds) if j != k]
        rule = decision_rule(
            np.concatenate([fold_scores[j].logits for j in others]),
            [r for j in others for r in fold_recs[j]],
            kcfg.target_sensitivity,
        )
        rules.append(rule)
        p_all[start : start + len(recs)], t_all[start : start + len(recs)] = apply_rule(scores.logits, recs, rule)
        start += len(recs)
    d_all = np.concatenate([s.diagnosis for s in fold_scores])
    psrc = np.array([r.source for r in pooled])
    figures: dict = {}
    for unit in sorted(set(psrc)):
        m = np.flatnonzero(psrc == unit)
        sub = [pooled[i] for i in m]
        figures[unit] = unit_figures(sub, p_all[m], t_all[m], d_all[m], n_boot)
        if unit == "pad-ufes-20-phone":
            figures[unit]["phone_diagnoses"] = diagnosis_figures(sub, d_all[m], PHONE_DIAGNOSES)
    return {"in_source": figures, "in_source_run": {"folds": folds, "run": run.as_posix(), "rules": rules}}


def kept_scores(run: Path, records: Sequence[Record], saved: Path, progress: bool = True) -> Scores:
    """`score_run(run, records)`, kept in `saved` (keys, logits, diagnosis) and read from there when it
    holds exactly these records: other decision rules and resumed reports do not score again."""
    kept = np.load(saved) if saved.is_file() else None
    if kept is not None and [str(k) for k in kept["keys"]] == [r.uid for r in records]:
        return Scores(kept["logits"], kept["diagnosis"])
    scores = score_run(run, records, progress)
    np.savez(saved, keys=np.array([r.uid for r in records]), logits=scores.logits, diagnosis=scores.diagnosis)
    return scores


def run_rule(run: Path, cfg) -> dict[str, dict[str, float]]:
    """The decision rule of a training run, from its validation predictions (its training sources only)."""
    from .train import load_training_records

    val = np.load(run / "val_predictions.npz")
    by_uid = {r.uid: r for r in load_training_records(cfg)[0]}
    recs = [by_uid[str(k)] for k in val["keys"]]
    return decision_rule(val["logits"], recs, cfg.target_sensitivity)


def score_run(run: Path, records: Sequence[Record], progress: bool = True) -> Scores:
    """Malignancy logits and balanced diagnosis log-probabilities of `records` by a run's best checkpoint."""
    from tqdm.auto import tqdm

    from .export import load_run_model
    from .preprocess import normalise
    from .train import torch

    net, cfg = load_run_model(run)
    spec = cfg.preprocess_spec()
    cal = json.loads((run / "calibration.json").read_text())
    prior = cal.get("diagnosis_prior")
    logits, diag = [], []
    bar = tqdm(total=len(records), desc=f"scoring with {run.name}", unit="img", disable=not progress)
    for i in range(0, len(records), 64):
        chunk = records[i : i + 64]
        x = torch.from_numpy(normalise(np.stack([load_pixels(r.path, spec) for r in chunk]), spec))
        with torch.inference_mode():
            z, d = net.forward_both(x.contiguous(memory_format=torch.channels_last))
        logits.append(z.numpy())
        if d is not None and prior:
            shifted = d.numpy() + prior_shift([prior[c] for c in DIAGNOSES])
            diag.append(shifted - np.logaddexp.reduce(shifted, axis=1, keepdims=True))
        bar.update(len(chunk))
    bar.close()
    d_all = np.concatenate(diag) if diag else np.full((len(records), len(DIAGNOSES)), -np.inf)
    return Scores(np.concatenate(logits), d_all)


def held_out_models(out: Path, progress: bool = True) -> dict[str, Path]:
    """{unit: ONNX model} of a finetune leave-one-source-out folder (`skinscan loso --protocol finetune --out
    OUT`): each finished unit's network, trained without that unit, exported once (`export.export`) into
    OUT/held-out-<unit>/export/ and reused from there. For measures that need features which never saw the
    unit (the quality gate's refusals on a source never seen: `benchmarks/bench_gate_sources.py --loso`)."""
    from .export import export

    runs = sorted(p for p in Path(out).glob("held-out-*") if (p / "calibration.json").is_file())
    if not runs:
        raise SkinscanError(
            f"{out}: no finished held-out run (held-out-<source>/calibration.json); "
            f"train them with `skinscan loso --protocol finetune --out {out}`"
        )
    models = {}
    for run in runs:
        onnx = run / "export" / f"{run.name}.onnx"
        if not onnx.is_file():
            if progress:
                log.info("exporting %s", run)
            export(run, onnx.parent, name=run.name, version_tag=run.name)
        models[run.name.removeprefix("held-out-")] = onnx
    return models


# ------------------------------------------------------------------------------------------- quality gate
@dataclass(frozen=True, eq=False)
class GateInputs:
    """What the quality gate reads of N pictures: the model's `embedding` output (N, D), each picture's pixel
    measures (the keys of `quality.pixel_measures`) and its decoded shorter side (None: unknown)."""

    embeddings: np.ndarray
    measures: Sequence[Mapping[str, float]]
    shorter_sides: Sequence[int | None]

    def __post_init__(self) -> None:
        if not len(self.embeddings) == len(self.measures) == len(self.shorter_sides):
            raise ValueError(
                f"{len(self.embeddings)} embeddings, {len(self.measures)} measures and "
                f"{len(self.shorter_sides)} sizes: give one of each per picture"
            )

    def __len__(self) -> int:
        return len(self.embeddings)

    def take(self, ix: Sequence[int] | np.ndarray) -> GateInputs:
        ix = np.asarray(ix, dtype=int)
        return GateInputs(self.embeddings[ix], [self.measures[i] for i in ix], [self.shorter_sides[i] for i in ix])


def fit_gate(
    records: Sequence[Record],
    inputs: GateInputs,
    tune: GateInputs,
    tune_groups: Sequence[str],
    *,
    without: str | None = None,
) -> tuple[QualityGate, dict]:
    """The quality gate that `skinscan export --gate` fits, fitted on `records` less those of the source
    `without`: `fit_quality_gate` with the arguments the export gives it (each record's source, its group
    inside its source, the non-lesion tuning pictures `tune` grouped by source picture, `tune_groups`).
    Only the kept rows of `inputs` reach the fit. Returns the gate and its card section."""
    if len(records) != len(inputs):
        raise ValueError(f"{len(records)} records but {len(inputs)} gate inputs")
    keep = np.array([i for i, r in enumerate(records) if r.source != without], dtype=int)
    if without is not None and len(keep) == len(records):
        raise SkinscanError(
            f"no record of source {without!r} to hold out (sources: {sorted({r.source for r in records})})"
        )
    train = [records[i] for i in keep]
    section = fit_quality_gate(
        inputs.embeddings[keep],
        tune.embeddings,
        train_sources=[r.source for r in train],
        train_groups=[f"{r.source}/{r.group}" for r in train],  # as `skinscan export --gate` groups them
        nonlesion_groups=list(tune_groups),
    )
    return QualityGate.from_card({CARD_SECTION: section}, ["embedding"]), section


def gate_refusals(gate: QualityGate, inputs: GateInputs) -> tuple[np.ndarray, np.ndarray]:
    """Per picture: refused for any reason (verdict "retake"), and refused as not a skin lesion."""
    # The measures are given, so `check` reads no pixels: an empty (N, 0, 0, 3) array only tells it N.
    reports = gate.check(
        np.empty((len(inputs), 0, 0, 3), np.uint8), inputs.shorter_sides, inputs.embeddings, inputs.measures
    )
    return np.array([not r.ok for r in reports]), np.array([NOT_A_LESION in r.problems for r in reports])


def _share(flags: np.ndarray) -> dict:
    k, n = int(np.sum(flags)), len(flags)
    return {"k": k, "n": n, "share": k / n if n else float("nan"), "ci95": list(metrics.wilson_interval(k, n))}


def refusal_figures(records: Sequence[Record], refused: np.ndarray, not_a_lesion: np.ndarray) -> dict:
    """Shares refused (any reason) and refused as not a lesion, with Wilson 95% intervals; the same per
    skin-type group (I-II, III-IV, V-VI) where the records hold a skin type."""
    out: dict = {"n": len(records), "refused": _share(refused), "not_a_lesion": _share(not_a_lesion)}
    groups = np.array([SKIN_TYPE_GROUPS.get(r.skin_type, "") for r in records])
    by = {
        g: {"refused": _share(refused[groups == g]), "not_a_lesion": _share(not_a_lesion[groups == g])}
        for g in SKIN_GROUP_ORDER
        if (groups == g).any()
    }
    if by:
        out["by_skin_type_group"] = by
    return out


def _fit_summary(section: dict) -> dict:
    fit = section["fit"]
    keys = ("train_images", "chosen", "cross_fitted_train_rejection", "nonlesion_tune_flag_rate_cross_fitted")
    return {k: fit[k] for k in keys if k in fit}


def _flagged(gate: QualityGate, holdout: GateInputs) -> dict:
    any_reason, ood = gate_refusals(gate, holdout)
    return {"flagged": _share(any_reason), "not_a_lesion": _share(ood)}


def gate_without(
    records: Sequence[Record],
    inputs: GateInputs,
    tune: GateInputs,
    tune_groups: Sequence[str],
    holdout: GateInputs,
    unit: str,
) -> dict:
    """The gate fitted without the source `unit` (`fit_gate`): the share of the unit's photos it refuses
    (`refusal_figures`), the share of the non-lesion `holdout` pictures it flags, and its fit's summary.
    `inputs`, `tune` and `holdout` come from one network: the shipped one (only the gate's fit never saw the
    unit), or one trained without the unit (then neither did the features; `benchmarks/bench_gate_sources.py
    --loso`)."""
    gate, section = fit_gate(records, inputs, tune, tune_groups, without=unit)
    ix = np.flatnonzero(np.array([r.source == unit for r in records]))
    entry = refusal_figures([records[i] for i in ix], *gate_refusals(gate, inputs.take(ix)))
    return entry | {"nonlesion_holdout": _flagged(gate, holdout), "fit": _fit_summary(section)}


def gate_loso(
    records: Sequence[Record],
    inputs: GateInputs,
    tune: GateInputs,
    tune_groups: Sequence[str],
    holdout: GateInputs,
    units: Sequence[str] | None = None,
    outer_folds: int = 0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The quality gate on sources it never saw. For each unit (a source): the gate fitted without it
    (`fit_gate`), the share of the unit's photos it refuses (`refusal_figures`) and the share of the
    non-lesion `holdout` pictures it flags. Then the gate fitted on every source, as the export ships it:
    its refusals per source and skin-type group in-sample (the fit saw those photos; not a bound either way:
    a small fit's subspace hugs its own photos, so their in-subspace distance is larger than a new photo's),
    and beside them the fit's own cross-fitted "not a lesion" rejection per source (`fit_quality_gate`
    gives it per source only: subspace and probe fitted without each photo's fold, the threshold from those
    scores). With `outer_folds`, the whole fit is also cross-fitted: each grouped fold's photos judged by the
    gate fitted on the other folds (`cross_fitted`: the figures a new photo of these sources can expect)."""
    records = list(records)
    units = list(units or sorted({r.source for r in records}))
    src = np.array([r.source for r in records])
    out: dict = {"held_out": {}}
    for unit in units:
        if progress:
            progress(f"gate without {unit}")
        out["held_out"][unit] = gate_without(records, inputs, tune, tune_groups, holdout, unit)
    if progress:
        progress("gate on every source")
    gate, section = fit_gate(records, inputs, tune, tune_groups)
    refused, ood = gate_refusals(gate, inputs)
    out["all_sources"] = {
        "in_sample": {
            u: refusal_figures([records[i] for i in np.flatnonzero(src == u)], refused[src == u], ood[src == u])
            for u in sorted(set(src))
        },
        "cross_fitted_not_a_lesion": section["fit"].get(
            "cross_fitted_train_rejection", section["fit"]["novelty_cross_fitted_train_rejection"]
        ),
        "nonlesion_holdout": _flagged(gate, holdout),
        "fit": _fit_summary(section),
    }
    if outer_folds:
        from sklearn.model_selection import StratifiedGroupKFold

        # The gate never reads labels: folds keep each source's share (not `grouped_kfold`'s source x label,
        # which a small sample cannot fill) and each group inside one fold, as the export's groups do.
        groups = [f"{r.source}/{r.group}" for r in records]
        splitter = StratifiedGroupKFold(n_splits=outer_folds, shuffle=True, random_state=seed)
        refused, ood = np.zeros(len(records), bool), np.zeros(len(records), bool)
        for k, (ti, vi) in enumerate(splitter.split(np.zeros(len(records)), src, groups)):
            if progress:
                progress(f"gate on every source, outer fold {k + 1}/{outer_folds}")
            fold_gate, _ = fit_gate([records[i] for i in ti], inputs.take(ti), tune, tune_groups)
            refused[vi], ood[vi] = gate_refusals(fold_gate, inputs.take(vi))
        out["all_sources"]["cross_fitted"] = {
            u: refusal_figures([records[i] for i in np.flatnonzero(src == u)], refused[src == u], ood[src == u])
            for u in sorted(set(src))
        }
        out["all_sources"]["outer_folds"] = outer_folds
    return out


# --------------------------------------------------------------------------------------------------- report
def write_report(result: dict, out: Path, title: str) -> Path:
    """loso.json, report.md (one row per unit) and loso.png (AUC with intervals) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "loso.json").write_text(json.dumps(result, indent=2, default=float))
    lines = [f"# {title}", "", table(result), ""]
    png = plot_auc({title: result}, out / "loso.png")
    lines += [f"![AUC per held-out unit]({png.name})", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def table(result: dict) -> str:
    """A Markdown table: held-out units, then the in-source figures."""
    head = (
        "| unit | n (cancers) | AUC [95% CI] | sens / spec | melanoma sens | spec w/o AK | diagnosis bal. acc |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for part, label in (("held_out", "held out"), ("in_source", "in-source CV")):
        for unit, f in result.get(part, {}).items():
            ci = f.get("auc_ci") or [None, None]
            rows.append(
                f"| {unit} ({label}) | {f['n']} ({f['n_malignant']}) | {_fmt(f.get('auc'))} "
                f"[{_fmt(ci[0])}, {_fmt(ci[1])}] | {_fmt(f.get('sensitivity'))} / {_fmt(f.get('specificity'))} | "
                f"{_fmt(f.get('melanoma_sensitivity'))} | {_fmt(f.get('specificity_without_ak'))} | "
                f"{_fmt(f.get('diagnosis_balanced_accuracy'))} |"
            )
    return "\n".join(rows)


def plot_auc(results: dict[str, dict], path: Path) -> Path:
    """Held-out AUC with its interval per unit, one marker per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = sorted({u for r in results.values() for u in r.get("held_out", {})})
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(units) + 1.5))
    for k, (name, r) in enumerate(results.items()):
        ys = np.arange(len(units)) + 0.15 * (k - (len(results) - 1) / 2)
        for y, u in zip(ys, units, strict=True):
            f = r.get("held_out", {}).get(u)
            if f and f.get("auc") is not None:
                lo, hi = f.get("auc_ci") or (f["auc"], f["auc"])
                ax.errorbar(
                    f["auc"],
                    y,
                    xerr=[[f["auc"] - lo], [hi - f["auc"]]],
                    fmt="o",
                    color=f"C{k}",
                    label=name if u == units[0] or y == ys[0] else None,
                    capsize=3,
                )
    ax.set_yticks(np.arange(len(units)), units)
    ax.set_xlabel("ROC AUC on the held-out unit (95% bootstrap interval)")
    ax.axvline(0.5, color="grey", lw=0.5)
    ax.set_xlim(0.4, 1.0)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), loc="lower left", fontsize=8)
    ax.set_title("Leave-one-source-out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
