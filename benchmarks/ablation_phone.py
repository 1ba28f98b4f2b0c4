"""Phone-photo ablation: patient-grouped K-fold CV on (archive train + phone photos; the figures in
docs/measurements.md left out the retired locked box: --exclude-patients).

For each recipe it reports the cross-validated (out-of-fold) AUC on phone photos, the archive test AUC
(646 de-leaked images, fold-model ensemble and per-fold mean), the same with flip TTA, and the phone AUC
on synthetic 4:3 full-frame photos. Runs each recipe in its own process.

    python benchmarks/ablation_phone.py --data-root ../shared/datasets --out reports/ablation --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PHONE, ARCHIVE = "pad-ufes-20-phone", "isic-mvb"
WEIGHTS = {ARCHIVE: 1.0, PHONE: 1.0}
RECIPES: dict[str, dict] = {
    "A archive only": {"data": [ARCHIVE], "augment": "standard"},
    "B + phone photos": {"data": [ARCHIVE, PHONE], "augment": "standard", "source_weights": WEIGHTS},
    "C + phone augmentation": {"data": [ARCHIVE, PHONE], "augment": "phone", "source_weights": WEIGHTS},
    "D + colour constancy": {
        "data": [ARCHIVE, PHONE],
        "augment": "standard",
        "source_weights": WEIGHTS,
        "color_constancy": "shades-of-gray",
    },
    "E + phone aug + colour constancy": {
        "data": [ARCHIVE, PHONE],
        "augment": "phone",
        "source_weights": WEIGHTS,
        "color_constancy": "shades-of-gray",
    },
    "F = E, natural source mix": {"data": [ARCHIVE, PHONE], "augment": "phone", "color_constancy": "shades-of-gray"},
}


def full_frame(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Place a square lesion crop inside a larger 4:3 field of skin-coloured, slightly noisy pixels."""
    s = pixels.shape[0]
    h = int(s * rng.uniform(1.6, 2.2))
    w = int(h * 4 / 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).mean(axis=0)
    field = border + rng.normal(0, 4, (h, w, 3)) + np.linspace(-12, 12, w)[None, :, None]  # uneven light
    y0 = (h - s) // 2 + int(rng.integers(-h // 10, h // 10 + 1))
    x0 = (w - s) // 2 + int(rng.integers(-w // 10, w // 10 + 1))
    field[y0 : y0 + s, x0 : x0 + s] = pixels
    return np.clip(field, 0, 255).astype(np.uint8)


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    from skinscan import metrics
    from skinscan.config import load_config
    from skinscan.data import load_dataset, read_patient_list, without_leaks
    from skinscan.export import load_run_model
    from skinscan.preprocess import load_pixels
    from skinscan.train import predict_logits, train

    root = Path(args.data_root)
    recipe = dict(RECIPES[name])
    recipe["data"] = [str(root / d) for d in recipe["data"]]
    cfg = load_config(
        overrides={
            **recipe,
            "folds": args.folds,
            "epochs": args.epochs,
            "device": args.device,
            "workers": args.workers,
            "exclude_patients": args.exclude_patients,
            "seed": 0,
        }
    )
    out = Path(args.work) / name.split()[0]
    t0 = time.perf_counter()
    train(cfg, out, resume=(out / "config.yaml").exists(), progress=False)
    train_s = time.perf_counter() - t0
    spec = cfg.preprocess_spec()
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"

    box = read_patient_list(args.exclude_patients) if args.exclude_patients else set()
    phone = [r for r in load_dataset(root / PHONE) if r.patient not in box][: args.max_eval]
    test = load_dataset(root / ARCHIVE, split="test")[:: max(1, 660 // (args.max_eval or 660))]
    clean = {r.key for r in without_leaks(test, load_dataset(root / ARCHIVE, split="train"))}
    test_px = np.stack([load_pixels(r.path, spec) for r in test])
    phone_px = {r.uid: load_pixels(r.path, spec) for r in phone}
    rng = np.random.default_rng(0)
    frame_px = {k: load_pixels(Image.fromarray(full_frame(v, rng)), spec) for k, v in phone_px.items()}

    def tta(model, px):
        views = [px, px[:, :, ::-1], px[:, ::-1, :], px[:, ::-1, ::-1]]
        return np.mean([predict_logits(model, np.ascontiguousarray(v), spec, device=device) for v in views], axis=0)

    oof, test_logits, test_tta = {}, [], []
    per_fold_test_auc = []
    y_test = np.array([r.label for r in test])
    m_clean = np.array([r.key in clean for r in test])
    for k in range(args.folds):
        fold = out / f"fold-{k}"
        model, _ = load_run_model(fold)
        model = model.to(device).to(memory_format=torch.channels_last)
        val_keys = json.loads((fold / "data.json").read_text())["val_keys"]
        keys = [k2 for k2 in val_keys if k2 in phone_px] if PHONE in str(cfg.data) else []
        if ARCHIVE in str(cfg.data) and PHONE not in str(cfg.data):
            keys = []  # archive-only: phone photos are all out of sample; scored by the fold ensemble below
        if keys:
            px = np.stack([phone_px[q] for q in keys])
            fpx = np.stack([frame_px[q] for q in keys])
            plain, flips = predict_logits(model, px, spec, device=device), tta(model, px)
            frame = predict_logits(model, fpx, spec, device=device)
            for q, a, b, c in zip(keys, plain, flips, frame, strict=True):
                oof[q] = (float(a), float(b), float(c))  # python floats: JSON-serialisable
        z = predict_logits(model, test_px, spec, device=device)
        test_logits.append(z)
        test_tta.append(tta(model, test_px))
        per_fold_test_auc.append(metrics.roc_auc(y_test[m_clean], z[m_clean]))
        if not keys and PHONE not in str(cfg.data):
            px = np.stack(list(phone_px.values()))
            fpx = np.stack(list(frame_px.values()))
            plain, flips = predict_logits(model, px, spec, device=device), tta(model, px)
            frame = predict_logits(model, fpx, spec, device=device)
            for i, q in enumerate(phone_px):
                prev = oof.get(q, (0.0, 0.0, 0.0))
                oof[q] = (
                    float(prev[0] + plain[i] / args.folds),
                    float(prev[1] + flips[i] / args.folds),
                    float(prev[2] + frame[i] / args.folds),
                )

    label = {r.uid: r.label for r in phone}
    patient = {r.uid: r.patient for r in phone}
    keys = sorted(oof)
    y = np.array([label[q] for q in keys])
    groups = [patient[q] for q in keys]
    col = np.array([oof[q] for q in keys])
    ens = np.mean(test_logits, axis=0)
    ens_tta = np.mean(test_tta, axis=0)

    def auc_ci(yy, zz, gg=None):
        lo, hi = metrics.bootstrap_auc_ci(yy, zz, gg, n_boot=1000)
        return [metrics.roc_auc(yy, zz), lo, hi]

    return {
        "recipe": name,
        "config": cfg.model_dump(),
        "train_seconds": round(train_s, 1),
        "n_phone_oof": len(keys),
        "phone_cv_auc": auc_ci(y, col[:, 0], groups),
        "phone_cv_auc_tta": auc_ci(y, col[:, 1], groups),
        "phone_cv_auc_full_frame": auc_ci(y, col[:, 2], groups),
        "archive_test646_auc_ensemble": auc_ci(y_test[m_clean], ens[m_clean]),
        "archive_test646_auc_ensemble_tta": auc_ci(y_test[m_clean], ens_tta[m_clean]),
        "archive_test646_auc_per_fold": per_fold_test_auc,
        "archive_test660_auc_ensemble": metrics.roc_auc(y_test, ens),
        "oof_phone": {q: [label[q], patient[q], *oof[q]] for q in keys},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/datasets")
    ap.add_argument("--out", required=True, help="folder for ablation.json and ablation.md")
    ap.add_argument("--work", default="runs/ablation", help="folder for the fold runs, per-recipe results and logs")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument(
        "--exclude-patients",
        help="patients never trained or scored on; the phone-first figures left out the retired locked box: "
        "git show 7cc9730:splits/pad-ufes-20-phone-lockbox.txt > box.txt",
    )
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=1, help="recipes trained at once (one process each)")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which unfinished recipes are stopped")
    ap.add_argument("--recipes", default=",".join(r.split()[0] for r in RECIPES), help="letters, e.g. A,B,E")
    ap.add_argument("--limit", type=int, help="use at most this many training images (smoke runs)")
    ap.add_argument("--max-eval", type=int, help="score at most this many phone photos (smoke runs)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        name = next(r for r in RECIPES if r.split()[0] == args.one)
        (work / f"recipe-{args.one}.json").write_text(json.dumps(run_one(name, args)))
        return
    letters = args.recipes.split(",")
    pending, running = list(letters), []
    base = [
        sys.executable,
        __file__,
        "--data-root",
        args.data_root,
        "--out",
        str(out),
        "--work",
        args.work,
        "--folds",
        str(args.folds),
        "--epochs",
        str(args.epochs),
        "--device",
        args.device,
        "--workers",
        str(args.workers),
        *(["--limit", str(args.limit)] if args.limit else []),
        *(["--max-eval", str(args.max_eval)] if args.max_eval else []),
        *(["--exclude-patients", args.exclude_patients] if args.exclude_patients else []),
    ]
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.parallel:
            letter = pending.pop(0)
            log = (work / f"recipe-{letter}.log").open("w")
            running.append((letter, subprocess.Popen([*base, "--one", letter], stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                print(
                    f"recipe {item[0]} finished with exit code {item[1].returncode} "
                    f"after {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                _summarise(letters, work, out)
        if args.deadline and time.perf_counter() - t0 > args.deadline:
            for letter, proc in running:
                proc.kill()
                print(f"recipe {letter} stopped at the deadline", flush=True)
            break
    print(_summarise(letters, work, out))


def _summarise(letters: list[str], work: Path, out: Path) -> str:
    results = [
        json.loads((work / f"recipe-{x}.json").read_text()) for x in letters if (work / f"recipe-{x}.json").exists()
    ]
    (out / "ablation.json").write_text(json.dumps(results))
    lines = [
        "| recipe | phone CV AUC [95% CI] | + flip TTA | phone 4:3 full frame | "
        "archive test 646 AUC (fold ensemble) | + TTA |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        f = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
        lines.append(
            f"| {r['recipe']} | {f(r['phone_cv_auc'])} | {r['phone_cv_auc_tta'][0]:.3f} | "
            f"{r['phone_cv_auc_full_frame'][0]:.3f} | {f(r['archive_test646_auc_ensemble'])} | "
            f"{r['archive_test646_auc_ensemble_tta'][0]:.3f} |"
        )
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
