"""Phone-photo bars of issue 7 for the shipped model, each beside the archive-only baseline, same run.

Scores (once) the locked box of phone-photo patients (splits/pad-ufes-20-phone-lockbox.txt) and the
archive test split with the shipped model and with the archive-only baseline model: ROC AUC with a
patient-grouped bootstrap 95% interval, sensitivity/specificity at each model's own threshold, ECE
(15 bins); per skin type, with and without ink marks, lesion level (photos of one lesion combined),
and on synthetic 4:3 full-frame versions of the box's photos (centre crop). The cross-validated figures
on the other 80% come from benchmarks/results/ablation-phone.json (3-fold patient-grouped CV).

    python benchmarks/bench_phone.py --baseline runs/isic-lite0-model/skinscan-lite0-isic.onnx \
        --out reports/bench-phone.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_phone import full_frame
from skinscan.data import load_dataset, read_patient_list, without_leaks
from skinscan.evaluate import by_skin_type
from skinscan.metrics import binary_metrics, bootstrap_auc_ci, roc_auc
from skinscan.predict import Predictor

REPO = Path(__file__).resolve().parents[1]


def ink_fraction(path: Path) -> float:
    """Share of blue-violet marker-pen pixels in the ring around the centre (the lesion is in the centre)."""
    im = Image.open(path).convert("RGB").resize((224, 224))
    hsv = np.asarray(im.convert("HSV"), dtype=np.float32) / 255.0
    h, s, v = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    yy, xx = np.mgrid[0:224, 0:224]
    ring = (yy - 111.5) ** 2 + (xx - 111.5) ** 2 > (0.22 * 224) ** 2
    pen = (h > 195) & (h < 300) & (s > 0.15) & (v > 0.15) & (v < 0.9)
    return float((pen & ring).sum() / ring.sum())


def summary(y, p, thr, groups) -> dict:
    m = binary_metrics(y, p, thr, groups).to_dict()
    keys = ("n", "n_malignant", "auc", "auc_ci", "sensitivity", "specificity", "ece", "ece_if_calibrated")
    return {k: m[k] for k in keys}


def score(predictor: Predictor, paths: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Probabilities, logits, each photo's threshold (its detected type's, where the model has types)."""
    res = predictor.predict(paths, batch_size=32, force=True)
    arrays = (np.array([getattr(r, k) for r in res]) for k in ("probability", "logit", "threshold"))
    return *arrays, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="shipped model (default: the bundled one)")
    ap.add_argument("--baseline", required=True, help="archive-only model (skinscan train --data isic-mvb; export)")
    ap.add_argument("--data-root", default=os.environ.get("SKINSCAN_DATA", "../shared/datasets"))
    ap.add_argument("--ablation", default=str(REPO / "benchmarks/results/ablation-phone.json"))
    ap.add_argument("--out", default="reports/bench-phone.json")
    args = ap.parse_args()
    root = Path(args.data_root)
    box = read_patient_list(REPO / "splits/pad-ufes-20-phone-lockbox.txt")
    phone = load_dataset(root / "pad-ufes-20-phone")
    lock = [r for r in phone if r.patient in box]
    test = load_dataset(root / "isic-mvb", split="test")
    clean = without_leaks(test, load_dataset(root / "isic-mvb", split="train"))
    y_lock = np.array([r.label for r in lock])
    g_lock = [r.patient for r in lock]
    out: dict = {"n_lockbox_photos": len(lock), "n_lockbox_patients": len(box)}

    rng = np.random.default_rng(0)
    frames = []
    for r in lock:
        img = Image.open(r.path).convert("RGB")
        side = min(img.size)  # the ablation's frames hold the square crop; a few photos are a pixel off square
        left, top = (img.width - side) // 2, (img.height - side) // 2
        px = np.asarray(img.crop((left, top, left + side, top + side)))
        frames.append(Image.fromarray(full_frame(px, rng)))
    ink = np.array([ink_fraction(r.path) > 0.004 for r in lock])

    for who, path in (("shipped", args.model), ("archive-only baseline", args.baseline)):
        pred = Predictor(path)
        p_lock, z_lock, t_lock, res = score(pred, [r.path for r in lock])
        p_test, _, t_test, res_test = score(pred, [r.path for r in clean])
        p_frame, _, t_frame, res_frame = score(pred, frames)
        entry = {
            "model": pred.info(),
            "threshold": pred.threshold,
            "photo_types": pred.photo_type_calibration(),
            "lockbox": summary(y_lock, p_lock, t_lock, g_lock),
            "lockbox_full_frame_4x3": summary(y_lock, p_frame, t_frame, g_lock),
            "archive_test_646": summary([r.label for r in clean], p_test, t_test, None),
            "lockbox_quality_retake": int(sum(r.quality == "retake" for r in res)),
            "detected_photo_types": {
                name: dict(Counter(r.photo_type or "untyped" for r in rs))
                for name, rs in (
                    ("lockbox", res),
                    ("lockbox_full_frame_4x3", res_frame),
                    ("archive_test_646", res_test),
                )
            },
        }
        # skin types recorded with the photo (Fitzpatrick); AUC where both classes are present
        entry["lockbox_by_skin_type"] = by_skin_type(lock, p_lock, t_lock)
        entry["lockbox_ink"] = {
            name: {
                "n": int(m.sum()),
                "n_malignant": int(y_lock[m].sum()),
                "auc": roc_auc(y_lock[m], p_lock[m]) if 0 < y_lock[m].sum() < m.sum() else None,
            }
            for name, m in (("with ink marks", ink), ("without ink marks", ~ink))
        }
        # lesion level: a lesion is (patient_id, lesion_id); combine its photos by the mean logit
        lesions = defaultdict(list)
        for i, r in enumerate(lock):
            lesions[r.lesion].append(i)
        multi = [ix for ix in lesions.values() if len(ix) > 1]
        if multi:
            photo_ix = [i for ix in multi for i in ix]
            y_l = np.array([y_lock[ix[0]] for ix in multi])
            z_l = np.array([z_lock[ix].mean() for ix in multi])
            entry["lockbox_lesions_with_several_photos"] = {
                "n_lesions": len(multi),
                "n_photos": len(photo_ix),
                "photo_level_auc": roc_auc(y_lock[photo_ix], z_lock[photo_ix]),
                "lesion_level_auc": roc_auc(y_l, z_l) if 0 < y_l.sum() < len(y_l) else None,
            }
        out[who] = entry

    # cross-validated figures (80% of the phone patients) and ink / lesion analyses on their OOF logits
    ablation = json.loads(Path(args.ablation).read_text())
    out["cross_validated"] = {}
    for rec in ablation:
        oof = rec["oof_phone"]
        keys = sorted(oof)
        y = np.array([oof[k][0] for k in keys])
        z = np.array([oof[k][2] for k in keys])
        pats = [oof[k][1] for k in keys]
        ink_oof = np.array([ink_fraction(root / "pad-ufes-20-phone" / k.split("/", 1)[1]) > 0.004 for k in keys])
        lesion_of = {r.uid: r.lesion for r in phone}
        lesions = defaultdict(list)
        for i, k in enumerate(keys):
            lesions[lesion_of[k]].append(i)
        multi = [ix for ix in lesions.values() if len(ix) > 1]
        y_l = np.array([y[ix[0]] for ix in multi])
        z_l = np.array([z[ix].mean() for ix in multi])
        photo_ix = [i for ix in multi for i in ix]
        out["cross_validated"][rec["recipe"]] = {
            "phone_auc": rec["phone_cv_auc"],
            "archive_test646_auc": rec["archive_test646_auc_ensemble"],
            "ink": {
                "with ink marks": [int(ink_oof.sum()), roc_auc(y[ink_oof], z[ink_oof])],
                "without ink marks": [int((~ink_oof).sum()), roc_auc(y[~ink_oof], z[~ink_oof])],
            },
            "lesions_with_several_photos": {
                "n_lesions": len(multi),
                "photo_level_auc": roc_auc(y[photo_ix], z[photo_ix]),
                "lesion_level_auc": roc_auc(y_l, z_l),
                "lesion_level_auc_ci": list(bootstrap_auc_ci(y_l, z_l, n_boot=500)),
            },
            "n": len(keys),
            "patients": len(set(pats)),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(markdown(out))


def markdown(o: dict) -> str:
    f = lambda m: f"{m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]"  # noqa: E731
    lines = [
        "| model | locked box AUC [95% CI] | sens / spec at threshold | ECE box | 4:3 full frame AUC | "
        "archive test 646 AUC | ECE archive |",
        "|---|---|---|---|---|---|---|",
    ]
    for who in ("shipped", "archive-only baseline"):
        e = o[who]
        lines.append(
            f"| {who} | {f(e['lockbox'])} | {e['lockbox']['sensitivity']:.3f} / "
            f"{e['lockbox']['specificity']:.3f} | {e['lockbox']['ece']:.3f} | "
            f"{e['lockbox_full_frame_4x3']['auc']:.3f} | {f(e['archive_test_646'])} | "
            f"{e['archive_test_646']['ece']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
