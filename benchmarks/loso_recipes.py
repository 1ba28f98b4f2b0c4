"""Recipes side by side under one leave-one-source-out protocol (frozen: ImageNet features + heads, see
skinscan.loso): which data, which balance by source and diagnosis, which sensitivity target travels.

    python benchmarks/loso_recipes.py --out benchmarks/results/loso-recipes

Every recipe is scored on the same held-out units (each source of the four datasets; isic-mvb's test split
is left out, as training leaves it out). Writes recipes.json, recipes.md (one table per recipe, then a
summary of held-out AUC and sensitivity per unit) and recipes.png (AUC with intervals per unit).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from skinscan.data import load_dataset
from skinscan.loso import Recipe, cache_name, embed, frozen_loso, plot_auc, table
from skinscan.preprocess import PreprocessSpec

TODAY = ("isic-mvb", "pad-ufes-20-phone")
RECIPES = (
    Recipe("today's data, equal shares", sources=TODAY, source_weights={s: 1.0 for s in TODAY}),
    Recipe("all sources, natural mix", source_balance=1.0, diagnosis_balance=1.0),
    Recipe("all sources, sqrt balance", source_balance=0.5, diagnosis_balance=0.5),
    Recipe("all sources, equal balance", source_balance=0.0, diagnosis_balance=0.0),
    Recipe(
        "all sources, sqrt balance, target 0.97", source_balance=0.5, diagnosis_balance=0.5, target_sensitivity=0.97
    ),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=os.environ.get("SKINSCAN_DATA", "../shared/datasets"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="runs/features")
    ap.add_argument("--recipes", nargs="+", type=int, help="indices into RECIPES (default all)")
    ap.add_argument("--bootstrap", type=int, default=500)
    args = ap.parse_args()

    root = Path(args.data_root)
    records = load_dataset(root / "isic-mvb", split="train")
    for d in ("pad-ufes-20-phone", "isic-archive-more", "clinical-atlas"):
        records += load_dataset(root / d)
    spec = PreprocessSpec(size=224, color_constancy="shades-of-gray")  # the shipped recipes' preprocessing
    x = embed(records, spec, cache=Path(args.cache) / cache_name(spec, "efficientnet-lite0"))
    chosen = [RECIPES[i] for i in args.recipes] if args.recipes else list(RECIPES)
    results = {}
    for recipe in chosen:
        print(f"== {recipe.name}", flush=True)
        results[recipe.name] = frozen_loso(records, x, recipe, n_boot=args.bootstrap, progress=print)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.json").write_text(json.dumps(results, indent=2, default=float))
    plot_auc(results, out / "recipes.png")
    units = sorted({u for r in results.values() for u in r["held_out"]})
    summary = ["| recipe | " + " | ".join(units) + " | mean |", "|---" * (len(units) + 2) + "|"]
    for name, r in results.items():
        aucs = [r["held_out"][u].get("auc", np.nan) for u in units]
        cells = [
            f"{a:.3f} ({r['held_out'][u].get('sensitivity', np.nan):.2f})" for a, u in zip(aucs, units, strict=True)
        ]
        summary.append(f"| {name} | " + " | ".join(cells) + f" | {np.nanmean(aucs):.3f} |")
    text = [
        "# Recipes under leave-one-source-out (frozen protocol)",
        "",
        "`python benchmarks/loso_recipes.py --out " + args.out + "`: ImageNet EfficientNet-Lite0 features "
        "(Shades of Gray, 224 px) + logistic-regression heads drawn like the training sampler; the decision rule "
        "(temperature and threshold per photo type) from the training sources' inner out-of-fold scores.",
        "",
        "Held-out AUC (sensitivity at the rule's threshold) per unit:",
        "",
        *summary,
        "",
        "![AUC per held-out unit](recipes.png)",
        "",
    ]
    for name, r in results.items():
        text += [f"## {name}", "", table(r), ""]
    (out / "recipes.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
