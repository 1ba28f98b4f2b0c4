"""Two models on the same 646 de-leaked isic-mvb test images (the archive test the issue's bar names): each
one's ROC AUC, the paired difference with a bootstrap 95% interval (the same resampled images for both,
near-copies together: bench_answers.paired_auc_difference), and the AUC on the images both judge
dermoscopic (the bar's note: its malignant class holds clinical photos).

    python benchmarks/bench_paired_archive.py runs/consist01-models/consist01-full.onnx
    python benchmarks/bench_paired_archive.py CANDIDATE --baseline skinscan-lite0-sources-int8

Both models are forced past the quality gate (every image scored). Prints; writes nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from bench_answers import paired_auc_difference  # the paired bootstrap bench_answers.py uses
from skinscan.data import load_dataset, without_leaks
from skinscan.metrics import roc_auc
from skinscan.predict import Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidate", help="model file or bundled name")
    ap.add_argument("--baseline", help="model file or bundled name (default: the default model)")
    ap.add_argument("--data-root", default=os.environ.get("SKINSCAN_DATA", "../shared/datasets"))
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()

    root = Path(args.data_root) / "isic-mvb"
    records = without_leaks(load_dataset(root, split="test"), load_dataset(root, split="train"))
    y = np.array([r.label for r in records])
    scored = {}
    for name, model in (("candidate", args.candidate), ("baseline", args.baseline)):
        predictor = Predictor(model)
        results = predictor.predict([r.path for r in records], batch_size=32, force=True)
        scored[name] = (
            f"{predictor.card.name} {predictor.card.version}",
            np.array([r.probability for r in results]),
            np.array([r.photo_type == "dermoscopic" for r in results]),
        )
    (cand_name, a, a_derm), (base_name, b, b_derm) = scored["candidate"], scored["baseline"]
    # near-copies resampled together; AUC(candidate) - AUC(baseline)
    paired = paired_auc_difference(y, b, a, [r.group for r in records], n_boot=args.bootstrap)
    lo, hi = paired["ci"]
    both = a_derm & b_derm
    print(f"{len(y)} de-leaked archive test images ({int(y.sum())} malignant)")
    print(f"candidate {cand_name}: AUC {roc_auc(y, a):.3f}")
    print(f"baseline  {base_name}: AUC {roc_auc(y, b):.3f}")
    print(f"paired difference {paired['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({paired['n_boot']} bootstrap draws)")
    print(
        f"both judge dermoscopic ({both.sum()}): candidate {roc_auc(y[both], a[both]):.3f}, baseline {roc_auc(y[both], b[both]):.3f}"
    )


if __name__ == "__main__":
    main()
