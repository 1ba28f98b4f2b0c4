"""Which decision rule keeps its sensitivity on a source it never saw? (issue 16, item 4)

Reads fine-tuned leave-one-source-out folders (`skinscan loso --protocol finetune --out DIR`). For each
held-out unit U, DIR/held-out-U/ holds the run trained without U, that run's validation predictions
(val_predictions.npz: its training sources only) and U's logits (held_out_predictions.npz). Every
candidate rule is fitted on the validation predictions alone and then applied to U, so each row shows
whether a rule's sensitivity travels to a source no choice saw.

Several folders (the same recipe with other seeds) are pooled: each (unit, folder) pair is one held-out
run. The rule chosen: among the rules that keep sensitivity >= the target on every held-out run of a unit
with at least 50 cancers, the one with the highest median specificity on those runs; if none holds
everywhere, the one that fails on the fewest runs (then by specificity). Sensitivities carry Wilson 95% intervals:
with 90-500 cancers per unit an observed 0.95 is uncertain by about +-0.02 to +-0.05.

    skinscan loso --protocol finetune --config configs/skinscan-sources.yaml \\
        --set epochs=3 --set samples_per_epoch=1280 --out runs/loso-finetune-short
    python benchmarks/bench_decision_rules.py runs/loso-finetune-short --out benchmarks/results/decision-rules
    python benchmarks/bench_decision_rules.py runs/loso-finetune-short runs/loso-short-seed1 --out /tmp/rules
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from skinscan import metrics
from skinscan.config import load_config
from skinscan.data import load_dataset
from skinscan.loso import apply_rule, decision_rule, referral_figures
from skinscan.train import load_training_records

MIN_CANCERS = 50  # the bar applies to held-out units with at least this many cancers

# name -> decision_rule's keyword arguments (target sensitivity on the training sources' validation photos)
RULES: dict[str, dict] = {
    "per type, 0.95 in every source": {"target": 0.95},
    "one boundary, 0.95 in every source (as exported)": {"target": 0.95, "per_type": False, "min_cancers": 5},
    "per type, 0.95 pooled": {"target": 0.95, "every_source": False},
    "per type, 0.97 in every source": {"target": 0.97},
    "one boundary, 0.97 in every source": {"target": 0.97, "per_type": False, "min_cancers": 5},
    "per type, 0.98 in every source": {"target": 0.98},
    "one boundary, 0.98 in every source": {"target": 0.98, "per_type": False, "min_cancers": 5},
}


def unit_rows(run: Path) -> tuple[str, list, np.ndarray, list, np.ndarray]:
    """One held-out unit: its name, records and logits; the run's validation records and logits."""
    cfg = load_config(run / "config.yaml")
    unit = run.name.removeprefix("held-out-")
    train_records, _ = load_training_records(cfg)
    by_uid = {r.uid: r for r in train_records}
    val = np.load(run / "val_predictions.npz")
    val_records = [by_uid[str(k)] for k in val["keys"]]
    held = np.load(run / "held_out_predictions.npz")
    everything = {r.uid: r for d in cfg.data for r in load_dataset(Path(d)) if r.source == unit}
    held_records = [everything[str(k)] for k in held["keys"]]
    return unit, held_records, held["logits"], val_records, val["logits"]


def figures(records: list, p: np.ndarray, t: np.ndarray) -> dict:
    y = np.array([r.label for r in records])
    refer = p >= t
    sens_k, n_pos = int(refer[y == 1].sum()), int((y == 1).sum())
    out = {
        "n": len(y),
        "n_malignant": n_pos,
        "sensitivity": sens_k / n_pos,
        "sensitivity_ci": list(metrics.wilson_interval(sens_k, n_pos)),
        "specificity": float((~refer[y == 0]).mean()),
        "referred": float(refer.mean()),
    }
    out |= referral_figures(records, refer)
    return out


def choose(result: dict, target: float) -> str:
    def score(name: str) -> tuple:
        rows = [u[name] for u in result["units"].values() if u[name]["n_malignant"] >= MIN_CANCERS]
        fails = sum(r["sensitivity"] < target for r in rows)
        return (fails, -float(np.median([r["specificity"] for r in rows])))

    return min(RULES, key=score)


def summary(result: dict, target: float) -> list[dict]:
    """Per rule, over the held-out runs of units with >= MIN_CANCERS cancers: how many fall below the target,
    the range of their sensitivities and the median specificity."""
    rows = []
    for name in RULES:
        runs = [u[name] for u in result["units"].values() if u[name]["n_malignant"] >= MIN_CANCERS]
        sens = [r["sensitivity"] for r in runs]
        below = sorted(
            unit
            for unit, u in result["units"].items()
            if u[name]["n_malignant"] >= MIN_CANCERS and u[name]["sensitivity"] < target
        )
        rows.append(
            {
                "rule": name,
                "runs": len(runs),
                "below": below,
                "sensitivity_range": [min(sens), max(sens)],
                "median_specificity": float(np.median([r["specificity"] for r in runs])),
            }
        )
    return rows


def plot(result: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = sorted(result["units"])
    fig, axes = plt.subplots(1, 2, figsize=(13, max(5.6, 0.45 * len(units) + 2)), sharey=True)
    for k, name in enumerate(RULES):
        y = np.arange(len(units)) + (k - len(RULES) / 2) * 0.1
        rows = [result["units"][u][name] for u in units]
        lo = [r["sensitivity"] - r["sensitivity_ci"][0] for r in rows]
        hi = [r["sensitivity_ci"][1] - r["sensitivity"] for r in rows]
        bold = name == result["chosen"]
        style = {"marker": "o", "ms": 6 if bold else 4, "lw": 0, "label": name + (" (chosen)" if bold else "")}
        axes[0].errorbar([r["sensitivity"] for r in rows], y, xerr=[lo, hi], elinewidth=1, **style)
        axes[1].plot([r["specificity"] for r in rows], y, **style)
    axes[0].axvline(target, color="k", ls="--", lw=1)
    axes[1].axvline(0.40, color="k", ls=":", lw=1)
    axes[0].set_yticks(
        range(len(units)), [f"{u}\n({result['units'][u][next(iter(RULES))]['n_malignant']} cancers)" for u in units]
    )
    axes[0].set_xlabel(f"sensitivity on the held-out source (95% CI; dashed: target {target})")
    axes[1].set_xlabel("specificity on the held-out source (dotted: 0.40)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "loso", type=Path, nargs="+", help="`skinscan loso --protocol finetune` output folders (other seeds pooled)"
    )
    ap.add_argument("--out", type=Path, required=True, help="where decision-rules.json, .md and .png go")
    ap.add_argument("--target", type=float, default=0.95, help="the sensitivity each unit must keep")
    ap.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        default=[],
        metavar="JSON",
        help="decision-rules.json of earlier folders (e.g. their runs are gone) whose held-out runs are pooled in",
    )
    args = ap.parse_args()
    runs = []
    for folder in args.loso:
        found = sorted(r for r in folder.glob("held-out-*") if (r / "held_out_predictions.npz").is_file())
        if not found:
            raise SystemExit(
                f"{folder}: no held-out-*/held_out_predictions.npz (run skinscan loso --protocol finetune)"
            )
        runs += found
    names = [f.name for f in args.loso] + [Path(json.loads(p.read_text())["loso"]).name for p in args.pool]
    title = f"Decision rules on held-out sources ({', '.join(names)})"
    loso = [str(f) for f in args.loso]
    result: dict = {"title": title, "loso": loso[0] if len(loso) == 1 else loso, "target": args.target}
    result |= {"rules": RULES, "units": {}}
    for run in runs:
        unit, held, z_held, val, z_val = unit_rows(run)
        if len(args.loso) + len(args.pool) > 1:
            unit = f"{unit} ({run.parent.name})"
        result["units"][unit] = {}
        for name, kwargs in RULES.items():
            rule = decision_rule(z_val, val, **kwargs)
            p, t = apply_rule(z_held, held, rule)
            pv, tv = apply_rule(z_val, val, rule)
            result["units"][unit][name] = figures(held, p, t) | {
                "rule": rule,
                "validation_specificity": figures(val, pv, tv)["specificity"],
            }
        print(f"{unit}: done")
    for path in args.pool:
        earlier = json.loads(path.read_text())
        if earlier["rules"] != RULES or isinstance(earlier["loso"], list):
            raise SystemExit(f"{path}: another set of rules, or pooled already: measure its folder again")
        result["pooled"] = [*result.get("pooled", []), str(path)]
        name = Path(earlier["loso"]).name
        result["units"] |= {f"{unit} ({name})": rows for unit, rows in earlier["units"].items()}
    result["chosen"] = choose(result, args.target)
    result["summary"] = summary(result, args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decision-rules.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "decision-rules.png", args.target)
    lines = [f"# {title}", "", f"Chosen: **{result['chosen']}**", ""]
    lines += [
        f"| rule | held-out runs (>= {MIN_CANCERS} cancers) below {args.target} | sensitivity range | median specificity |",
        "|---|---|---|---|",
    ]
    for row in result["summary"]:
        below = f"{len(row['below'])} of {row['runs']}" + (f" ({', '.join(row['below'])})" if row["below"] else "")
        lo, hi = row["sensitivity_range"]
        lines.append(f"| {row['rule']} | {below} | {lo:.3f}-{hi:.3f} | {row['median_specificity']:.3f} |")
    lines += [
        "",
        "| held-out unit | rule | sens [95% CI] | spec | melanoma sens | spec w/o AK | referred |",
        "|---|---|---|---|---|---|---|",
    ]
    for unit, rows in sorted(result["units"].items()):
        for name, r in rows.items():
            ci = "[{:.2f}, {:.2f}]".format(*r["sensitivity_ci"])
            mel = f"{r['melanoma_sensitivity']:.3f}" if "melanoma_sensitivity" in r else "-"
            noak = f"{r['specificity_without_ak']:.3f}" if "specificity_without_ak" in r else "-"
            flag = " **below target**" if r["sensitivity"] < args.target and r["n_malignant"] >= MIN_CANCERS else ""
            lines.append(
                f"| {unit} ({r['n_malignant']}) | {name} | {r['sensitivity']:.3f} {ci}{flag} | {r['specificity']:.3f} "
                f"| {mel} | {noak} | {r['referred']:.2f} |"
            )
    lines += ["", "![sensitivity and specificity per rule](decision-rules.png)", ""]
    (args.out / "decision-rules.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
