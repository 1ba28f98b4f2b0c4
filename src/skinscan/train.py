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
from .config import TrainConfig
from .data import Record, drop_exact_duplicates, grouped_split, load_dataset
from .errors import ConfigError, DatasetError
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


def load_split(cfg: TrainConfig) -> tuple[list[Record], list[Record], dict]:
    """Training records of `cfg.data` (its `train` split if it has one), de-duplicated and split."""
    if not cfg.data:
        raise ConfigError("no training data: pass --data DATASET (e.g. ../shared/datasets/isic-mvb)")
    root = Path(cfg.data)
    has_train_split = root.is_dir() and (root / "train").is_dir()
    records = load_dataset(root, split="train" if has_train_split else None)
    records, n_dupes = drop_exact_duplicates(records)
    if cfg.limit:
        rng = np.random.default_rng(cfg.seed)
        records = [records[i] for i in sorted(rng.permutation(len(records))[: cfg.limit])]
    train, val = grouped_split(records, cfg.val_fraction, cfg.seed)
    digest = hashlib.sha256("\n".join(sorted(f"{r.key}:{r.md5 or ''}" for r in records)).encode()).hexdigest()
    info = {
        "dataset": str(root),
        "split": "train" if has_train_split else None,
        "n_images": len(records),
        "exact_duplicates_dropped": n_dupes,
        "n_train": len(train),
        "n_val": len(val),
        "n_train_malignant": sum(r.label for r in train),
        "n_val_malignant": sum(r.label for r in val),
        "records_sha256": digest,
        "val_keys": sorted(r.key for r in val),
    }
    return train, val, info


def _cache_pixels(records: list[Record], spec: PreprocessSpec, desc: str) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.empty((len(records), spec.size, spec.size, 3), dtype=np.uint8)
    for i, r in enumerate(tqdm(records, desc=desc, unit="img", leave=False)):
        out[i] = load_pixels(r.path, spec)
    return out


class _ImageSet(Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray, spec: PreprocessSpec, augment, seed: int):
        self.pixels, self.labels, self.spec, self.augment = pixels, labels, spec, augment
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, self.epoch, i))  # reproducible per epoch and image
        x = normalise(self.augment(self.pixels[i], rng), self.spec)
        return torch.from_numpy(x), torch.tensor(float(self.labels[i]))


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.inference_mode()
def predict_logits(model: LesionNet, pixels: np.ndarray, spec: PreprocessSpec, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(normalise(pixels[i : i + batch_size], spec)).contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> RunResult:
    """Fine-tune the network on `cfg.data`; writes everything into `out` and returns a summary."""
    from tqdm.auto import tqdm

    run = Path(out)
    last_ckpt = run / "last.pt"
    if last_ckpt.exists() and not resume:
        raise ConfigError(f"{run} already holds a training run: pass --resume to continue it, or choose another --out")
    if resume and not last_ckpt.exists():
        raise ConfigError(f"nothing to resume: {last_ckpt} does not exist")
    run.mkdir(parents=True, exist_ok=True)
    if resume:
        saved = TrainConfig(**yaml.safe_load((run / "config.yaml").read_text()))
        if saved.model_dump(exclude={"workers", "threads"}) != cfg.model_dump(exclude={"workers", "threads"}):
            raise ConfigError(f"{run} was trained with other settings (see its config.yaml); resume with the same")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    spec = PreprocessSpec(size=cfg.image_size)
    train_recs, val_recs, data_info = load_split(cfg)
    if not train_recs or not val_recs:
        raise DatasetError("the split left no training or no validation images")
    (run / "data.json").write_text(json.dumps(data_info, indent=2))
    log.info("train %d images, validation %d", len(train_recs), len(val_recs))

    train_px = _cache_pixels(train_recs, spec, "decode train")
    val_px = _cache_pixels(val_recs, spec, "decode val")
    y_train = np.array([r.label for r in train_recs], dtype=np.float32)
    y_val = np.array([r.label for r in val_recs], dtype=np.int64)

    model = LesionNet(cfg.arch, cfg.dropout, pretrained=True, image_size=cfg.image_size).to(
        memory_format=torch.channels_last
    )
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dataset = _ImageSet(train_px, y_train, spec, build_augment(cfg.augment, cfg.image_size), cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.workers,
        generator=gen,
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
    pos_weight = None  # classes are near balanced here; the threshold is chosen on validation anyway
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience:
            break
        dataset.epoch = epoch
        model.train()
        losses, train_logits, train_y = [], [], []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, disable=not progress)
        for x, y in bar:
            x = x.contiguous(memory_format=torch.channels_last)
            target = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            logits = model(x)
            loss = loss_fn(logits, target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            train_logits.append(logits.detach().numpy())
            train_y.append(y.numpy())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        val_logits = predict_logits(model, val_px, spec)
        val_loss = float(np.mean(np.logaddexp(0, val_logits) - y_val * val_logits))
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "train_auc": metrics.roc_auc(np.concatenate(train_y), np.concatenate(train_logits)),
            "val_loss": val_loss,
            "val_auc": metrics.roc_auc(y_val, val_logits),
            "lr": float(scheduler.get_last_lr()[0]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
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
        _write_history(run, history)
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
    val_logits = predict_logits(model, val_px, spec)
    temperature = metrics.fit_temperature(val_logits, y_val)
    val_prob = metrics.sigmoid(val_logits / temperature)
    threshold = metrics.threshold_for_sensitivity(y_val, val_prob, cfg.target_sensitivity)
    val_metrics = metrics.binary_metrics(y_val, val_prob, threshold, [r.group for r in val_recs])
    calibration = {
        "temperature": temperature,
        "threshold": threshold,
        "target_sensitivity": cfg.target_sensitivity,
        "best_epoch": best["epoch"],
        "validation": val_metrics.to_dict(),
    }
    (run / "calibration.json").write_text(json.dumps(calibration, indent=2))
    np.savez(run / "val_predictions.npz", keys=np.array([r.key for r in val_recs]), logits=val_logits, labels=y_val)
    seconds = time.perf_counter() - t0
    log.info(
        "best epoch %d, validation AUC %.4f, temperature %.3f, threshold %.3f",
        best["epoch"],
        best_auc,
        temperature,
        threshold,
    )
    return RunResult(run, best["epoch"], best_auc, temperature, threshold, len(history), seconds)


def _write_history(run: Path, history: list[dict]) -> None:
    import csv

    with (run / "history.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
