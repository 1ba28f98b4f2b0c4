"""evaluate(model, dataset) -> metrics.json, predictions.csv, plots and a Markdown report.

Metrics per subset (for isic-mvb test: all 660 and the 646 without near-duplicates in train), with
bootstrap 95% intervals that resample whole patients where the dataset records them. `patients` scores
only those patients' photos (e.g. one clinic's), and
`record_in_card` stores a report in the model card's `metrics`, where the model's figures travel with it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import META_FIELDS, Record, load_dataset, meta_level, without_leaks
from .errors import DatasetError, SkinscanError
from .metrics import BinaryMetrics, binary_metrics, reliability_bins
from .predict import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalReport:
    out_dir: Path
    model: dict
    subsets: dict[str, BinaryMetrics]
    n_errors: int
    data: dict  # what was scored: dataset, split, patients, n_images, n_unreadable, n_quality_retake
    by_skin_type: dict[str, dict]  # the `all` subset per recorded Fitzpatrick skin type ({} if none recorded)


def resolve_split(data: str | Path, split: str | None) -> str | None:
    """`auto`: the dataset's `test` folder if it has one, else all its images (None)."""
    if split == "auto":
        return "test" if (Path(data) / "test").is_dir() else None
    return split


def by_skin_type(
    records: Sequence[Record], probs: np.ndarray, thresholds: np.ndarray, n_boot: int = 1000
) -> dict[str, dict]:
    """Figures per Fitzpatrick skin type where the dataset records it (the phone set), types in order and
    "not recorded" last (`by_group`). {} if no type is recorded."""
    types = [meta_level(r.meta.get(META_FIELDS["skin_type_fitzpatrick"])) for r in records]
    if all(t == "not recorded" for t in types):
        return {}
    return by_group(
        records, probs, thresholds, types, sorted(set(types), key=lambda v: (v == "not recorded", v)), n_boot
    )


def by_group(
    records: Sequence[Record],
    probs: np.ndarray,
    thresholds: np.ndarray,
    keys: Sequence[str | None],
    order: Sequence[str],
    n_boot: int = 1000,
) -> dict[str, dict]:
    """Figures per group of `order` (each record's group in `keys`; None: in none): n and cancers always;
    AUC with its patient-grouped interval, sensitivity, specificity and ECE where both classes occur, else
    the one rate that exists. Groups without a record are left out."""
    y, p, t = np.array([r.label for r in records]), np.asarray(probs, dtype=float), np.asarray(thresholds)
    out = {}
    for level in order:
        ix = np.array([i for i, v in enumerate(keys) if v == level], dtype=int)
        if len(ix) == 0:
            continue
        yy, refer = y[ix], p[ix] >= t[ix]
        entry: dict = {"n": len(ix), "n_malignant": int(yy.sum())}
        if 0 < yy.sum() < len(ix):
            m = binary_metrics(yy, p[ix], t[ix], [records[i].patient or records[i].group for i in ix], n_boot=n_boot)
            entry |= {"auc": m.auc, "auc_ci": list(m.auc_ci), "sensitivity": m.sensitivity}
            entry |= {"specificity": m.specificity, "ece": m.ece}
        elif yy.any():
            entry["sensitivity"] = float(refer.mean())
        else:
            entry["specificity"] = float((~refer).mean())
        out[level] = entry
    return out


def load_eval_records(
    data: str | Path, split: str | None = "auto", patients: Collection[str] | None = None
) -> dict[str, list[Record]]:
    """Named subsets to score. A dataset with train/test folders gives `all` and `deleaked` test sets.
    With `patients`, only the photos of those patients."""
    root = Path(data)
    split = resolve_split(root, split)
    records = load_dataset(root, split=split)
    if patients is not None:
        if not any(r.patient for r in records):
            raise DatasetError(f"{root.name} records no patient ids: it cannot be restricted to a patient list")
        records = [r for r in records if r.patient in patients]
        if not records:
            raise DatasetError(f"none of the {len(patients)} listed patients has a photo in {root.name}")
    subsets = {"all": records}
    if split and split != "train" and (root / "train").is_dir():
        clean = without_leaks(records, load_dataset(root, split="train"))
        if len(clean) != len(records):
            subsets["deleaked"] = clean
    return subsets


def score(predictor: Predictor, records: Sequence[Record], progress: bool = True) -> tuple[np.ndarray, list]:
    """Calibrated probabilities for `records` (NaN where an image failed) and the per-image Predictions.

    Forced past the quality gate: every readable image is scored, and the gate's verdict is reported
    beside the metrics (a model is measured on all images, not only on those its gate lets through)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(records), desc="predict", unit="img", disable=not progress, leave=False) as bar:
        preds = predictor.predict(
            [r.path for r in records],
            names=[r.key for r in records],
            batch_size=32,
            progress=bar.update,
            force=True,
        )
    probs = np.array([p.probability if p.ok else np.nan for p in preds], dtype=float)
    return probs, preds


def evaluate(
    model: str | Path | Predictor | None,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = "auto",
    run: str | Path | None = None,
    patients: Collection[str] | None = None,
    patients_from: str = "",
    n_boot: int = 1000,
    progress: bool = True,
) -> EvalReport:
    """Score `data` with `model`; `patients` restricts it to those patients' photos (`patients_from`: where
    the list came from, for the report)."""
    predictor = model if isinstance(model, Predictor) else Predictor(model)
    out = Path(out)
    subsets = load_eval_records(data, split, patients)
    out.mkdir(parents=True, exist_ok=True)
    records = subsets["all"]
    probs, preds = score(predictor, records, progress)
    n_errors = int(np.isnan(probs).sum())
    if n_errors == len(records):
        raise SkinscanError(f"no image of {data} could be read")
    by_key = {r.key: (p, r, pred.threshold) for r, p, pred in zip(records, probs, preds, strict=True)}

    results: dict[str, BinaryMetrics] = {}
    skin: dict[str, dict] = {}  # per skin type, of the `all` subset
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # labels, probabilities, thresholds
    for name, recs in subsets.items():
        scored = [by_key[r.key] for r in recs if not math.isnan(by_key[r.key][0])]
        y = np.array([r.label for _, r, _ in scored])
        p = np.array([pp for pp, _, _ in scored])
        thresholds = np.array([t for _, _, t in scored])  # each photo's (its type's, where the model has types)
        groups = [r.patient or r.group for _, r, _ in scored]
        if len(np.unique(y)) < 2:
            raise DatasetError(f"subset {name!r} holds one class only: AUC is undefined")
        results[name] = binary_metrics(y, p, thresholds, groups, n_boot=n_boot)
        curves[name] = (y, p, thresholds)
        if name == "all":
            skin = by_skin_type([r for _, r, _ in scored], p, thresholds, n_boot=n_boot)

    _write_predictions(out / "predictions.csv", records, preds)
    payload = {
        "model": {
            **predictor.info(),
            "path": str(predictor.model_path),
            "threshold": predictor.threshold,
            "temperature": predictor.card.temperature,
            **({"photo_types": types} if (types := predictor.photo_type_calibration()) else {}),
        },
        "data": {
            "dataset": str(data),
            "split": resolve_split(data, split),
            **({"patients": len(patients), "patients_from": patients_from} if patients is not None else {}),
            "n_images": len(records),
            "n_unreadable": n_errors,
            "n_quality_retake": sum(p.quality == "retake" for p in preds),
        },
        "bootstrap_resamples": n_boot,
        "subsets": {k: v.to_dict() for k, v in results.items()},
        **({"by_skin_type": skin} if skin else {}),
        "reliability": {k: reliability_bins(*curves[k][:2]) for k in curves},
    }
    (out / "metrics.json").write_text(json.dumps(payload, indent=2))
    history = _read_history(Path(run)) if run else None
    figures = _plots(out, curves, history)
    _write_report(out, payload, results, figures)
    return EvalReport(out, payload["model"], results, n_errors, payload["data"], skin)


def record_in_card(report: EvalReport, model_path: str | Path, key: str) -> dict:
    """Store `report` in the card of the model at `model_path` (which must be the model that was scored) as
    `metrics[key]`: what was scored and the metrics of each subset. Returns the entry."""
    from .card import ModelCard, sha256_file, write_card

    model_path = Path(model_path)
    if sha256_file(model_path) != report.model["sha256"]:
        raise SkinscanError(f"{model_path} is not the model this report scored ({report.model['path']})")
    predictor = Predictor(model_path)
    card = predictor.card.model_dump()
    del predictor  # release the file before rewriting it
    data = report.data
    entry = {
        "dataset": Path(data["dataset"]).name,
        **{k: data[k] for k in ("split", "patients", "patients_from", "n_quality_retake") if k in data},
        "subsets": {k: v.to_dict() for k, v in report.subsets.items()},
        **({"by_skin_type": report.by_skin_type} if report.by_skin_type else {}),
    }
    card.setdefault("metrics", {})[key] = entry
    write_card(model_path, ModelCard(**card).model_dump())
    return entry


def _write_predictions(path: Path, records: Sequence[Record], preds: Sequence) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "label", "probability", "decision", "quality", "reasons", "error"])
        for r, p in zip(records, preds, strict=True):
            prob = "" if p.probability is None else f"{p.probability:.6f}"
            w.writerow([r.key, r.label, prob, p.decision or "", p.quality or "", " | ".join(p.reasons), p.error or ""])


def _read_history(run: Path) -> list[dict] | None:
    f = run / "history.csv"
    if not f.is_file():
        raise DatasetError(f"{run} has no history.csv: is it a training run folder?")
    with f.open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _plots(out: Path, curves: dict, history: list[dict] | None) -> list[tuple[str, str]]:
    """`curves`: subset -> (labels, probabilities, each image's threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    figs = []
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p, threshold) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=name)
        pred = p >= threshold
        ax.plot(1 - (~pred[y == 0]).mean(), pred[y == 1].mean(), "o")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (dots: operating threshold)")
    ax.legend()
    figs.append(("ROC", _save(fig, out / "roc.png")))

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p, _) in curves.items():
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, label=name)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall")
    ax.legend()
    figs.append(("Precision-recall", _save(fig, out / "pr.png")))

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.8), squeeze=False)
    for ax, (name, (y, p, threshold)) in zip(axes[0], curves.items(), strict=True):
        pred = (p >= threshold).astype(int)
        distinct = np.unique(threshold)
        shown = f"threshold {distinct[0]:.3f}" if len(distinct) == 1 else "thresholds per photo type"
        cm = np.array([[((y == t) & (pred == q)).sum() for q in (0, 1)] for t in (0, 1)])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=12)
        ax.set(
            xticks=[0, 1],
            yticks=[0, 1],
            xticklabels=["monitor", "refer"],
            yticklabels=["benign", "malignant"],
            xlabel="decision",
            ylabel="truth",
            title=f"{name} ({shown})",
        )
    figs.append(("Confusion matrix at the operating threshold", _save(fig, out / "confusion.png")))

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p, _) in curves.items():
        bins = reliability_bins(y, p)
        ax.plot([b["mean_p"] for b in bins], [b["frac_pos"] for b in bins], "o-", label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="predicted probability", ylabel="observed fraction malignant", title="Reliability (15 equal-width bins)"
    )
    ax.legend()
    figs.append(("Reliability diagram", _save(fig, out / "reliability.png")))

    if history:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
        ep = [h["epoch"] for h in history]
        a1.plot(ep, [h["train_loss"] for h in history], label="train")
        a1.plot(ep, [h["val_loss"] for h in history], label="validation")
        a1.set(xlabel="epoch", ylabel="loss", title="Loss")
        a2.plot(ep, [h["train_auc"] for h in history], label="train")
        a2.plot(ep, [h["val_auc"] for h in history], label="validation")
        a2.set(xlabel="epoch", ylabel="ROC AUC", title="AUC")
        a1.legend()
        a2.legend()
        figs.append(("Training curves", _save(fig, out / "training_curves.png")))
    return figs


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _write_report(out: Path, payload: dict, results: dict[str, BinaryMetrics], figures: list) -> None:
    m = payload["model"]
    lines = [
        f"# skinscan evaluation: {Path(payload['data']['dataset']).name}",
        "",
        f"Model `{m['name']}` version {m['version']} (sha256 {m['sha256'][:12]}), "
        f"operating threshold {m['threshold']:.4f}, temperature {m['temperature']:.3f}"
        + (
            "; calibrated per detected photo type (each image takes its type's temperature and threshold): "
            + ", ".join(
                f"{t} temperature {v['temperature']:.3f}, threshold {v['threshold']:.4f}"
                for t, v in m["photo_types"].items()
            )
            if m.get("photo_types")
            else ""
        )
        + ".",
        f"Images: {payload['data']['n_images']}"
        + (
            f", those of the {d['patients']} patients listed in {d['patients_from'] or 'the patient list'}"
            if "patients" in (d := payload["data"])
            else ""
        )
        + f" ({d['n_unreadable']} unreadable; {d['n_quality_retake']} flagged for a retake by the quality gate, "
        "scored anyway).",
        "",
        "| subset | n (malignant) | ROC AUC [95% CI] | sensitivity | specificity | accuracy | ECE (15 bins) "
        "| ECE if calibrated | Brier |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        mid, lo, hi = r.ece_if_calibrated
        lines.append(
            f"| {name} | {r.n} ({r.n_malignant}) | {r.auc:.4f} [{r.auc_ci[0]:.4f}, {r.auc_ci[1]:.4f}] | "
            f"{r.sensitivity:.3f} | {r.specificity:.3f} | {r.accuracy:.3f} | {r.ece:.4f} | "
            f"{mid:.3f} [{lo:.3f}, {hi:.3f}] | {r.brier:.4f} |"
        )
    if skin := payload.get("by_skin_type"):
        lines += ["", "By Fitzpatrick skin type, as recorded (all images):", ""]
        lines += [
            "| skin type | n (malignant) | ROC AUC [95% CI] | sensitivity | specificity |",
            "|---|---|---|---|---|",
        ]
        for level, e in skin.items():
            auc = f"{e['auc']:.3f} [{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]" if "auc" in e else "- (one class)"
            rate = {k: f"{e[k]:.3f}" if k in e else "-" for k in ("sensitivity", "specificity")}
            lines.append(
                f"| {level} | {e['n']} ({e['n_malignant']}) | {auc} | {rate['sensitivity']} | {rate['specificity']} |"
            )
    lines += [
        "",
        f"Intervals: percentile bootstrap ({payload['bootstrap_resamples']} resamples; whole patients where "
        "recorded). ECE if calibrated: the "
        "ECE a perfectly calibrated model with these probabilities would show on this many images (median, "
        "90% range; binned ECE is biased upwards on small sets): only an ECE above that range shows miscalibration.",
        "",
    ]
    for title, fname in figures:
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]
    (out / "report.md").write_text("\n".join(lines))
