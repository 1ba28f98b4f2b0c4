"""The shortcut remedies side by side: for each full-schedule run, how far the sources' marks still move it
(`bench_shortcuts.py`, median |change| on held-out benign photos, bar 0.02) against how well it separates
the seven sets of photos it never trained on (`bench_sources.py`, mean ROC AUC over the units). Reads the
results folders those benchmarks wrote; measures nothing itself (docs/sources.md, "Shortcuts"). Where
bench_shortcuts.py also measured the changes that carry no mark (its `controls`), the mirror's median
|change| is drawn beside the marks': how far the run moves for nothing.

    python benchmarks/plot_shortcuts_tradeoff.py --out benchmarks/results/shortcuts-tradeoff

`--run LABEL SHORTCUTS_DIR SOURCES_DIR` (repeatable) replaces the runs drawn by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BAR = 0.02
# (label, bench_shortcuts folder, bench_sources folder): the full-schedule runs of docs/sources.md
RUNS = [
    ("no marks (2026.12.03)", "shortcuts-ab-full/base-2026-12-07", "sources-2026-12-03"),
    ("marks, seed 0", "shortcuts-ab-full/stamps", "sources-stamps-full"),
    ("marks, seed 1 (shipped)", "shortcuts-default", "sources-new-default"),
    ("marks + λ 0.1, seed 0", "shortcuts-ab-full/consistency-0.1-s0", "sources-consistency-0.1-s0-full"),
    ("marks + λ 0.1, seed 1", "shortcuts-ab-full/consistency-0.1", "sources-consistency-0.1-full"),
    ("marks + λ 0.3, seed 0", "shortcuts-ab-full/consistency-0.3-s0", "sources-consistency-0.3-s0-full"),
    ("marks + λ 0.3, seed 1", "shortcuts-ab-full/consistency-0.3", "sources-consistency-0.3-full"),
    ("marks + λ 1, seed 1", "shortcuts-ab-full/consistency", "sources-consistency-full"),
    ("marks + disc mask, seed 0", "shortcuts-ab-full/disc-s0", "sources-disc-s0-full"),
    ("marks + disc mask, seed 1", "shortcuts-ab-full/disc-s1", "sources-disc-s1-full"),
    ("marks + progressive resizing, seed 0", "shortcuts-ab-full/prog-s0", "sources-prog-s0-full"),
    ("marks + progressive resizing, seed 1", "shortcuts-ab-full/prog-s1", "sources-prog-s1-full"),
]


def load_run(label: str, shortcuts_dir: Path, sources_dir: Path) -> dict:
    marks = json.loads((shortcuts_dir / "shortcuts.json").read_text())
    sources = json.loads((sources_dir / "sources.json").read_text())
    aucs = {unit: row["auc"] for unit, row in sources["held_out"].items()}
    return {
        "label": label,
        "model": sources["model"]["version"],
        "median_abs_change": {e["stamp"]: e["median_abs_change"] for e in marks["all"]["effects"]},
        "auc": aucs,
        "mean_auc": sum(aucs.values()) / len(aucs),
        # changes that carry no mark (bench_shortcuts' controls; absent from results written before them)
        "controls": {
            e["stamp"]: e["median_abs_change"] for e in marks.get("controls", {}).get("all", {}).get("effects", [])
        },
    }


def write_markdown(runs: list[dict], path: Path, command: str) -> None:
    stamps = list(runs[0]["median_abs_change"])
    lines = [
        "# The sources' marks against discrimination, per full-schedule run",
        "",
        f"`{command}`; median |change| in probability when the mark is pasted on held-out benign photos "
        f"(bar {BAR}), and the mean ROC AUC over the units of photos never trained on.",
        "",
        "| run | model | " + " | ".join(stamps) + " | largest | mirrored, no mark | mean AUC (units) |",
        "|---" * (len(stamps) + 5) + "|",
    ]
    for r in runs:
        m = r["median_abs_change"]
        cells = [f"{m[s]:.3f}" + (" ✗" if m[s] >= BAR else "") for s in stamps]
        lines.append(
            f"| {r['label']} | {r['model']} | " + " | ".join(cells) + f" | {max(m.values()):.3f} | "
            f"{_mirror(r)} | {r['mean_auc']:.3f} ({len(r['auc'])}) |"
        )
    lines += [
        "",
        "Mirrored, no mark: the median |change| when the same photos are only mirrored left to right "
        "(bench_shortcuts' controls; '-': measured before it had them). Training flips photos at random.",
    ]
    path.write_text("\n".join(lines) + "\n")


def _mirror(run: dict) -> str:
    value = run["controls"].get("mirror")
    return "-" if value is None else f"{value:.3f}"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamps = list(runs[0]["median_abs_change"])
    tab20 = plt.get_cmap("tab20").colors  # more runs than the default cycle's ten colours
    colours = [tab20[i % len(tab20)] for i in range(len(runs))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    for i, r in enumerate(runs):
        colour, worst = colours[i], max(r["median_abs_change"].values())
        left.scatter(r["mean_auc"], worst, s=60, color=colour, zorder=3)
        left.annotate(r["label"], (r["mean_auc"], worst), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if "mirror" in r["controls"]:
            left.scatter(r["mean_auc"], r["controls"]["mirror"], s=60, facecolors="none", edgecolors=colour, zorder=3)
            left.plot([r["mean_auc"]] * 2, [r["controls"]["mirror"], worst], color=colour, lw=0.8, ls=":")
    if any("mirror" in r["controls"] for r in runs):
        left.scatter([], [], s=60, facecolors="none", edgecolors="grey", label="the same photos mirrored (no mark)")
        left.scatter([], [], s=60, color="grey", label="largest mark")
        left.legend(fontsize=8, loc="center right")
    left.margins(x=0.2)
    left.axhline(BAR, color="grey", ls="--", lw=1)
    left.text(left.get_xlim()[0], BAR, f" bar {BAR}", va="bottom", fontsize=8, color="grey")
    left.set_xlabel(f"mean ROC AUC over the {len(runs[0]['auc'])} units never trained on")
    left.set_ylabel("largest median |change| of a pasted mark")
    left.set_title("each run: what it learns vs what the marks still do")
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(stamps))]
        right.bar(xs, [r["median_abs_change"][s] for s in stamps], width, color=colours[i], label=r["label"])
    right.axhline(BAR, color="grey", ls="--", lw=1)
    right.set_xticks(range(len(stamps)), stamps)
    right.set_ylabel("median |change| in probability")
    right.set_title("per mark, held-out benign photos")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for tradeoff.json, tradeoff.md and tradeoff.png")
    ap.add_argument(
        "--run",
        nargs=3,
        action="append",
        metavar=("LABEL", "SHORTCUTS_DIR", "SOURCES_DIR"),
        help="a run to draw: its label and the folders bench_shortcuts.py and bench_sources.py wrote",
    )
    args = ap.parse_args()
    chosen = args.run or [(label, RESULTS / a, RESULTS / b) for label, a, b in RUNS]
    runs = []
    for label, shortcuts_dir, sources_dir in chosen:
        try:
            runs.append(load_run(label, Path(shortcuts_dir), Path(sources_dir)))
        except FileNotFoundError as e:
            raise SystemExit(
                f"error: {label}: no results at {e.filename} (run the benchmark that writes it first)"
            ) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.json").write_text(json.dumps(runs, indent=2) + "\n")
    write_markdown(runs, out / "tradeoff.md", f"python benchmarks/plot_shortcuts_tradeoff.py --out {args.out}")
    plot(runs, out / "tradeoff.png")
    print((out / "tradeoff.md").read_text())
    print(f"written: {out}/tradeoff.json, tradeoff.md, tradeoff.png")


if __name__ == "__main__":
    main()
