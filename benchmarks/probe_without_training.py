"""Inference-time variants of a model, measured by the ordinary benchmarks without retraining or re-exporting
anything (docs/sources.md, "How far the model moves for nothing"). Probes, not features: each variant wraps
`Predictor.run` (the network's input and outputs) in this process only, and the benchmark it runs reports as
usual. Cheap answers to "would X help?" before X earns a place in the model.

    # mirror test-time augmentation: the mean of the photo's and its mirror image's outputs
    python benchmarks/probe_without_training.py mirror-tta benchmarks/bench_shortcuts.py --per-source 100 --out /tmp/tta
    python benchmarks/probe_without_training.py mirror-tta benchmarks/bench_sources.py --out /tmp/tta-sources
    # everything outside the square's inscribed disc set to black before the network (never trained with)
    python benchmarks/probe_without_training.py disc benchmarks/bench_shortcuts.py --per-source 100 --out /tmp/disc
    # do the marks act through Shades-of-Gray? each mark with the stamped vs the unstamped photo's gains
    python benchmarks/probe_without_training.py sog-gains --per-source 40

Variants:
- mirror-tta: logits, diagnosis probabilities and embeddings averaged over the photo and its mirror image,
  the mirror's heatmap mirrored back; temperatures and thresholds stay the card's (AUCs and mark changes
  barely depend on them).
- disc: input pixels outside the inscribed disc set to the normalised value of black (after colour
  constancy, which still sees the whole square).
- sog-gains: its own measurement on the held-out benign photos bench_shortcuts.py samples: each mark's
  median |change| with the stamped photo's colour-constancy gains (as served) and with the unstamped
  photo's (the mark's colour cast removed).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import numpy as np

from skinscan.predict import Predictor

VARIANTS = ("mirror-tta", "disc", "sog-gains")
_run = Predictor.run


def _mirror_tta(self: Predictor, batch: np.ndarray) -> dict[str, np.ndarray]:
    plain, mirrored = _run(self, batch), _run(self, np.ascontiguousarray(batch[..., ::-1]))
    out = dict(plain)
    out["logit"] = (plain["logit"] + mirrored["logit"]) / 2
    if "embedding" in out:
        out["embedding"] = (plain["embedding"] + mirrored["embedding"]) / 2
    if "diagnosis" in out:
        out["diagnosis"] = np.log((np.exp(plain["diagnosis"]) + np.exp(mirrored["diagnosis"])) / 2)
    if "cam" in out:
        out["cam"] = (plain["cam"] + mirrored["cam"][..., ::-1]) / 2
    return out


def _disc(self: Predictor, batch: np.ndarray) -> dict[str, np.ndarray]:
    size = batch.shape[-1]
    c = (np.arange(size) + 0.5) / size * 2 - 1
    outside = np.hypot(*np.meshgrid(c, c)) > 1.0
    black = -np.asarray(self.spec.mean, np.float32) / np.asarray(self.spec.std, np.float32)
    batch = batch.copy()
    for channel in range(3):
        batch[:, channel][:, outside] = black[channel]
    return _run(self, batch)


def _sog_gains(per_source: int, model: str | None) -> None:
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_shortcuts import DATASETS, _sample
    from skinscan.data import load_dataset
    from skinscan.preprocess import _sog_gains as gains_of
    from skinscan.preprocess import load_pixels
    from skinscan.shortcuts import PLACEMENTS, held_out, paste_stamp
    from skinscan.stamps import build_stamps

    predictor = Predictor(model)
    root = Path(os.environ.get("SKINSCAN_DATA", "../shared/datasets"))
    stamps = build_stamps(root)
    records = held_out([r for d in DATASETS for r in load_dataset(root / d)], predictor.card)
    benign = [r for s in sorted({r.source for r in records}) for r in _sample(records, s, 0, per_source)]
    spec = predictor.spec
    mean, std = np.asarray(spec.mean, np.float32) * 255, np.asarray(spec.std, np.float32) * 255

    def network_input(pixels: np.ndarray, gains: np.ndarray) -> np.ndarray:
        return ((np.clip(pixels.astype(np.float32) * gains, 0, 255) - mean) / std).transpose(2, 0, 1)

    changes: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in stamps}
    for record in benign:
        pixels = load_pixels(record.path, spec)
        plain_gains = gains_of(pixels)
        out = _run(predictor, network_input(pixels, plain_gains)[None])
        types = predictor.detect_photo_types(out.get("embedding"), 1)
        before = predictor.calibrate(out["logit"], types)[0]
        for name, stamp in stamps.items():
            if record.source in PLACEMENTS[name].carried_by:
                continue
            stamped = np.asarray(paste_stamp(Image.fromarray(pixels), stamp, name))
            batch = np.stack([network_input(stamped, gains_of(stamped)), network_input(stamped, plain_gains)])
            served, cast_removed = predictor.calibrate(_run(predictor, batch)["logit"], types * 2)
            changes[name][0].append(served - before)
            changes[name][1].append(cast_removed - before)
    print(f"{predictor.card.name} {predictor.card.version}, {len(benign)} held-out benign photos")
    print("| stamp | n | median \\|change\\| as served | with the unstamped photo's gains |")
    print("|---|---|---|---|")
    for name, (served, cast_removed) in changes.items():
        print(f"| {name} | {len(served)} | {np.median(np.abs(served)):.4f} | {np.median(np.abs(cast_removed)):.4f} |")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        raise SystemExit(
            f"usage: probe_without_training.py {{{','.join(VARIANTS)}}} ... (see the docstring)\n{__doc__}"
        )
    variant, rest = sys.argv[1], sys.argv[2:]
    if variant == "sog-gains":
        import argparse

        ap = argparse.ArgumentParser(prog="probe_without_training.py sog-gains")
        ap.add_argument("--per-source", type=int, default=40)
        ap.add_argument("--model", help="model file or bundled name (default: the default model)")
        args = ap.parse_args(rest)
        _sog_gains(args.per_source, args.model)
        return
    if not rest or not Path(rest[0]).is_file():
        raise SystemExit(f"error: give the benchmark script to run with {variant}, then its arguments")
    Predictor.run = {"mirror-tta": _mirror_tta, "disc": _disc}[variant]
    sys.argv = rest
    runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
