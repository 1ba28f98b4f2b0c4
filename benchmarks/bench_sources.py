"""A bundled model on every source, as `skinscan loso` reports a held-out unit: AUC [95% CI], sensitivity
and specificity at the model's own decisions (its threshold per detected photo type), melanoma
sensitivity, specificity without actinic keratoses, diagnosis balanced accuracy (where the model has the
head), and the quality gate's refusals per source and per skin-type group (I-II, III-IV, V-VI).

Honest only on photos the model never trained on. Of a source the card lists among its training data,
only the photos of its validation split are scored (the card's `training.data.val_keys`: never trained on,
but they chose the epoch and the threshold) and the unit says `validation`; isic-mvb is scored on its test
split. A card that lists no validation photos marks such a source `seen in training` instead (its figures
are then not evidence of anything).

    python benchmarks/bench_sources.py --out benchmarks/results/sources-default
    python benchmarks/bench_sources.py --model skinscan-lite0-sources-int8 --out benchmarks/results/sources-int8

`--record` stores the figures in the model's card (`metrics.sources`: per source, gate refusals and skin-type
groups included), and `--loso REPORT/loso.json` adds a `skinscan loso` report's held-out units beside them
(`metrics.leave_one_source_out`): the model card then carries the per-skin-type AUCs with their intervals.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from skinscan.data import load_dataset
from skinscan.evaluate import score
from skinscan.loso import SKIN_GROUP_ORDER, SKIN_TYPE_GROUPS, table, unit_figures
from skinscan.predict import Predictor
from skinscan.quality import NOT_A_LESION

DATASETS = ("isic-mvb", "pad-ufes-20-phone", "isic-archive-more", "clinical-atlas")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file or bundled name (default: the default model)")
    ap.add_argument("--data-root", default=os.environ.get("SKINSCAN_DATA", "../shared/datasets"))
    ap.add_argument("--out", required=True, help="folder for sources.json and sources.md")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--record", action="store_true", help="store the figures in the model's card (rewrites it)")
    ap.add_argument("--loso", help="with --record: a `skinscan loso` loso.json whose held-out units go in too")
    args = ap.parse_args()

    predictor = Predictor(args.model)
    seen = set((predictor.card.model_extra or {}).get("training", {}).get("data", {}).get("per_source", {}))
    root = Path(args.data_root)
    held_out = predictor.card.validation_keys
    records = []
    for d in DATASETS:
        # isic-mvb: its test split (its train split is what the bundled models learned from)
        recs = load_dataset(root / d, split="test" if d == "isic-mvb" else None)
        records += [r for r in recs if d == "isic-mvb" or r.source not in seen or not held_out or r.uid in held_out]
    probs, preds = score(predictor, records)
    result: dict = {"model": predictor.info(), "held_out": {}, "gate": {}}
    # without the gate no photo can be called "not a lesion": say so rather than print 0%
    has_gate = bool(getattr(predictor.card, "quality_gate", None))
    for source in sorted({r.source for r in records}):
        ix = [i for i, r in enumerate(records) if r.source == source and preds[i].ok]
        recs = [records[i] for i in ix]
        p = probs[ix]
        t = np.array([preds[i].threshold for i in ix])
        diag = np.array(
            [
                np.log(np.maximum(list(preds[i].diagnoses.values()), 1e-12)) if preds[i].diagnoses else [-np.inf] * 10
                for i in ix
            ]
        )
        if source == "isic-mvb":
            name = "isic-mvb test split"
        elif source in seen:
            name = f"{source} (validation photos)" if held_out else f"{source} (seen in training)"
        else:
            name = source
        result["held_out"][name] = unit_figures(recs, p, t, diag, args.bootstrap)
        result["held_out"][name]["photo_types"] = dict(Counter(preds[i].photo_type for i in ix))
        refused = [NOT_A_LESION in (preds[i].quality_report.problems if preds[i].quality_report else ()) for i in ix]
        retake = [preds[i].quality == "retake" for i in ix]
        entry = {"n": len(ix), "not_a_lesion": float(np.mean(refused)) if has_gate else None}
        entry["any_retake"] = float(np.mean(retake))
        groups = [SKIN_TYPE_GROUPS.get(r.skin_type) for r in recs]
        for g in SKIN_GROUP_ORDER:
            m = [k for k, v in enumerate(groups) if v == g]
            if m and has_gate:
                entry[f"not_a_lesion_{g}"] = float(np.mean([refused[k] for k in m]))
                entry[f"n_{g}"] = len(m)
        result["gate"][source] = entry
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sources.json").write_text(json.dumps(result, indent=2, default=float))
    gate_rows = [
        "| source | n | not a lesion | any retake | not a lesion I-II / III-IV / V-VI |",
        "|---|---|---|---|---|",
    ]
    for s, e in result["gate"].items():
        by = " / ".join(f"{e[f'not_a_lesion_{g}']:.3f}" if f"not_a_lesion_{g}" in e else "-" for g in SKIN_GROUP_ORDER)
        refused = "-" if e["not_a_lesion"] is None else f"{e['not_a_lesion']:.3f}"
        gate_rows.append(f"| {s} | {e['n']} | {refused} | {e['any_retake']:.3f} | {by} |")
    if not has_gate:
        gate_rows.append('\nThis model has no "not a lesion" check (exported without `--gate`): image quality only.')
    text = (
        f"# {predictor.card.name} {predictor.card.version} on every source\n\n"
        f"`python benchmarks/bench_sources.py{' --model ' + args.model if args.model else ''} --out {args.out}`\n\n"
        f"{table(result)}\n\n## Quality gate refusals\n\n" + "\n".join(gate_rows) + "\n"
    )
    (out / "sources.md").write_text(text)
    print(text)
    if args.record:
        _record(predictor, result, args)


def _record(predictor: Predictor, result: dict, args: argparse.Namespace) -> None:
    from skinscan.card import write_card

    card = predictor.card.model_dump()
    command = f"python benchmarks/bench_sources.py --out {args.out} --record" + (
        f" --loso {args.loso}" if args.loso else ""
    )
    card["metrics"]["sources"] = {"command": command, "held_out": result["held_out"], "gate": result["gate"]}
    if args.loso:
        loso = json.loads(Path(args.loso).read_text())
        keep = ("n", "n_malignant", "auc", "auc_ci", "sensitivity", "specificity", "melanoma_sensitivity",
                "specificity_without_ak", "diagnosis_balanced_accuracy", "by_skin_type_group")  # fmt: skip
        card["metrics"]["leave_one_source_out"] = {
            "report": args.loso,
            "recipe": loso.get("recipe"),
            "held_out": {u: {k: f[k] for k in keep if k in f} for u, f in loso["held_out"].items()},
        }
    path = predictor.model_path
    del predictor  # release the file before rewriting it
    write_card(path, card)
    print(
        f"recorded in the model card of {path} (metrics.sources{', metrics.leave_one_source_out' if args.loso else ''})"
    )


if __name__ == "__main__":
    main()
