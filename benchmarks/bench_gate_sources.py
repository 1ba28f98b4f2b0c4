"""The quality gate on every source and skin type: does it let lesion photos from sources it never saw pass?

For each source S (isic-mvb, pad-ufes-20-phone, ham10000, isic-archive-pre2019, fitzpatrick17k, dermnet-nz,
sd-198): the gate fitted without S (`skinscan.loso.fit_gate`: `fit_quality_gate` with the arguments of
`skinscan export --gate`, on the other sources' photos and the non-lesion tune half) and the share of S's
photos it refuses, for any reason (pixel checks + "not a lesion") and as "not a lesion" alone, with Wilson
95% intervals; per skin-type group (I-II, III-IV, V-VI) where the source records a skin type (the phone
set, fitzpatrick17k). Each gate's flag rate on the non-lesion holdout half (tests/assets/nonlesion/holdout)
says it still refuses what is not a lesion. Then the gate fitted on every source, as the export ships it:
its refusals in-sample, the fit's own cross-fitted "not a lesion" rejection per source, and (`--outer-folds`,
default 5) the whole fit cross-fitted: each grouped fold judged by the gate fitted on the other folds.

Every record of the four datasets (isic-mvb: both splits) is decoded once, as served (`Predictor.decode`:
the network input, the pixel measures and the shorter side), and embedded with the model: the embeddings
`add_quality_gate` fits on (`export._infer` reads the same pixels; equal to the last bit on 32 photos
checked). Cached in `--cache`, one .npz per model (keyed by its sha256, rows by record uid): a rerun
embeds nothing.

`--loso RUN` asks the harder question: the shipped gate is fitted on embeddings of a network that trained
on every source, so a gate fitted without S still reads S through features that learned it. Given a
finetune leave-one-source-out folder, each held-out source S is judged by the gate fitted without S on the
embeddings of the network trained without S (neither saw S), beside the same fit on the shipped network's
embeddings, on the same photos (each picture decoded once for all the networks).

    python benchmarks/bench_gate_sources.py --out benchmarks/results/gate-sources-default
    skinscan loso --protocol finetune --config configs/skinscan-sources.yaml --in-source-folds 0 --out runs/loso
    python benchmarks/bench_gate_sources.py --loso runs/loso --limit-per-source 600 --out /tmp/gate-loso
    python benchmarks/bench_gate_sources.py --limit-per-source 30 --out /tmp/gate-sources
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skinscan.data import IMAGE_SUFFIXES, Record, load_dataset
from skinscan.errors import SkinscanError
from skinscan.export import _picture
from skinscan.graphs import MEASURES
from skinscan.loso import GateInputs, gate_loso, gate_without, held_out_models
from skinscan.phototype import SOURCE_PHOTO_TYPE
from skinscan.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("isic-mvb", "pad-ufes-20-phone", "isic-archive-more", "clinical-atlas")
SKIN_TYPE_SET = "fitzpatrick17k"  # the source that records a skin type for most of its photos
MIN_PLOTTED = 10  # photos a skin-type group needs to be drawn (the tables list every group)
# The bars (refusal, any reason, by the gate fitted without the source): each dermoscopic set
# under 5%, every skin-type group of the skin-type set under 10%; the non-lesion holdout at least 95% flagged.
BARS = {"dermoscopic": 0.05, "skin_type_group": 0.10, "nonlesion_holdout": 0.95}


def source_bar(source: str) -> float | None:
    return BARS["dermoscopic"] if SOURCE_PHOTO_TYPE.get(source) == "dermoscopic" else None


# ---------------------------------------------------------------- records and the embedding cache
def read_records(data_root: Path, limit_per_source: int | None, seed: int = 0) -> list[Record]:
    """Every record of the four datasets; with a limit, a seeded sample of that many per source."""
    records = [r for d in DATASETS for r in load_dataset(data_root / d)]
    if not limit_per_source:
        return records
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for source in sorted({r.source for r in records}):
        ix = [i for i, r in enumerate(records) if r.source == source]
        keep.update(ix if len(ix) <= limit_per_source else rng.choice(ix, limit_per_source, replace=False).tolist())
    return [r for i, r in enumerate(records) if i in keep]


def embed_cached(
    predictors: Sequence[Predictor], items: Sequence[tuple[str, Path]], cache: Path, batch_size: int, chunk: int = 512
) -> tuple[list[dict[str, tuple[np.ndarray, np.ndarray, int]]], set[str]]:
    """Per predictor, {uid: (embedding, measures in graphs.MEASURES order, shorter side or 0)} for every
    readable item, and the uids that cannot be read. Each picture is decoded once for all the predictors
    (they must share one preprocessing); what a predictor's cache (`cache`/gate-inputs-<sha256>.npz) lacks
    is computed and saved there every `chunk` images."""
    if any(p.spec != predictors[0].spec for p in predictors):
        raise SystemExit("bench_gate_sources: these models preprocess differently; measure them one at a time")
    files = [cache / f"gate-inputs-{p.sha256[:16]}.npz" for p in predictors]
    stores: list[dict[str, tuple[np.ndarray, np.ndarray, int]]] = []
    unreadable: set[str] = set()
    for predictor, file in zip(predictors, files, strict=True):
        stored: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        if file.is_file():
            with np.load(file) as z:
                if str(z["model_sha256"]) != predictor.sha256 or tuple(z["measure_names"]) != MEASURES:
                    raise SystemExit(f"{file} belongs to another model or skinscan version: delete it or pass --cache")
                stored = {
                    str(u): (e, m, int(s))
                    for u, e, m, s in zip(z["uids"], z["embeddings"], z["measures"], z["sides"], strict=True)
                }
                unreadable |= {str(u) for u in z["unreadable"]}
        stores.append(stored)
    todo = [(u, p) for u, p in items if u not in unreadable and any(u not in s for s in stores)]
    from tqdm.auto import tqdm

    with tqdm(total=len(todo), desc="gate inputs", unit="img", disable=not todo) as bar:
        for start in range(0, len(todo), chunk):
            for first in range(start, min(start + chunk, len(todo)), batch_size):
                batch = []
                for uid, path in todo[first : min(first + batch_size, start + chunk, len(todo))]:
                    decoded = predictors[0].decode(path)  # once: the network input, pixel measures and side, as served
                    if decoded.error is not None:
                        unreadable.add(uid)
                    else:
                        batch.append((uid, decoded))
                    bar.update(1)
                for predictor, stored in zip(predictors, stores, strict=True):
                    missing = [(uid, d) for uid, d in batch if uid not in stored]
                    if not missing:
                        continue
                    embeddings = predictor.run(np.stack([d.image for _, d in missing]))["embedding"]
                    for (uid, d), embedding in zip(missing, embeddings, strict=True):
                        measures = np.array([d.measures[k] for k in MEASURES], dtype=np.float32)
                        stored[uid] = (embedding, measures, d.shorter_side or 0)
            for predictor, stored, file in zip(predictors, stores, files, strict=True):
                _save(file, predictor.sha256, stored, unreadable)
    return stores, unreadable


def _save(cache: Path, sha: str, stored: dict, unreadable: set[str]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    values = list(stored.values())
    np.savez(
        tmp,
        model_sha256=np.array(sha),
        measure_names=np.array(MEASURES),
        uids=np.array(list(stored), dtype=str),
        embeddings=np.stack([v[0] for v in values]) if values else np.zeros((0, 0), np.float32),
        measures=np.stack([v[1] for v in values]) if values else np.zeros((0, len(MEASURES)), np.float32),
        sides=np.array([v[2] for v in values], dtype=np.int32),
        unreadable=np.array(sorted(unreadable), dtype=str),
    )
    tmp.replace(cache)


def as_inputs(stored: dict[str, tuple[np.ndarray, np.ndarray, int]], uids: Sequence[str]) -> GateInputs:
    return GateInputs(
        np.stack([stored[u][0] for u in uids]).astype(np.float32),
        [dict(zip(MEASURES, stored[u][1].astype(float).tolist(), strict=True)) for u in uids],
        [stored[u][2] or None for u in uids],
    )


# ---------------------------------------------------------------- report
def _pct(share: dict) -> str:
    lo, hi = share["ci95"]
    return f"{share['share']:.1%} [{lo:.1%}, {hi:.1%}] ({share['k']}/{share['n']})"


def _verdict(share: dict, bar: float | None, above: bool = False) -> str:
    if bar is None:
        return "-"
    ok = share["share"] >= bar if above else share["share"] < bar
    return f"{'>=' if above else '<'} {bar:.0%}: {'PASS' if ok else 'FAIL'}"


def shipped_figures(r: dict) -> tuple[str, dict]:
    """The shipped gate's per-source figures to plot: cross-fitted where measured, else in-sample."""
    shipped = r["all_sources"]
    if "cross_fitted" in shipped:
        return f"shipped gate, cross-fitted ({shipped['outer_folds']} folds)", shipped["cross_fitted"]
    return "shipped gate, in-sample", shipped["in_sample"]


def skin_type_rows(r: dict) -> list[tuple[str, str, str, dict, float | None]]:
    """(set, gate, group, figures, bar) for every source with skin types: under the gate fitted without it
    (where the bar is judged), then under the shipped gate (cross-fitted if measured, and in-sample)."""
    rows = []
    for source, entry in r["held_out"].items():
        for g, f in entry.get("by_skin_type_group", {}).items():
            bar = BARS["skin_type_group"] if source == SKIN_TYPE_SET else None
            rows.append((source, f"fitted without {source}", g, f, bar))
    for key, name in (("cross_fitted", "every source, cross-fitted"), ("in_sample", "every source, in-sample")):
        for source, entry in r.get("all_sources", {}).get(key, {}).items():
            for g, f in entry.get("by_skin_type_group", {}).items():
                rows.append((source, name, g, f, None))
    return rows


def markdown(r: dict) -> str:
    m, lim = r["model"], r["limit_per_source"]
    shipped = r["all_sources"]
    cross = shipped.get("cross_fitted")
    lines = [
        f"# The quality gate on every source and skin type - model {m['name']} {m['version']} "
        f"(sha256 {m['sha256'][:12]})",
        "",
        f"`{r['command']}`; {'all records' if not lim else f'at most {lim} records per source (seeded sample)'}; "
        f"non-lesion tune {r['nonlesion']['tune']} / holdout {r['nonlesion']['holdout']} pictures. "
        "Shares refused, with Wilson 95% intervals (k/n). The bars are judged on the gate fitted without the "
        "source, for any reason (pixel checks + not a lesion).",
        "",
        "## Each source under the gate fitted without it",
        "",
        "| source | photos | refused, any reason | refused as not a lesion | bar | non-lesion holdout flagged |",
        "|---|---|---|---|---|---|",
    ]
    for source, e in r["held_out"].items():
        lines.append(
            f"| {source} | {e['n']} | {_pct(e['refused'])} | {_pct(e['not_a_lesion'])} | "
            f"{_verdict(e['refused'], source_bar(source))} | {_pct(e['nonlesion_holdout']['flagged'])} |"
        )
    lines += [
        "",
        "## Each source under the gate fitted on every source (what `skinscan export --gate` ships)",
        "",
        "In-sample: the fit saw these photos. Fit's cross-fitted: `fit_quality_gate`'s own figure (subspace and "
        "probe without the photo's fold, threshold from those scores)."
        + (
            f" Cross-fitted: each of {shipped['outer_folds']} grouped folds judged by the gate fitted on the others."
            if cross
            else ""
        ),
        "",
        "| source | refused, in-sample | not a lesion, in-sample | not a lesion, fit's cross-fitted |"
        + (" refused, cross-fitted | not a lesion, cross-fitted |" if cross else ""),
        "|---|---|---|---|" + ("---|---|" if cross else ""),
    ]
    for source, inside in shipped["in_sample"].items():
        fit_cf = shipped["cross_fitted_not_a_lesion"].get(source)
        row = (
            f"| {source} | {_pct(inside['refused'])} | {_pct(inside['not_a_lesion'])} | "
            f"{'-' if fit_cf is None else f'{fit_cf:.1%}'} |"
        )
        if cross:
            row += f" {_pct(cross[source]['refused'])} | {_pct(cross[source]['not_a_lesion'])} |"
        lines.append(row)
    lines += [
        "",
        "## Skin-type groups",
        "",
        "| set | gate | group | photos | refused, any reason | refused as not a lesion | bar |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, gate, g, f, bar in skin_type_rows(r):
        lines.append(
            f"| {source} | {gate} | {g} | {f['refused']['n']} | {_pct(f['refused'])} | {_pct(f['not_a_lesion'])} "
            f"| {_verdict(f['refused'], bar)} |"
        )
    lines += [
        "",
        "## Non-lesion holdout pictures flagged, per fitted gate",
        "",
        "| gate | flagged, any reason | as not a lesion | bar |",
        "|---|---|---|---|",
    ]
    gates = [(f"fitted without {s}", e["nonlesion_holdout"]) for s, e in r["held_out"].items()]
    gates.append(("fitted on every source (shipped)", shipped["nonlesion_holdout"]))
    for name, f in gates:
        lines.append(
            f"| {name} | {_pct(f['flagged'])} | {_pct(f['not_a_lesion'])} | "
            f"{_verdict(f['flagged'], BARS['nonlesion_holdout'], above=True)} |"
        )
    lines += [
        "",
        f"Shipped gate's fit: {shipped['fit'].get('chosen')}; cross-fitted non-lesion tune flag rate "
        f"{shipped['fit'].get('nonlesion_tune_flag_rate_cross_fitted', float('nan')):.1%}. "
        f"Unreadable images: {', '.join(r['unreadable']) or 'none'}. Embedding {r['embed_seconds']:.0f} s, "
        f"gate fits {r['gate_seconds']:.0f} s.",
        "",
        "![refusals per source and skin-type group](gate_sources.png)",
        "",
    ]
    return "\n".join(lines)


def plot(
    r: dict, path: Path, held_name: str = "gate fitted without the source", beside: tuple[str, dict] | None = None
) -> Path:
    """Refusals (any reason) per source and per skin-type group, with their intervals, under the gate fitted
    without the source (`held_name`) and `beside` it ((name, figures per source); default: the shipped
    gate); the bars (the issue's limits) drawn as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shipped_name, shipped = beside or shipped_figures(r)

    def panel(ax, labels, held, other, limits, title) -> None:
        y = np.arange(len(labels))
        for k, (figures, name) in enumerate(((held, held_name), (other, shipped_name))):
            v = np.array([f["share"] for f in figures])
            lo, hi = np.array([f["ci95"] for f in figures]).T
            ax.barh(y - 0.2 + 0.4 * k, v, height=0.38, color=f"C{k}", label=name)
            ax.errorbar(v, y - 0.2 + 0.4 * k, xerr=[v - lo, hi - v], fmt="none", ecolor="black", lw=0.8, capsize=2)
        drawn = False
        for i, limit in enumerate(limits):
            if limit is not None:  # the bar, as a line across this row
                ax.plot([limit, limit], [i - 0.45, i + 0.45], color="red", lw=2, label=None if drawn else "bar")
                drawn = True
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel("share of lesion photos refused (any reason), Wilson 95% interval")
        ax.set_title(title)

    sources = list(r["held_out"])
    groups = [  # a group of a few photos (the phone set's V-VI: 4) has an interval too wide to read beside the rest
        (s, g, f["refused"], bar)
        for s, gate, g, f, bar in skin_type_rows(r)
        if gate.startswith("fitted") and f["refused"]["n"] >= MIN_PLOTTED
    ]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * max(len(sources), len(groups)) + 2))
    panel(
        axes[0],
        sources,
        [r["held_out"][s]["refused"] for s in sources],
        [shipped[s]["refused"] for s in sources],
        [source_bar(s) for s in sources],
        "per source",
    )
    if groups:
        panel(
            axes[1],
            [f"{s} {g}" for s, g, _, _ in groups],
            [f for _, _, f, _ in groups],
            [shipped[s]["by_skin_type_group"][g]["refused"] for s, g, _, _ in groups],
            [bar for _, _, _, bar in groups],
            f"per skin-type group (groups of >= {MIN_PLOTTED} photos)",
        )
    else:
        axes[1].set_axis_off()
    fig.suptitle(f"Quality gate refusals - {r['model']['name']} {r['model']['version']}", fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main
def loso_gates(
    records: list[Record],
    stores: Sequence[dict],
    units: Sequence[str],
    tune: Sequence[Path],
    holdout: Sequence[Path],
    progress=print,
) -> dict:
    """`--loso`: each unit judged by the gate fitted without it on the embeddings of the network trained
    without it (`stores[k + 1]` for `units[k]`), and beside it the same fit on the shipped model's embeddings
    (`stores[0]`: only the gate's fit never saw the unit)."""
    uids = [r.uid for r in records]
    tune_ids = [f"nonlesion/tune/{p.name}" for p in tune]
    holdout_ids = [f"nonlesion/holdout/{p.name}" for p in holdout]
    groups = [_picture(p) for p in tune]

    def gate(stored: dict, unit: str) -> dict:
        return gate_without(
            records, as_inputs(stored, uids), as_inputs(stored, tune_ids), groups, as_inputs(stored, holdout_ids), unit
        )

    out: dict = {"held_out": {}, "shipped_features": {}}
    for unit, stored in zip(units, stores[1:], strict=True):
        progress(f"gate without {unit}: the network trained without it, then the shipped network")
        out["held_out"][unit] = gate(stored, unit)
        out["shipped_features"][unit] = gate(stores[0], unit)
    return out


def loso_markdown(r: dict) -> str:
    m, lim = r["model"], r["limit_per_source"]
    lines = [
        "# The quality gate on sources its features never saw - the networks of a leave-one-source-out run",
        "",
        f"`{r['command']}`; {'all records' if not lim else f'at most {lim} records per source (seeded sample)'}; "
        f"non-lesion tune {r['nonlesion']['tune']} / holdout {r['nonlesion']['holdout']} pictures. For each source: "
        f"the gate fitted without it (`skinscan.loso.gate_without`, as `skinscan export --gate` fits it) on the "
        f"embeddings of `{r['loso']}`'s network trained without it, so neither the features nor the gate saw "
        f"the source; beside it, the same fit on the embeddings of {m['name']} {m['version']} (sha256 "
        f"{m['sha256'][:12]}), whose network trained on every source. Shares refused, Wilson 95% intervals (k/n).",
        "",
        "| source | photos | refused, any reason: features never saw it | bar | shipped network's features | "
        "not a lesion: never saw it | shipped | non-lesion holdout flagged: never saw it | shipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for source, e in r["held_out"].items():
        b = r["shipped_features"][source]
        lines.append(
            f"| {source} | {e['n']} | {_pct(e['refused'])} | {_verdict(e['refused'], source_bar(source))} | "
            f"{_pct(b['refused'])} | {_pct(e['not_a_lesion'])} | {_pct(b['not_a_lesion'])} | "
            f"{_pct(e['nonlesion_holdout']['flagged'])} | {_pct(b['nonlesion_holdout']['flagged'])} |"
        )
    lines += [
        "",
        "## Skin-type groups",
        "",
        "| set | group | photos | refused, any reason: features never saw it | bar | shipped network's features |",
        "|---|---|---|---|---|---|",
    ]
    for source, e in r["held_out"].items():
        for g, f in e.get("by_skin_type_group", {}).items():
            b = r["shipped_features"][source]["by_skin_type_group"][g]
            bar = BARS["skin_type_group"] if source == SKIN_TYPE_SET else None
            lines.append(
                f"| {source} | {g} | {f['refused']['n']} | {_pct(f['refused'])} | {_verdict(f['refused'], bar)} | "
                f"{_pct(b['refused'])} |"
            )
    lines += [
        "",
        f"Unreadable images: {', '.join(r['unreadable']) or 'none'}. Embedding {r['embed_seconds']:.0f} s "
        f"({len(r['networks'])} + 1 networks), gate fits {r['gate_seconds']:.0f} s.",
        "",
        "![refusals per source and skin-type group](gate_sources.png)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file or bundled name (default: the default model)")
    ap.add_argument(
        "--loso",
        type=Path,
        metavar="RUN",
        help="a finetune leave-one-source-out folder (`skinscan loso --protocol finetune --out RUN`): judge each "
        "of its held-out sources by the gate fitted without it on the embeddings of the network trained without "
        "it, beside the same fit on --model's embeddings (each network exported once into its run folder)",
    )
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--nonlesion", type=Path, default=REPO / "tests" / "assets" / "nonlesion")
    ap.add_argument("--limit-per-source", type=int, help="a seeded sample of at most this many records per source")
    ap.add_argument("--out", type=Path, required=True, help="folder for gate_sources.json, .md and .png")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "gate-inputs", help="embedding cache folder")
    ap.add_argument("--outer-folds", type=int, default=5, help="cross-fit the shipped gate's figures (0: skip)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    args = ap.parse_args()

    predictor = Predictor(args.model, threads=args.threads)
    records = read_records(args.data_root, args.limit_per_source)
    networks: dict[str, Path] = {}
    if args.loso:
        try:
            networks = held_out_models(args.loso)
        except SkinscanError as exc:
            raise SystemExit(f"bench_gate_sources: {exc}") from None
        unknown = sorted(set(networks) - {r.source for r in records})
        if unknown:
            raise SystemExit(f"bench_gate_sources: {args.loso} holds out {', '.join(unknown)}, no source of the data")
    predictors = [predictor] + [Predictor(path, threads=args.threads) for path in networks.values()]
    halves = {
        half: sorted(p for p in (args.nonlesion / half).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for half in ("tune", "holdout")
    }
    items = [(r.uid, r.path) for r in records] + [
        (f"nonlesion/{half}/{p.name}", p) for half, paths in halves.items() for p in paths
    ]
    t = time.perf_counter()
    stores, unreadable = embed_cached(predictors, items, args.cache, args.batch_size)
    stored = stores[0]
    embed_seconds = time.perf_counter() - t
    records = [r for r in records if r.uid in stored]
    tune = [p for p in halves["tune"] if f"nonlesion/tune/{p.name}" in stored]
    holdout = [p for p in halves["holdout"] if f"nonlesion/holdout/{p.name}" in stored]

    t = time.perf_counter()
    try:
        if args.loso:
            result = loso_gates(records, stores, list(networks), tune, holdout, progress=lambda m: print(m, flush=True))
        else:
            result = gate_loso(
                records,
                as_inputs(stored, [r.uid for r in records]),
                as_inputs(stored, [f"nonlesion/tune/{p.name}" for p in tune]),
                [_picture(p) for p in tune],
                as_inputs(stored, [f"nonlesion/holdout/{p.name}" for p in holdout]),
                outer_folds=args.outer_folds,
                progress=lambda message: print(message, flush=True),
            )
    except ValueError as exc:  # too few photos for a fit (a small --limit-per-source): say so, no traceback
        raise SystemExit(f"bench_gate_sources: {exc}; raise --limit-per-source (30 per source is enough)") from None
    command = "python benchmarks/bench_gate_sources.py" + "".join(
        f" --{k} {v}"
        for k, v in (
            ("model", args.model),
            ("loso", args.loso),
            ("limit-per-source", args.limit_per_source),
            ("outer-folds", None if args.outer_folds == 5 or args.loso else str(args.outer_folds)),
        )
        if v
    )
    report = {
        "model": predictor.info(),
        "command": command + f" --out {args.out}",
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "limit_per_source": args.limit_per_source,
        "bars": BARS,
        "nonlesion": {"tune": len(tune), "holdout": len(holdout)},
        "unreadable": sorted(u for u, _ in items if u in unreadable),
        "embed_seconds": round(embed_seconds, 1),
        "gate_seconds": round(time.perf_counter() - t, 1),
        **({"loso": str(args.loso), "networks": {u: p.as_posix() for u, p in networks.items()}} if args.loso else {}),
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate_sources.json").write_text(json.dumps(report, indent=2, default=float))
    if args.loso:
        beside = ("the same fit on the shipped network's features", report["shipped_features"])
        plot(report, args.out / "gate_sources.png", "gate and network both without the source", beside)
        text = loso_markdown(report)
    else:
        plot(report, args.out / "gate_sources.png")
        text = markdown(report)
    (args.out / "gate_sources.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
