"""The quality gate, measured: what it refuses among real lesion photos, what it catches, what it costs.

- Rejection (verdict "retake", any reason) on the isic-mvb test split (660), on all 586 phone photos, and
  on the phone photos the model never trained on (its card's validation photos) alone: the other
  phone photos are in the shipped model's training set, and so in the gate's fit.
- Flag rate on the held-out half of the non-lesion set (tests/assets/nonlesion/holdout), overall, by the
  out-of-distribution check alone, and per category.
- Synthetic degradations of real photos (every 3rd isic test image and the held-out phone photos):
  Gaussian blur (sigma 1.5, 2 and 3 px at the model's 224 px scale), dark (brightness x0.25), overexposed
  (x2.5), and too small (shorter side 100 px): the share flagged, and flagged for the right reason.
- Latency, alternated in the same run: `Predictor.predict` with the gate, with a no-op gate, and the bare
  decode + inference + calibration; and the gate's own time per image (Prediction.timings_ms["gate"]).

A model whose card has no `quality_gate` runs the pixel checks only; `--fit-gate` then fits the
out-of-distribution check in memory, as `skinscan export --gate` would (the archive's training split,
the phone photos it trained on, and the non-lesion tune half), without touching the model file.

    python benchmarks/bench_quality_gate.py --out reports/quality_gate.json
    python benchmarks/bench_quality_gate.py --model /tmp/m/skinscan-lite0-isic.onnx --fit-gate --out /tmp/qg.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from skinscan.data import IMAGE_SUFFIXES, load_dataset
from skinscan.predict import Prediction, Predictor
from skinscan.preprocess import load_pixels, normalise
from skinscan.quality import (
    BLURRED,
    OVEREXPOSED,
    TOO_DARK,
    TOO_SMALL,
    QualityGate,
    QualityReport,
    fit_quality_gate,
)

REPO = Path(__file__).resolve().parents[1]
BARS = {"isic_test": 0.05, "phone_all": 0.10, "nonlesion_holdout": 0.95}


# ---------------------------------------------------------------- helpers
def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _decoded(path: Path) -> Image.Image:
    from skinscan.preprocess import decode_image

    return decode_image(path)


def _blur(sigma_224: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: img.filter(ImageFilter.GaussianBlur(sigma_224 * min(img.size) / 224))


def _shrink(side: int) -> Callable[[Image.Image], Image.Image]:
    def f(img: Image.Image) -> Image.Image:
        scale = side / min(img.size)
        return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)

    return f


DEGRADATIONS: dict[str, tuple[Callable[[Image.Image], Image.Image], str]] = {
    "blur sigma 1.5 px @224": (_blur(1.5), BLURRED),
    "blur sigma 2 px @224": (_blur(2.0), BLURRED),
    "blur sigma 3 px @224": (_blur(3.0), BLURRED),
    "dark (brightness x0.25)": (lambda img: ImageEnhance.Brightness(img).enhance(0.25), TOO_DARK),
    "overexposed (brightness x2.5)": (lambda img: ImageEnhance.Brightness(img).enhance(2.5), OVEREXPOSED),
    "too small (100 px)": (_shrink(100), TOO_SMALL),
}


def _rates(preds: Sequence[Prediction]) -> dict:
    ok = [p for p in preds if p.ok]
    problems = Counter(code for p in ok for code in p.quality_report.problems)
    return {
        "n": len(preds),
        "unreadable": len(preds) - len(ok),
        "retake": round(sum(p.quality == "retake" for p in ok) / max(len(ok), 1), 4),
        "by_problem": {k: round(v / max(len(ok), 1), 4) for k, v in sorted(problems.items())},
    }


def _phone_patient(path: Path) -> str:
    return "_".join(path.stem.split("_")[:2])  # PAT_1014_85_22 -> PAT_1014


def _nonlesion_categories(folder: Path) -> dict[str, str]:
    """file name -> category, from the set's SOURCES.md table."""
    out = {}
    sources = folder / "SOURCES.md"
    if sources.is_file():
        for line in sources.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[1].endswith(".jpg"):
                out[cells[1]] = cells[2]
    return out


def _fit_gate_in_memory(predictor: Predictor, data_root: Path, nonlesion: Path, held_out: frozenset[str]) -> dict:
    """What `skinscan export --gate` stores, fitted here without rewriting the model file: on the datasets
    the card says the model was trained on (both, if it does not say), its held-out photos left out."""
    config = ((predictor.card.model_extra or {}).get("training") or {}).get("config") or {}
    sources = {Path(d).parent.name if Path(d).suffix == ".csv" else Path(d).name for d in config.get("data") or []}
    sources = sources or {"isic-mvb", "pad-ufes-20-phone"}
    records = load_dataset(data_root / "isic-mvb", split="train") if "isic-mvb" in sources else []
    if "pad-ufes-20-phone" in sources:
        records += [r for r in load_dataset(data_root / "pad-ufes-20-phone") if r.uid not in held_out]
    tune = sorted(p for p in (nonlesion / "tune").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def embed(paths: Sequence[Path]) -> np.ndarray:
        out = []
        for i in range(0, len(paths), 32):
            px = np.stack([load_pixels(p, predictor.spec) for p in paths[i : i + 32]])
            out.append(predictor.run(normalise(px, predictor.spec))["embedding"])
        return np.concatenate(out)

    section = fit_quality_gate(
        embed([r.path for r in records]),
        embed(tune),
        train_sources=[r.source for r in records],
        train_groups=[f"{r.source}/{r.group}" for r in records],
        nonlesion_groups=[re.sub(r"-(full|crop\d+)$", "", p.stem) for p in tune],
    )
    predictor.gate = QualityGate.from_card({"quality_gate": section}, ["embedding"])
    return section["fit"]


class _NoGate:
    """Stands in for the gate: every photo ok, no work. Isolates the gate's cost inside `predict`."""

    def check(
        self, pixels: np.ndarray, sides: Sequence, embeddings: np.ndarray | None, measures: Sequence | None = None
    ) -> list[QualityReport]:
        ok = QualityReport(
            verdict="ok",
            reasons=(),
            problems=(),
            sharpness=1.0,
            brightness=128.0,
            bright_end=200.0,
            dark_clipped=0.0,
            bright_clipped=0.0,
            colour=50.0,
            shorter_side=None,
        )
        return [ok] * len(pixels)


def _latency(predictor: Predictor, datas: list[bytes], repeats: int) -> dict:
    """ms per image: `predict` with the gate; `predict` with a no-op gate; and the bare decode + inference +
    calibration (the pipeline before the gate existed), alternated in the same run."""
    gate = predictor.gate

    def bare(batch: list[bytes]) -> None:
        px = np.stack([load_pixels(d, predictor.spec) for d in batch])
        predictor.calibrate(predictor.run(normalise(px, predictor.spec))["logit"])

    def predict(batch: list[bytes], with_gate: bool) -> None:
        predictor.gate = gate if with_gate else _NoGate()  # type: ignore[assignment]
        try:
            predictor.predict(batch, batch_size=len(batch))
        finally:
            predictor.gate = gate

    systems: dict[str, Callable[[list[bytes]], None]] = {
        "predict_with_gate": lambda b: predict(b, True),
        "predict_no_op_gate": lambda b: predict(b, False),
        "decode_infer_only": bare,
    }
    out = {}
    for batch_size in (1, 16):
        batches = [datas[i : i + batch_size] for i in range(0, len(datas), batch_size)]
        timings: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(repeats):  # alternate, so that load on the machine hits all alike
            for name, fn in systems.items():
                t = time.perf_counter()
                for b in batches:
                    fn(b)
                timings[name].append((time.perf_counter() - t) * 1000 / len(datas))
        gate_ms = [p.timings_ms["gate"] for p in predictor.predict(datas, batch_size=batch_size) if p.ok]
        out[f"batch_{batch_size}"] = {
            **{f"{name}_ms_per_image": round(statistics.median(v), 3) for name, v in timings.items()},
            "gate_own_ms_per_image": round(statistics.median(gate_ms), 3),
        }
    return out


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="ONNX model (default: the bundled model)")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--nonlesion", type=Path, default=REPO / "tests" / "assets" / "nonlesion")
    parser.add_argument("--fit-gate", action="store_true", help="fit the OOD check in memory if the card has none")
    parser.add_argument("--latency-images", type=int, default=64, help="images for the latency comparison")
    parser.add_argument("--repeats", type=int, default=3, help="latency repeats (median)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    predictor = Predictor(args.model, threads=args.threads)
    held_out = predictor.card.validation_keys  # photos the network never trained on
    result: dict = {
        "model": {**predictor.info(), "path": str(predictor.model_path)},
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "bars": BARS,
    }
    if predictor.gate.ood is None and args.fit_gate:
        t = time.perf_counter()
        result["gate_fitted_in_memory"] = _fit_gate_in_memory(predictor, args.data_root, args.nonlesion, held_out)
        result["gate_fit_seconds"] = round(time.perf_counter() - t, 1)
    result["gate"] = {
        "thresholds": predictor.gate.thresholds.to_dict(),
        "ood": None
        if predictor.gate.ood is None
        else {
            "transform": predictor.gate.ood.transform,
            "components": int(predictor.gate.ood.basis.shape[0]),
            "mode": predictor.gate.ood.mode,
            "probe": predictor.gate.ood.probe is not None,
        },
    }

    def predict(paths_or_bytes: Sequence) -> list[Prediction]:
        return predictor.predict(list(paths_or_bytes), batch_size=32, force=True)

    # real photos
    isic_test = load_dataset(args.data_root / "isic-mvb", split="test")
    phone = load_dataset(args.data_root / "pad-ufes-20-phone")
    box = [r for r in phone if r.uid in held_out]
    p_isic = predict([r.path for r in isic_test])
    p_phone = predict([r.path for r in phone])
    in_box = {str(r.path) for r in box}
    result["real"] = {
        "isic_test": _rates(p_isic),
        "phone_all": _rates(p_phone),
        "phone_held_out": _rates([p for p in p_phone if p.path in in_box]),
        "phone_in_training": _rates([p for p in p_phone if p.path not in in_box]),
    }
    small_phone = [p for p, r in zip(p_phone, phone, strict=True) if min(Image.open(r.path).size) <= 300]
    result["real"]["phone_shorter_side_<=300px"] = _rates(small_phone)

    # non-lesion pictures
    nonlesion = {}
    categories = _nonlesion_categories(args.nonlesion)
    for half in ("tune", "holdout"):
        paths = sorted(p for p in (args.nonlesion / half).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        preds = predict(paths)
        rates = _rates(preds)
        by_cat: dict[str, list[bool]] = {}
        for path, p in zip(paths, preds, strict=True):
            by_cat.setdefault(categories.get(path.name, "?"), []).append(p.quality == "retake")
        rates["by_category"] = {c: f"{sum(v)}/{len(v)}" for c, v in sorted(by_cat.items())}
        rates["missed"] = [path.name for path, p in zip(paths, preds, strict=True) if p.quality != "retake"]
        nonlesion[half] = rates
    result["nonlesion"] = nonlesion

    # synthetic degradations of real photos
    base = [r.path for r in isic_test[::3]] + [r.path for r in box]
    originals = [_decoded(p) for p in base]
    degraded = {}
    for name, (fn, code) in DEGRADATIONS.items():
        preds = predict([_jpeg(fn(img)) for img in originals])
        ok = [p for p in preds if p.ok]
        degraded[name] = {
            "n": len(preds),
            "flagged": round(sum(p.quality == "retake" for p in ok) / max(len(ok), 1), 4),
            "flagged_for_the_right_reason": round(
                sum(code in p.quality_report.problems for p in ok) / max(len(ok), 1), 4
            ),
        }
    result["degraded"] = degraded

    # latency
    lat_paths = [r.path for r in isic_test[: args.latency_images // 2]] + [
        r.path for r in box[: args.latency_images // 2]
    ]
    result["latency"] = _latency(predictor, [p.read_bytes() for p in lat_paths], args.repeats)

    print(_markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")


def _markdown(r: dict) -> str:
    real, nl = r["real"], r["nonlesion"]
    g = r["gate"]["ood"]
    ood = (
        "off (the card has no quality_gate)"
        if g is None
        else f"{g['transform']} embedding, {g['components']} components, {g['mode']}"
        + (" + linear probe" if g["probe"] else "")
    )

    def problems(d: dict) -> str:
        return ", ".join(f"{k} {v:.1%}" for k, v in d["by_problem"].items()) or "-"

    def bar(value: float, key: str, above: bool = False) -> str:
        passed = value >= BARS[key] if above else value < BARS[key]
        return f"{'<' if not above else '>='} {BARS[key]:.0%}: {'PASS' if passed else 'FAIL'}"

    lines = [
        f"## Quality gate - model {r['model']['name']} {r['model']['version']} (sha256 {r['model']['sha256'][:12]}); OOD check {ood}",
        "",
        "| set | images | refused (retake) | reasons | bar |",
        "|---|---|---|---|---|",
        f"| isic-mvb test | {real['isic_test']['n']} | {real['isic_test']['retake']:.1%} | {problems(real['isic_test'])} | {bar(real['isic_test']['retake'], 'isic_test')} |",
        f"| phone, all | {real['phone_all']['n']} | {real['phone_all']['retake']:.1%} | {problems(real['phone_all'])} | {bar(real['phone_all']['retake'], 'phone_all')} |",
        f"| phone, held out (validation) | {real['phone_held_out']['n']} | {real['phone_held_out']['retake']:.1%} | {problems(real['phone_held_out'])} | |",
        f"| phone, shorter side <= 300 px | {real['phone_shorter_side_<=300px']['n']} | {real['phone_shorter_side_<=300px']['retake']:.1%} | {problems(real['phone_shorter_side_<=300px'])} | |",
        f"| non-lesion, tune half | {nl['tune']['n']} | {nl['tune']['retake']:.1%} | {problems(nl['tune'])} | (fitted on) |",
        f"| non-lesion, holdout half | {nl['holdout']['n']} | {nl['holdout']['retake']:.1%} | {problems(nl['holdout'])} | {bar(nl['holdout']['retake'], 'nonlesion_holdout', above=True)} |",
        "",
        f"Non-lesion holdout by category (flagged/total): {', '.join(f'{k} {v}' for k, v in nl['holdout']['by_category'].items())}; "
        f"missed: {', '.join(nl['holdout']['missed']) or 'none'}",
        "",
        "| degradation (every 3rd isic test image + held-out phone photos) | images | flagged | for the right reason |",
        "|---|---|---|---|",
        *[
            f"| {k} | {v['n']} | {v['flagged']:.1%} | {v['flagged_for_the_right_reason']:.1%} |"
            for k, v in r["degraded"].items()
        ],
        "",
        "| latency, ms per image | decode + inference only | predict, no-op gate | predict with the gate | the gate's own time |",
        "|---|---|---|---|---|",
        *[
            f"| {k.replace('_', ' ')} | {v['decode_infer_only_ms_per_image']:.2f} | {v['predict_no_op_gate_ms_per_image']:.2f} "
            f"| {v['predict_with_gate_ms_per_image']:.2f} | {v['gate_own_ms_per_image']:.2f} |"
            for k, v in r["latency"].items()
        ],
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
