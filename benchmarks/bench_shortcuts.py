"""Shortcut counterfactuals: each source's mark (DermNet's logo, Fitzpatrick17k's "SFS", a dermoscopy ruler,
a dermatoscope's vignette, a surgical-ink circle) pasted onto held-out benign photos of every source; per
stamp and source, how far the probability moves (median / mean / p90) and the share of decisions flipped,
beside the source's unstamped AUC (its held-out benign and malignant photos). The bar (issue 16, and
tests/test_shortcuts.py): a median |change| under 0.02 for every stamp.

Held out = what the model's card says it never trained on (`skinscan.shortcuts.held_out`): isic-mvb's test
split, the sources it never saw, and its validation photos where the card lists them (`val_keys`). A stamp
skips the photos of the sources that already carry it (the logo on DermNet photos).

Beside the marks, the same photos under changes that carry no mark (`skinscan.shortcuts.CONTROLS`: mirrored,
moved by 4 px, saved again as a JPEG of quality 90): how far the model moves for nothing, the floor against
which the marks' changes read.

    python benchmarks/bench_shortcuts.py --out benchmarks/results/shortcuts-default
    python benchmarks/bench_shortcuts.py --model skinscan-lite0-isic --per-source 20 --out /tmp/shortcuts
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from skinscan.data import Record, load_dataset
from skinscan.evaluate import score
from skinscan.metrics import roc_auc
from skinscan.predict import Predictor
from skinscan.shortcuts import CONTROLS, PLACEMENTS, held_out, load_stamps, perturbation_effects, spread, stamp_effects
from skinscan.stamps import build_stamps

DATASETS = ("isic-mvb", "pad-ufes-20-phone", "isic-archive-more", "clinical-atlas")
BAR = 0.02


def _sample(records: list[Record], source: str, label: int, n: int) -> list[Record]:
    return spread(sorted((r for r in records if r.source == source and r.label == label), key=lambda r: r.key), n)


def _cells(e: dict, mark: str = "") -> str:
    """One effect's table cells: n, median |change| (with `mark`), mean change, p90 |change|, flipped."""
    return (
        f"{e['n']} | {e['median_abs_change']:.4f}{mark} | {e['mean_change']:+.4f} | "
        f"{e['p90_abs_change']:.4f} | {e['flipped']:.1%}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file or bundled name (default: the default model)")
    ap.add_argument("--data-root", default=os.environ.get("SKINSCAN_DATA", "../shared/datasets"))
    ap.add_argument("--out", required=True, help="folder for shortcuts.json and shortcuts.md")
    ap.add_argument(
        "--per-source",
        type=int,
        default=100,
        help="benign photos stamped per source (and as many malignant for the AUC)",
    )
    ap.add_argument("--stamps", help="folder of <name>.png stamps (default: cut from the datasets, skinscan.stamps)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    predictor = Predictor(args.model)
    stamps = load_stamps(args.stamps) if args.stamps else build_stamps(args.data_root)
    root = Path(args.data_root)
    every = [r for d in DATASETS for r in load_dataset(root / d)]
    records = held_out(every, predictor.card)
    sources = sorted({r.source for r in records})
    # trained on, and the card lists no validation photos of them: nothing of theirs is held out
    none_held_out = sorted({r.source for r in every} - set(sources))
    benign = [r for s in sources for r in _sample(records, s, 0, args.per_source)]
    malignant = [r for s in sources for r in _sample(records, s, 1, args.per_source)]
    report = stamp_effects(predictor, [r.path for r in benign], stamps, sources=[r.source for r in benign])
    controls = perturbation_effects(predictor, [r.path for r in benign], sources=[r.source for r in benign])
    malignant_probs, _ = score(predictor, malignant, progress=False)

    result: dict = {
        "model": predictor.info(),
        "per_source": args.per_source,
        "bar_median_abs_change": BAR,
        "stamps": {name: {"origin": PLACEMENTS[name].origin, "anchor": PLACEMENTS[name].anchor} for name in stamps},
        "all": report.to_dict(),
        "sources": {},
        "no_held_out_photos": none_held_out,
        "controls": {
            "all": controls.to_dict(),
            "sources": {s: controls.for_source(s).to_dict() for s in sorted(set(controls.sources))},
        },
    }
    for s in sorted(set(report.sources)):  # the sources with held-out benign photos
        part = report.for_source(s)
        m = np.array([p for r, p in zip(malignant, malignant_probs, strict=True) if r.source == s])
        y = [0] * len(part.baseline) + [1] * len(m)
        auc = roc_auc(y, np.concatenate([part.baseline, m])) if len(m) else None
        auc = None if auc is None or np.isnan(auc) else auc  # JSON has no NaN
        result["sources"][s] = {"n_benign": len(part.baseline), "n_malignant": len(m), "auc": auc, **part.to_dict()}
    result["seconds"] = round(time.perf_counter() - t0, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shortcuts.json").write_text(json.dumps(result, indent=2, default=float, allow_nan=False))
    rows = [
        "| stamp | source | n | median \\|change\\| | mean change | p90 \\|change\\| | flipped | unstamped AUC (benign / malignant) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in stamps:
        for s, entry in [("**all**", {"effects": result["all"]["effects"]}), *result["sources"].items()]:
            e = next(x for x in entry["effects"] if x["stamp"] == name)
            if not e["n"]:
                continue  # the source already carries the mark
            auc = f"{entry['auc']:.3f} ({entry['n_benign']} / {entry['n_malignant']})" if entry.get("auc") else "-"
            mark = " ✗" if e["median_abs_change"] >= BAR else ""
            rows.append(f"| {name} | {s} | {_cells(e, mark)} | {auc} |")
    control_rows = [
        "| change | source | n | median \\|change\\| | mean change | p90 \\|change\\| | flipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in CONTROLS:
        for s, entry in [("**all**", result["controls"]["all"]), *result["controls"]["sources"].items()]:
            e = next(x for x in entry["effects"] if x["stamp"] == name)
            control_rows.append(f"| {name} | {s} | {_cells(e)} |")
    command = f"python benchmarks/bench_shortcuts.py{' --model ' + args.model if args.model else ''} --per-source {args.per_source} --out {args.out}"
    text = (
        f"# Shortcut counterfactuals: {predictor.card.name} {predictor.card.version}\n\n`{command}` "
        f"({result['seconds']} s)\n\nEach stamp pasted onto held-out benign photos; change = stamped minus "
        f"unstamped probability; ✗: median |change| at or above the bar of {BAR}. Flipped: the share of photos "
        "whose decision (refer/monitor) changed.\n\n"
        + "\n".join(rows)
        + "\n\nThe same photos under changes that carry no mark (`skinscan.shortcuts.CONTROLS`): mirrored left to "
        "right (training flips photos at random), moved 4 px right and down, saved again as a JPEG of quality 90. "
        "How far the model moves for nothing: the floor the marks' changes read against.\n\n"
        + "\n".join(control_rows)
        + (
            f"\n\nNo held-out photos (trained on; the card lists no validation photos): {', '.join(none_held_out)}\n"
            if none_held_out
            else "\n"
        )
    )
    (out / "shortcuts.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
