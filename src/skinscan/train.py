"""train(config) -> run folder: checkpoints, per-epoch history, resolved config, calibration.

Resumable: `last.pt` is written atomically after every epoch; `train(..., resume=True)` continues
from it without losing finished epochs. Needs the `train` extra (torch, albumentations).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from . import metrics
from .config import TrainConfig, load_config
from .data import (
    DIAGNOSES,
    Record,
    diagnosis_prior,
    drop_exact_duplicates,
    grouped_kfold,
    grouped_split,
    load_dataset,
    read_patient_list,
    sampling_weights,
)
from .errors import ConfigError, DatasetError, SkinscanError
from .preprocess import PreprocessSpec, load_pixels, normalise

log = logging.getLogger(__name__)

try:
    import torch
    from torch.utils.data import DataLoader, Dataset
except ImportError as exc:  # pragma: no cover
    from .errors import MissingExtra

    raise MissingExtra("train", "training", exc) from exc

from .augment import build_augment
from .model import LesionNet


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    best_epoch: int
    best_val_auc: float
    temperature: float
    threshold: float
    epochs_run: int
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_training_records(cfg: TrainConfig) -> tuple[list[Record], dict]:
    """Every training record of `cfg.data` (each dataset's `train` split if it has one), de-duplicated,
    without the excluded patients."""
    if not cfg.data:
        raise ConfigError("no training data: pass --data DATASET (e.g. ../shared/datasets/isic-mvb)")
    records: list[Record] = []
    for d in cfg.data:
        root = Path(d)
        has_train_split = root.is_dir() and (root / "train").is_dir()
        records += load_dataset(root, split="train" if has_train_split else None)
    n_excluded = 0
    if cfg.exclude_sources:
        _check_sources("exclude_sources", cfg.exclude_sources, records)
        kept = [r for r in records if r.source not in cfg.exclude_sources]
        n_excluded, records = len(records) - len(kept), kept
    if cfg.exclude_patients:
        excluded = read_patient_list(cfg.exclude_patients)
        kept = [r for r in records if r.patient not in excluded]
        n_excluded, records = n_excluded + len(records) - len(kept), kept
    records, n_dupes = drop_exact_duplicates(records)
    if cfg.limit:
        rng = np.random.default_rng(cfg.split_seed_used)  # which images: data, like the split
        records = [records[i] for i in sorted(rng.permutation(len(records))[: cfg.limit])]
    if cfg.source_weights:
        _check_sources("source_weights", cfg.source_weights, records)
        sampling_weights(records, cfg.source_weights)  # every source named: checked before any training
    digest = hashlib.sha256("\n".join(sorted(f"{r.uid}:{r.md5 or ''}" for r in records)).encode())
    info = {
        "datasets": list(cfg.data),
        "n_images": len(records),
        "per_source": {s: sum(r.source == s for r in records) for s in sorted({r.source for r in records})},
        "exact_duplicates_dropped": n_dupes,
        "excluded_images": n_excluded,
        "records_sha256": digest.hexdigest(),
    }
    return records, info


def _check_sources(setting: str, names, records: list[Record]) -> None:
    """A setting that names sources must name ones the data holds."""
    sources = {r.source for r in records}
    unknown = set(names) - sources
    if unknown:
        raise ConfigError(f"{setting} names unknown source(s) {sorted(unknown)}; sources: {sorted(sources)}")


def _split_info(train: list[Record], val: list[Record]) -> dict:
    return {
        "n_train": len(train),
        "n_val": len(val),
        "n_train_malignant": sum(r.label for r in train),
        "n_val_malignant": sum(r.label for r in val),
        "val_keys": sorted(r.uid for r in val),
    }


def _cache_pixels(records: list[Record], spec: PreprocessSpec, desc: str, progress: bool = True) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.empty((len(records), spec.size, spec.size, 3), dtype=np.uint8)
    for i, r in enumerate(tqdm(records, desc=desc, unit="img", leave=False, disable=not progress)):
        out[i] = load_pixels(r.path, spec)
    return out


class _ImageSet(Dataset):
    """Training draws: (pixels, label, diagnosis), and with `twins` also the draw's clean twin (zeros where no
    mark was pasted) and whether it has one (`augment.Augment.pair`)."""

    def __init__(
        self,
        pixels: np.ndarray,
        labels: np.ndarray,
        diagnoses: np.ndarray,
        spec: PreprocessSpec,
        augment,
        seed: int,
        twins: bool = False,
    ):
        self.pixels, self.labels, self.diagnoses, self.spec, self.augment = pixels, labels, diagnoses, spec, augment
        self.seed, self.epoch, self.twins = seed, 0, twins

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, self.epoch, i))  # reproducible per epoch and image
        y, d = torch.tensor(float(self.labels[i])), torch.tensor(int(self.diagnoses[i]))
        if not self.twins:
            return torch.from_numpy(normalise(self.augment(self.pixels[i], rng), self.spec)), y, d
        px, clean = self.augment.pair(self.pixels[i], rng)
        x = torch.from_numpy(normalise(px, self.spec))
        twin = torch.zeros_like(x) if clean is None else torch.from_numpy(normalise(clean, self.spec))
        return x, y, d, twin, torch.tensor(clean is not None)


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu")
    return torch.device(name)


@torch.inference_mode()
def predict_logits(
    model: LesionNet, pixels: np.ndarray, spec: PreprocessSpec, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Logits of uint8 (N, S, S, 3) pixels through the shared `normalise`."""
    model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(normalise(pixels[i : i + batch_size], spec)).to(device)
        out.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _stamps(cfg: TrainConfig) -> dict | None:
    """The sources' marks for `stamp_augment`, cut from the datasets (`skinscan.stamps`); None without it."""
    if not cfg.stamp_augment:
        return None
    from .stamps import build_stamps

    root = Path(cfg.stamps_from) if cfg.stamps_from else Path(cfg.data[0]).parent
    try:
        return build_stamps(root)
    except SkinscanError as exc:
        raise ConfigError(f"stamp_augment: {exc}; set stamps_from to the folder holding the datasets") from None


def operating_point(logits: np.ndarray, y: np.ndarray, sources: list[str], groups: list[str], target: float) -> dict:
    """Temperature on all validation images; threshold = the highest that keeps sensitivity >= target in
    EVERY source (with >= 5 cancers), so one threshold serves archive and phone photos alike
    (`metrics.operating_threshold`), with the validation figures at it."""
    temperature, threshold, per_source_thr = metrics.operating_threshold(logits, y, sources, target, min_cancers=5)
    prob = metrics.sigmoid(logits / temperature)
    src, g = np.array(sources), np.array(groups)
    per_source = {
        s: metrics.binary_metrics(y[src == s], prob[src == s], threshold, list(g[src == s])).to_dict()
        for s in sorted(set(sources))
        if len(np.unique(y[src == s])) == 2
    }
    return {
        "temperature": temperature,
        "threshold": threshold,
        "target_sensitivity": target,
        "threshold_per_source": per_source_thr,
        "validation": metrics.binary_metrics(y, prob, threshold, groups).to_dict(),
        "validation_per_source": per_source,
    }


def train(
    cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True, calibrate_only: bool = False
) -> RunResult:
    """Fine-tune the network on `cfg.data`; writes everything into `out` and returns a summary.

    With `cfg.folds = K`, trains K models on patient-grouped folds into `out/fold-k/` and writes the
    out-of-fold predictions to `out/oof.csv`; the returned summary is then that of the last fold.
    """
    run = Path(out)
    if (run / "config.yaml").exists() and not resume:
        raise ConfigError(f"{run} already holds a training run: pass --resume to continue it, or choose another --out")
    if calibrate_only and (not resume or cfg.folds):
        raise ConfigError("--calibrate-only finishes an interrupted single-model run: use it with --resume")
    if resume and not (run / "config.yaml").exists():
        raise ConfigError(f"nothing to resume in {run}")
    run.mkdir(parents=True, exist_ok=True)
    if resume:
        saved = load_config(run / "config.yaml")
        ignore = {"workers", "threads", "device"}
        if saved.model_dump(exclude=ignore) != cfg.model_dump(exclude=ignore):
            raise ConfigError(f"{run} was trained with other settings (see its config.yaml); resume with the same")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records, data_info = load_training_records(cfg)

    if not cfg.folds:
        train_recs, val_recs = grouped_split(records, cfg.val_fraction, cfg.split_seed_used)
        (run / "data.json").write_text(json.dumps({**data_info, **_split_info(train_recs, val_recs)}, indent=2))
        return _fit(cfg, train_recs, val_recs, run, resume, progress, calibrate_only=calibrate_only)

    (run / "data.json").write_text(json.dumps(data_info, indent=2))
    rows, result = [], None
    for k, (train_recs, val_recs) in enumerate(grouped_kfold(records, cfg.folds, cfg.split_seed_used)):
        fold_dir = run / f"fold-{k}"
        log.info("fold %d/%d: train %d, validation %d", k + 1, cfg.folds, len(train_recs), len(val_recs))
        fold_dir.mkdir(exist_ok=True)
        (fold_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))  # exportable
        (fold_dir / "data.json").write_text(json.dumps({**data_info, **_split_info(train_recs, val_recs)}, indent=2))
        done = (fold_dir / "calibration.json").exists()
        result = _fit(
            cfg, train_recs, val_recs, fold_dir, resume and (fold_dir / "last.pt").exists(), progress, skip_if_done=done
        )
        oof = np.load(fold_dir / "val_predictions.npz")
        rows += [
            {
                "fold": k,
                "source": r.source,
                "key": r.key,
                "uid": r.uid,
                "patient": r.patient or "",
                "label": r.label,
                "logit": float(z),
            }
            for r, z in zip(val_recs, oof["logits"], strict=True)
        ]
    _write_csv(run / "oof.csv", rows)
    return result


def _fit(
    cfg: TrainConfig,
    train_recs: list[Record],
    val_recs: list[Record],
    run: Path,
    resume: bool,
    progress: bool,
    skip_if_done: bool = False,
    calibrate_only: bool = False,
) -> RunResult:
    """Train one model on `train_recs`, early-stopped and calibrated on `val_recs`, into `run`."""
    from tqdm.auto import tqdm

    last_ckpt = run / "last.pt"
    if not train_recs or not val_recs:
        raise DatasetError("the split left no training or no validation images")
    if skip_if_done:
        cal = json.loads((run / "calibration.json").read_text())
        return RunResult(run, cal["best_epoch"], cal["validation"]["auc"], cal["temperature"], cal["threshold"], 0, 0.0)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    spec = cfg.preprocess_spec()
    stamps = _stamps(cfg)  # before any decoding: a missing dataset fails at once
    val_px = _cache_pixels(val_recs, spec, "decode val", progress)
    y_val = np.array([r.label for r in val_recs], dtype=np.int64)
    n_diagnoses = len(DIAGNOSES) if cfg.diagnosis_weight > 0 else 0
    model = LesionNet(cfg.arch, cfg.dropout, pretrained=True, image_size=cfg.image_size, n_diagnoses=n_diagnoses)
    model = model.to(device).to(memory_format=torch.channels_last)

    log.info("train %d images, validation %d, on %s", len(train_recs), len(val_recs), device)
    train_px = _cache_pixels(train_recs, spec, "decode train", progress)
    y_train = np.array([r.label for r in train_recs], dtype=np.float32)
    d_train = np.array([DIAGNOSES.index(r.diagnosis) if r.diagnosis else -1 for r in train_recs], dtype=np.int64)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = build_augment(cfg.augment, cfg.image_size, stamps, cfg.stamp_augment)
    dataset = _ImageSet(train_px, y_train, d_train, spec, augment, cfg.seed, twins=cfg.stamp_consistency > 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    draws = sampling_weights(train_recs, cfg.source_weights, cfg.source_balance, cfg.diagnosis_balance)
    sampler = None
    if _balanced(cfg):
        # each source's and diagnosis's share of an epoch's draws follows the config (data.sampling_weights)
        sampler = torch.utils.data.WeightedRandomSampler(
            draws.tolist(), num_samples=cfg.samples_per_epoch or len(train_recs), replacement=True, generator=gen
        )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        generator=gen if sampler is None else None,
        persistent_workers=False,
    )
    steps_per_epoch = max(1, len(loader))
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + np.cos(np.pi * min(1.0, t)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    history: list[dict] = []
    start_epoch, best_auc, best_epoch, stale = 0, -1.0, -1, 0
    if resume:
        state = torch.load(last_ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["loader_rng"])
        history, best_auc, best_epoch, stale = state["history"], state["best_auc"], state["best_epoch"], state["stale"]
        start_epoch = state["epoch"] + 1
        log.info("resuming after epoch %d (best validation AUC %.4f)", start_epoch, best_auc)

    t0 = time.perf_counter()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    diagnosis_loss = torch.nn.CrossEntropyLoss(ignore_index=-1, reduction="sum")  # -1: no diagnosis recorded
    for epoch in range(start_epoch, cfg.epochs):
        if calibrate_only:
            log.info("stopping after epoch %d as asked; calibrating the best epoch (%d)", start_epoch, best_epoch)
            break
        if stale >= cfg.patience:
            log.info("early stop: no better validation AUC for %d epochs", stale)
            break
        dataset.epoch = epoch
        model.train()
        losses, train_logits, train_y, mark_shifts = [], [], [], []
        size = cfg.small_size if epoch < cfg.small_epochs else None  # progressive resizing: small first
        desc = f"epoch {epoch + 1}/{cfg.epochs}" + (f" at {size} px" if size else "")
        bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)
        for x, y, d, *twins in bar:
            x = _resized(x, size)
            if twins:  # the clean twins shrink with their marked draws
                twins = [_resized(twins[0], size), twins[1]]
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y, d = y.to(device), d.to(device)
            target = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            logits, diag_logits, shift = _forward_with_twins(model, x, *twins, device=device)
            loss = loss_fn(logits, target)
            if diag_logits is not None and bool((d >= 0).any()):
                # mean over the records that carry a diagnosis, weighted against the malignancy loss
                loss = loss + cfg.diagnosis_weight * diagnosis_loss(diag_logits, d) / (d >= 0).sum()
            if shift is not None:
                loss = loss + cfg.stamp_consistency * (shift**2).mean()
                mark_shifts.append(shift.detach().float().cpu().numpy())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            train_logits.append(logits.detach().float().cpu().numpy())
            train_y.append(y.cpu().numpy())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        val_logits = predict_logits(model, val_px, spec, device=device)
        val_loss = float(np.mean(np.logaddexp(0, val_logits) - y_val * val_logits))
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "train_auc": metrics.roc_auc(np.concatenate(train_y), np.concatenate(train_logits)),
            "val_loss": val_loss,
            "val_auc": metrics.roc_auc(y_val, val_logits),
            "lr": float(scheduler.get_last_lr()[0]),
            "train_size": size or cfg.image_size,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if cfg.stamp_consistency > 0:  # how far a pasted mark moved the logit during the epoch (marked - clean)
            shifts = np.concatenate(mark_shifts) if mark_shifts else np.zeros(0)
            row["mark_shift_mean"] = float(shifts.mean()) if len(shifts) else float("nan")
            row["mark_shift_median_abs"] = float(np.median(np.abs(shifts))) if len(shifts) else float("nan")
        history.append(row)
        improved = row["val_auc"] > best_auc
        if improved:
            best_auc, best_epoch, stale = row["val_auc"], epoch + 1, 0
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "epoch": epoch + 1,
                    "arch": cfg.arch,
                    "dropout": cfg.dropout,
                    "image_size": cfg.image_size,
                    "n_diagnoses": n_diagnoses,
                },
                run / "best.pt",
            )
        else:
            stale += 1
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "loader_rng": gen.get_state(),
                "epoch": epoch,
                "history": history,
                "best_auc": best_auc,
                "best_epoch": best_epoch,
                "stale": stale,
            },
            last_ckpt,
        )
        _write_csv(run / "history.csv", history)
        log.info(
            "epoch %d/%d  train loss %.4f auc %.4f | val loss %.4f auc %.4f%s",
            epoch + 1,
            cfg.epochs,
            row["train_loss"],
            row["train_auc"],
            row["val_loss"],
            row["val_auc"],
            "  *best" if improved else "",
        )

    # Calibrate the best checkpoint on validation: temperature, then the operating threshold.
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(best["model"])
    val_logits = predict_logits(model, val_px, spec, device=device)
    calibration = {
        "best_epoch": best["epoch"],
        # the diagnosis head's prior: the share of each class among the training draws with a diagnosis
        **(
            {"diagnosis_prior": dict(zip(DIAGNOSES, diagnosis_prior(train_recs, draws).tolist(), strict=True))}
            if n_diagnoses
            else {}
        ),
        **operating_point(
            val_logits,
            y_val,
            [r.source for r in val_recs],
            [f"{r.source}/{r.patient or r.group}" for r in val_recs],
            cfg.target_sensitivity,
        ),
    }
    (run / "calibration.json").write_text(json.dumps(calibration, indent=2))
    np.savez(
        run / "val_predictions.npz",
        keys=np.array([r.uid for r in val_recs]),
        logits=val_logits,
        labels=y_val,
    )
    seconds = time.perf_counter() - t0
    log.info(
        "best epoch %d, validation AUC %.4f, temperature %.3f, threshold %.3f",
        best["epoch"],
        best_auc,
        calibration["temperature"],
        calibration["threshold"],
    )
    return RunResult(
        run, best["epoch"], best_auc, calibration["temperature"], calibration["threshold"], len(history), seconds
    )


def _forward_with_twins(
    model: LesionNet,
    x: torch.Tensor,
    twins: torch.Tensor | None = None,
    has_twin: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The batch's malignancy and diagnosis logits and, for `stamp_consistency`, each marked draw's logit
    minus its clean twin's (None without twins). The twins go through the network in the same training-mode
    pass as the batch (the same batch-norm statistics; eval mode's running statistics lag far behind a
    fine-tuning network) and the change is penalised on both sides. They add a forward and backward pass
    per marked draw, and enter no other loss."""
    if twins is None or not bool(has_twin.any()):
        logits, diag_logits = model.forward_both(x)
        return logits, diag_logits, None
    n = len(x)
    clean = twins[has_twin].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    logits, diag_logits = model.forward_both(torch.cat([x, clean]))
    shift = logits[:n][has_twin.to(device)] - logits[n:]
    return logits[:n], None if diag_logits is None else diag_logits[:n], shift


def _resized(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """A batch of normalised images shrunk to `size` px (None: as it is), as progressive resizing trains its
    early epochs: the same augmented draws, antialiased, so the network sees the photo, not its aliasing."""
    if size is None or x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _balanced(cfg: TrainConfig) -> bool:
    """Whether draws follow data.sampling_weights (else every image once per epoch, shuffled)."""
    return bool(
        cfg.source_weights or cfg.samples_per_epoch or cfg.source_balance != 1.0 or cfg.diagnosis_balance != 1.0
    )


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    fields = list(dict.fromkeys(k for row in rows for k in row))  # a run resumed from an older version adds columns
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
