"""Foundation benchmark: the bundled model's quality bars and its speed, each beside a baseline
measured in the same run.

Quality: ROC AUC (bootstrap 95% CI), sensitivity/specificity at the model's threshold, ECE (15 bins) on
isic-mvb test (646 de-leaked and all 660) and on pad-ufes-20-phone (all 586; the bundled archive model
never saw them), next to the prototype's architecture (raw pixels / 255 -> Dense 256 -> Dense 256 ->
sigmoid, 5 epochs, Adam 1e-3, batch 32) trained here on the same training split.
Speed: single-image latency (p50/p99) and batch-32 throughput of skinscan prediction (decode +
preprocess + ONNX Runtime) vs. the same network(s) in PyTorch eager (inference_mode, channels_last, the
malloc settings; an ensemble model's networks all run, their logits averaged, as in its ONNX graph), both
including decode and preprocessing.

    python benchmarks/bench_foundation.py --run runs/isic-lite0 --out reports/bench-foundation.json
    python benchmarks/bench_foundation.py --skip-quality --run runs/skinscan-phone runs/skinscan-phone-s1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "10000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}


def quality(args: argparse.Namespace) -> dict:
    from skinscan.data import load_dataset, without_leaks
    from skinscan.evaluate import score
    from skinscan.metrics import binary_metrics
    from skinscan.predict import Predictor

    root = Path(args.data_root)
    predictor = Predictor(args.model)
    train = load_dataset(root / "isic-mvb", split="train")
    test = load_dataset(root / "isic-mvb", split="test")
    clean = {r.key for r in without_leaks(test, train)}
    phone = load_dataset(root / "pad-ufes-20-phone")
    sets = {
        "isic-mvb test, 646 de-leaked": [r for r in test if r.key in clean],
        "isic-mvb test, all 660": test,
        "pad-ufes-20-phone, all 586": phone,
    }
    out: dict = {"skinscan": {}, "prototype": {}}
    for name, recs in sets.items():
        p, _ = score(predictor, recs, progress=False)
        y = np.array([r.label for r in recs])
        out["skinscan"][name] = binary_metrics(
            y, p, predictor.threshold, [r.patient or r.group for r in recs]
        ).to_dict()
    out["prototype"] = prototype_baseline(train, sets)
    return out


def prototype_baseline(train, sets: dict) -> dict:
    """The prototype's Keras network re-created in torch: raw pixels in [0, 1], two Dense 256, sigmoid."""
    import torch
    from PIL import Image

    from skinscan.metrics import binary_metrics

    torch.manual_seed(0)

    def pixels(recs):  # the prototype's own preprocessing: resize to 224x224, divide by 255
        return torch.from_numpy(
            np.stack(
                [
                    np.asarray(Image.open(r.path).convert("RGB").resize((224, 224)), dtype=np.float32) / 255.0
                    for r in recs
                ]
            ).reshape(len(recs), -1)
        )

    x, y = pixels(train), torch.tensor([float(r.label) for r in train])
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(5):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx])
            loss.backward()
            opt.step()
    out = {}
    with torch.inference_mode():
        for name, recs in sets.items():
            p = torch.sigmoid(net(pixels(recs)).squeeze(1)).numpy()
            yy = np.array([r.label for r in recs])
            m = binary_metrics(yy, p, 0.5, [r.patient or r.group for r in recs]).to_dict()
            out[name] = {k: m[k] for k in ("auc", "auc_ci", "accuracy", "sensitivity", "specificity", "ece")}
    return out


def speed(args: argparse.Namespace) -> dict:
    import torch

    from skinscan.export import load_run_model
    from skinscan.predict import Predictor
    from skinscan.preprocess import load_pixels, normalise

    root = Path(args.data_root) / "isic-mvb" / "test"
    files = sorted(root.rglob("*.jpg"))[: max(args.n_single, 32 * args.n_batches)]
    blobs = [f.read_bytes() for f in files]
    predictor = Predictor(args.model)
    spec = predictor.spec
    nets = [load_run_model(Path(r))[0].to(memory_format=torch.channels_last).eval() for r in args.run]

    def torch_logit(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x) for net in nets]).mean(0)

    def torch_predict(batch_bytes):
        x = torch.from_numpy(normalise(np.stack([load_pixels(b, spec) for b in batch_bytes]), spec))
        with torch.inference_mode():
            return torch.sigmoid(
                torch_logit(x.contiguous(memory_format=torch.channels_last)) / predictor.card.temperature
            )

    def onnx_predict(batch_bytes):
        return predictor.predict(batch_bytes)

    # parity on real images, first: a baseline of other networks than the model's would time the wrong thing
    x = normalise(np.stack([load_pixels(b, spec) for b in blobs[:32]]), spec)
    with torch.inference_mode():
        parity = float(np.abs(predictor.run(x)["logit"] - torch_logit(torch.from_numpy(x)).numpy()).max())
    if parity > 1e-3:
        sys.exit(
            f"--run {' '.join(args.run)}: these networks are not the model's (logits differ by up to {parity:.3g}); "
            "pass every run the model was exported from"
        )

    res = {}
    for name, fn in (("skinscan (ONNX Runtime)", onnx_predict), ("PyTorch eager", torch_predict)):
        for b in blobs[:5]:
            fn([b])  # warm-up
        lat = []
        for b in blobs[: args.n_single]:
            t = time.perf_counter()
            fn([b])
            lat.append((time.perf_counter() - t) * 1000)
        thr = []
        for i in range(args.n_batches):
            chunk = blobs[i * 32 : (i + 1) * 32]
            t = time.perf_counter()
            fn(chunk)
            thr.append(len(chunk) / (time.perf_counter() - t))
        res[name] = {
            "single_p50_ms": statistics.median(lat),
            "single_p99_ms": float(np.percentile(lat, 99)),
            "batch32_images_per_s_median": statistics.median(thr),
        }
    a, b = res["skinscan (ONNX Runtime)"], res["PyTorch eager"]
    res["ratio"] = {
        "latency_p50_torch_over_onnx": b["single_p50_ms"] / a["single_p50_ms"],
        "throughput_onnx_over_torch": a["batch32_images_per_s_median"] / b["batch32_images_per_s_median"],
    }
    res["max_abs_logit_diff_onnx_vs_torch"] = parity
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="ONNX model (default: the bundled one)")
    ap.add_argument(
        "--run",
        nargs="+",
        default=["runs/isic-lite0"],
        help="training run(s) of the same model (torch baseline; every run of an ensemble model)",
    )
    ap.add_argument("--data-root", default=os.environ.get("SKINSCAN_DATA", "../shared/datasets"))
    ap.add_argument("--out", default="reports/bench-foundation.json")
    ap.add_argument("--n-single", type=int, default=200, help="images for single-image latency")
    ap.add_argument("--n-batches", type=int, default=10, help="batches of 32 for throughput")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if sys.platform.startswith("linux") and not all(k in os.environ for k in MALLOC):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})  # glibc reads them at start
    result = {} if args.skip_speed else {"speed": speed(args)}
    if not args.skip_quality:
        result["quality"] = quality(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = []
    if "quality" in r:
        lines += [
            "| set | model | ROC AUC [95% CI] | sensitivity | specificity | accuracy | ECE |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in r["quality"]["skinscan"]:
            for who in ("skinscan", "prototype"):
                m = r["quality"][who][name]
                lines.append(
                    f"| {name} | {who} | {m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}] | "
                    f"{m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['accuracy']:.3f} | {m['ece']:.3f} |"
                )
        lines.append("")
    if "speed" not in r:
        return "\n".join(lines)
    s = r["speed"]
    lines += ["| predictor | single image p50 (ms) | p99 (ms) | batch-32 images/s (median) |", "|---|---|---|---|"]
    for name in ("skinscan (ONNX Runtime)", "PyTorch eager"):
        v = s[name]
        lines.append(
            f"| {name} | {v['single_p50_ms']:.1f} | {v['single_p99_ms']:.1f} | {v['batch32_images_per_s_median']:.1f} |"
        )
    lines.append(
        f"\nRatios: torch/ONNX p50 latency {s['ratio']['latency_p50_torch_over_onnx']:.2f}x, "
        f"ONNX/torch throughput {s['ratio']['throughput_onnx_over_torch']:.2f}x; "
        f"max |logit diff| {s['max_abs_logit_diff_onnx_vs_torch']:.2e}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
