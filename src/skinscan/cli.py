"""`skinscan` command line: thin subcommands over the Python API. The only module that reads argv
and the environment (besides the service)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

from . import __version__
from .card import BROWSER_MODEL
from .errors import SkinscanError

if TYPE_CHECKING:
    from .answers import Answers
    from .errors import InvalidAnswers
    from .predict import Prediction, Predictor

DATA_ROOT_ENV = "SKINSCAN_DATA"
DEFAULT_DATA_ROOT = "../shared/datasets"
DEFAULT_NONLESION = "tests/assets/nonlesion/tune"  # the quality gate's tuning pictures (export --gate)
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "10000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}

log = logging.getLogger("skinscan")


def _model_help() -> str:
    from .card import bundled_model_uses

    uses = "; ".join(f"{name} ({use})" for name, use in bundled_model_uses().items())
    return f"ONNX model file, or a bundled model by name: {uses}"


def _data_root(args: argparse.Namespace) -> Path:
    return Path(args.data_root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def _resolve(args: argparse.Namespace, name: str) -> Path:
    from .data import resolve_dataset

    return resolve_dataset(name, _data_root(args))


# ---------------------------------------------------------------- predict
EXIT_HELP = (
    "exit status: 0 when every input got a result (a photo to retake is a result); 3 when some inputs could "
    "not be read or scored (their rows are still printed and written, with the error); 2 for a usage error "
    "found before anything is scored (a bad flag or value, an output that cannot be written)."
)
EXIT_SOME_FAILED = 3
# the CSV contract: these columns in this order (photo_type joined last, so positional readers still work)
CSV_COLUMNS = [
    "path", "probability", "decision", "threshold", "advice", "error", "quality", "reasons",
    "image_probability", "adjustments", "photo_type", "diagnosis",
]  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .errors import InvalidAnswers
    from .predict import Prediction, Predictor, collect_images

    # everything a usage error can come from is checked before the model loads and anything is scored
    if args.output:
        _check_output_file(Path(args.output))
    if args.explain:
        _check_output_folder(Path(args.explain), "--explain")
    fmt = args.format or ("table" if sys.stdout.isatty() else "csv")
    inputs = collect_images(args.paths)
    if inputs.left_out and not args.quiet:
        shown = ", ".join(inputs.left_out[:3]) + (", ..." if len(inputs.left_out) > 3 else "")
        print(f"left out {len(inputs.left_out)} file(s) that are not pictures: {shown}", file=sys.stderr)
    paths = inputs.paths
    if not paths:
        raise SkinscanError("no image files found in the given paths")
    answers = _answers_for(args, paths, one_lesion=args.lesion)  # checked before the model loads: typos fail fast
    predictor = Predictor(args.model)
    if args.lesion:
        return _predict_lesion(args, predictor, paths, answers[0] if answers else None, fmt)
    # a row of the answers table with a bad value: that image's error row; the others are scored
    bad = {i: a for i, a in enumerate(answers or []) if isinstance(a, InvalidAnswers)}
    todo = [i for i in range(len(paths)) if i not in bad]
    with tqdm(
        total=len(todo), desc="skinscan", unit="img", file=sys.stderr, disable=len(todo) < 20 or args.quiet
    ) as bar:
        scored = predictor.predict(
            [paths[i] for i in todo],
            batch_size=args.batch_size,
            progress=bar.update,
            force=args.force,
            answers=None if answers is None else [answers[i] for i in todo],  # type: ignore[misc]
        )
    results: list[Prediction] = [Prediction(paths[i], None, None, None, error=str(a)) for i, a in bad.items()]
    by_index = dict(zip(todo, scored, strict=True)) | dict(zip(bad, results, strict=True))
    results = [by_index[i] for i in range(len(paths))]
    rows = [r.to_dict() for r in results]
    if args.explain:
        for row, path in zip(rows, _write_heatmaps(Path(args.explain), [Path(p) for p in paths], results), strict=True):
            row["heatmap"] = path
    if args.output:
        _write_rows(Path(args.output), rows)
    if fmt == "table" and not args.quiet:
        _print_table(predictor, results, explain=args.explain)
    elif fmt != "table":
        _print_rows(rows, fmt)
    return _summary(results, args)


def _summary(results: list[Prediction], args: argparse.Namespace) -> int:
    """The notes on stderr, and the exit status (see EXIT_HELP)."""
    retakes = sum(r.quality == "retake" for r in results)
    if retakes and not args.force and not args.quiet:
        print(f"{retakes} photo(s) to retake (see the reasons); --force predicts them anyway", file=sys.stderr)
    failed = sum(not r.ok for r in results)
    if failed:
        print(
            f"{failed} of {len(results)} input(s) could not be read or scored (see the error column)", file=sys.stderr
        )
    return EXIT_SOME_FAILED if failed else 0


def _print_table(predictor: Predictor, results: list[Prediction], explain: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from .explain import HEATMAP_LEGEND

    console = Console()
    table = Table(title=f"model {predictor.card.name} {predictor.card.version}: a screening aid, not a diagnosis")
    table.add_column("path", overflow="fold", ratio=3)
    table.add_column("probability", justify="right")
    table.add_column("decision", ratio=2)
    table.add_column("threshold", justify="right")
    table.add_column("photo type")
    table.add_column("quality", ratio=3)
    adjusted = any(r.adjustments for r in results)
    if adjusted:
        table.add_column("answers (photo alone; each answer's effect on the odds)", ratio=4)
    for r in results:
        quality = "ok" if r.quality == "ok" else f"[yellow]retake: {'; '.join(r.reasons)}[/]" if r.quality else "-"
        extra = [_answers_cell(r)] if adjusted else []
        kind = r.photo_type or "-"
        if not r.ok:  # an error row carries no decision fields
            table.add_row(r.path, "-", f"[yellow]error: {r.error}[/]", "-", "-", "-", *extra)
        elif r.probability is not None:
            style = "bold red" if r.decision == "refer" else "green"
            probability, decision = f"{r.probability:.3f}", f"[{style}]{r.decision}[/]"
            table.add_row(r.path, probability, decision, f"{r.threshold:.3f}", kind, quality, *extra)
        else:  # a photo to retake: no estimate unless --force
            table.add_row(r.path, "-", "[yellow]retake the photo[/]", f"{r.threshold:.3f}", kind, quality, *extra)
    console.print(table)
    console.print(
        "refer = see a dermatologist soon; monitor = keep an eye on it, and see a doctor if it "
        "changes, bleeds or itches."
    )
    if explain:
        console.print(f"heatmap overlays in {explain}: {HEATMAP_LEGEND}")


def _print_rows(rows: list[dict], fmt: str) -> None:
    """Piped output: the rows as CSV (the columns of -o FILE.csv) or JSON, and nothing else on stdout."""
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    else:
        _csv_rows(sys.stdout, rows)


def _check_output_file(path: Path) -> None:
    """-o: refuse, before anything is scored, a name that cannot be written as a .csv or .json file."""
    if path.suffix.lower() not in (".csv", ".json"):
        raise SkinscanError(f"--output {path}: use a .csv or .json file name")
    if path.is_dir():
        raise SkinscanError(f"--output {path}: that is a folder; give a file name, e.g. {path / 'results.csv'}")
    _check_writable_parent(path, "--output")


def _check_output_folder(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise SkinscanError(f"{flag} {path}: a file of that name exists; give a folder for the overlays")
    _check_writable_parent(path, flag)


def _check_writable_parent(path: Path, flag: str) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest existing folder: the rest will be created
    if not parent.is_dir():
        raise SkinscanError(f"{flag} {path}: {parent} is a file, not a folder")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise SkinscanError(f"{flag} {path}: {target} is not writable")


def _predict_lesion(
    args: argparse.Namespace, predictor: Predictor, paths: list[str], answers: Answers | None, fmt: str
) -> int:
    """--lesion: every given photo shows the same lesion; print each photo and the combined estimate."""
    from rich.console import Console
    from rich.table import Table

    from .errors import InvalidAnswers
    from .lesion import predict_lesion

    if isinstance(answers, InvalidAnswers):
        raise answers  # one set of answers for the lesion: a bad one leaves nothing to combine them with
    result = predict_lesion(predictor, paths, force=args.force, answers=answers)
    c = result.combined
    rows = [*(p.to_dict() for p in result.photos), {**result.to_dict()["combined"]}]
    if args.output:
        _write_rows(Path(args.output), rows)
    if fmt != "table":
        _print_rows(rows, fmt)
    elif not args.quiet:
        table = Table(title=f"one lesion, {len(paths)} photos: a screening aid, not a diagnosis")
        for col in ("photo", "probability", "decision", "quality"):
            table.add_column(col, overflow="fold")
        if c.adjustments:
            table.add_column("answers (photos alone; each answer's effect on the odds)", overflow="fold")
        for p in [*result.photos, c]:
            prob = "-" if p.probability is None else f"{p.probability:.3f}"
            note = p.error or ("ok" if p.quality == "ok" else "; ".join(p.reasons) or "-")
            extra = [_answers_cell(p) if p is c else "-"] if c.adjustments else []
            table.add_row(p.path or "-", prob, p.decision or "-", note, *extra, style="bold" if p is c else None)
        console = Console()
        console.print(table)
        if c.probability is not None:
            console.print(f"{c.path}: {c.decision} at threshold {c.threshold:.3f}. {c.advice}")
        if result.warning:
            console.print(f"[yellow]warning: {result.warning}[/]")
    if result.warning and fmt != "table":
        print(f"warning: {result.warning}", file=sys.stderr)
    return EXIT_SOME_FAILED if any(not p.ok for p in result.photos) else 0


def _answers_for(
    args: argparse.Namespace, paths: list[str], one_lesion: bool = False
) -> list[Answers | InvalidAnswers | None] | None:
    """The answers per image, from --answers FILE.csv or from the answer flags (one image, or one lesion)."""
    from .answers import ANSWER_FIELDS, Answers, match_answers, read_answers_csv
    from .errors import InvalidAnswers

    flags = {name: getattr(args, name) for name in ANSWER_FIELDS if getattr(args, name) is not None}
    if args.answers and flags:
        raise InvalidAnswers("give the answers either in --answers FILE.csv or as flags (--age ...), not both")
    if args.answers:
        return match_answers(read_answers_csv(args.answers), paths)
    if not flags:
        return None
    if len(paths) != 1 and not one_lesion:
        shown = " ".join(f"--{name.replace('_', '-')}" for name in flags)
        raise InvalidAnswers(
            f"the answer flags ({shown}) describe one photo, but {len(paths)} images were given: "
            "put the answers of several photos in --answers FILE.csv"
        )
    return [Answers(**flags)]


def _answers_cell(r: Prediction) -> str:
    if not r.adjustments or r.image_probability is None:
        return "-"
    return "; ".join([f"photo alone {r.image_probability:.3f}", *(a.label for a in r.adjustments)])


def _write_heatmaps(folder: Path, paths: list[Path], results: list[Prediction]) -> list[str | None]:
    """`<name>.heatmap.png` overlays in `folder` (see skinscan.explain); the path written per image, or None."""
    from .explain import DEFAULT_MAX_SIDE, explain

    folder.mkdir(parents=True, exist_ok=True)
    written: list[str | None] = []
    used: set[str] = set()
    for path, result in zip(paths, results, strict=True):
        if not result.ok or result.cam is None:
            written.append(None)
            continue
        name, n = path.stem, 1
        while name in used:  # the same file name in two folders: keep both
            n += 1
            name = f"{path.stem}-{n}"
        used.add(name)
        out = folder / f"{name}.heatmap.png"
        explain(path, result, max_side=DEFAULT_MAX_SIDE).save(out)
        written.append(str(out))
    if any(r.ok and r.cam is None for r in results):
        log.warning("this model has no heatmap output (cam); no overlays written; re-export it")
    return written


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:  # .csv (checked before the scoring by _check_output_file)
        with path.open("w", newline="") as fh:
            _csv_rows(fh, rows)


def _csv_rows(fh: IO[str], rows: list[dict]) -> None:
    w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(
        {
            **row,
            "reasons": "; ".join(row.get("reasons") or []),
            "adjustments": "; ".join(a["label"] for a in row.get("adjustments") or []),
        }
        for row in rows
    )


# ---------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config, parse_overrides

    overrides = parse_overrides(args.set or [])
    if args.data:
        overrides["data"] = args.data
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    cfg = load_config(args.config, overrides)
    if cfg.data:  # dataset names (from flags or a config file) resolve against the data root
        cfg = cfg.model_copy(update={"data": [str(_resolve(args, d)) for d in cfg.data]})
    from .train import train  # needs the train extra

    try:
        result = train(cfg, args.out, resume=args.resume, progress=not args.quiet, calibrate_only=args.calibrate_only)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished epochs are saved in {args.out}; continue with "
            f"`skinscan train --out {args.out} --resume` (same settings)",
            file=sys.stderr,
        )
        return 130
    print(
        f"run folder: {result.run_dir}\nbest epoch {result.best_epoch}: validation AUC {result.best_val_auc:.4f}; "
        f"temperature {result.temperature:.3f}; threshold {result.threshold:.4f}; {result.seconds / 60:.1f} min"
    )
    print(f"next: skinscan export {result.run_dir} --out models/NAME")
    return 0


# ---------------------------------------------------------------- loso
def cmd_loso(args: argparse.Namespace) -> int:
    from .config import load_config, parse_overrides

    overrides = parse_overrides(args.set or [])
    if args.data:
        overrides["data"] = args.data
    cfg = load_config(args.config, overrides)
    if not cfg.data:
        raise SkinscanError("no training data: give --config FILE or --data DATASET [DATASET ...]")
    cfg = cfg.model_copy(update={"data": [str(_resolve(args, d)) for d in cfg.data]})
    extra = [str(_resolve(args, d)) for d in args.also_score or []]
    from . import loso
    from .train import load_training_records  # needs the train extra

    trainable, _ = load_training_records(cfg)
    everything = cfg.model_copy(update={"data": cfg.data + extra, "source_weights": None, "exclude_sources": None})
    records, _ = load_training_records(everything)
    sources = sorted({r.source for r in records})
    unknown = sorted(set(args.units or []) - set(sources))
    if unknown:
        raise SkinscanError(f"--units: no source named {', '.join(unknown)}; sources: {', '.join(sources)}")
    if args.in_source_folds == 1 or args.in_source_folds < 0:
        raise SkinscanError(f"--in-source-folds {args.in_source_folds}: give 2 or more folds, or 0 for none")
    if args.in_source_only and (args.units or not args.in_source_folds):
        raise SkinscanError("--in-source-only runs the pooled K-fold alone: leave out --units, keep --in-source-folds")
    out = Path(args.out)
    title = (
        args.title or f"Leave-one-source-out ({args.protocol}): {Path(args.config).stem if args.config else 'config'}"
    )
    if args.protocol == "frozen":
        spec = cfg.preprocess_spec()
        x = loso.embed(
            records, spec, cfg.arch, cache=Path(args.cache) / loso.cache_name(spec, cfg.arch), progress=not args.quiet
        )
        recipe = loso.Recipe(
            name=title,
            sources=tuple(sorted({r.source for r in trainable})),
            source_weights=cfg.source_weights,
            source_balance=cfg.source_balance,
            diagnosis_balance=cfg.diagnosis_balance,
            target_sensitivity=cfg.target_sensitivity,
        )
        result = loso.frozen_loso(
            records,
            x,
            recipe,
            args.units,
            in_source_folds=args.in_source_folds,
            n_boot=args.bootstrap,
            progress=None if args.quiet else print,
            held_out=not args.in_source_only,
        )
    else:
        result = loso.finetune_loso(
            cfg,
            records,
            out,
            args.units,
            n_boot=args.bootstrap,
            progress=not args.quiet,
            in_source_folds=args.in_source_folds,
            held_out=not args.in_source_only,
        )
    report = loso.write_report(result, out, title)
    print(loso.table(result))
    print(f"wrote {report}, {out / 'loso.json'} and {out / 'loso.png'}")
    return 0


# ---------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .card import require_card_writer, resolve_model
    from .data import read_patient_list
    from .evaluate import evaluate, record_in_card

    if args.bootstrap < 1:
        raise SkinscanError(f"--bootstrap {args.bootstrap}: give the number of resamples, at least 1 (default 1000)")
    if args.record and not re.fullmatch(r"[a-z][a-z0-9_]*", args.record):
        raise SkinscanError(f"--record {args.record!r}: use a key of lower-case letters, digits and _")
    if args.record == "validation" or (args.record or "").startswith("validation_"):
        raise SkinscanError(f"--record {args.record}: the training run's validation metrics live there")
    if args.record:
        require_card_writer()  # before the scoring, not after it
    patients = read_patient_list(args.patients) if args.patients else None
    report = evaluate(
        args.model,
        _resolve(args, args.data),
        args.out,
        split=args.split,
        run=args.run,
        patients=patients,
        patients_from=str(args.patients or ""),
        n_boot=args.bootstrap,
        progress=not args.quiet,
    )
    for name, m in report.subsets.items():
        print(
            f"{name:>9}: n={m.n} AUC {m.auc:.4f} [{m.auc_ci[0]:.4f}, {m.auc_ci[1]:.4f}]  "
            f"sens {m.sensitivity:.3f} spec {m.specificity:.3f}  ECE {m.ece:.4f}"
        )
    print(f"report: {report.out_dir / 'report.md'}")
    if args.record:
        path = resolve_model(args.model)
        record_in_card(report, path, args.record)
        print(f"recorded in the model card of {path} as metrics.{args.record}")
    return 0


# ---------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .export import export, record_test_metrics, validation_image_paths
    from .phototype import DERMOSCOPIC_MIN_PROBABILITY

    runs = [Path(r) for r in args.run]
    for r in runs:
        if not ((r / "config.yaml").is_file() and (r / "data.json").is_file()):
            raise SkinscanError(
                f"{r}: not a training run folder (no config.yaml and data.json there); give the --out folder of "
                "`skinscan train`"
            )
    run = runs[0]  # an ensemble's runs share their training and validation images
    check = validation_image_paths(run) or None
    if args.thresholds_from and not args.photo_types:
        raise SkinscanError("--thresholds-from sets a threshold per photo type: add --photo-types")
    q = args.dermoscopic_min_probability
    if q is not None and not args.photo_types:
        raise SkinscanError("--dermoscopic-min-probability sets how photo types are told apart: add --photo-types")
    if q is not None and not 0 < q < 1:
        raise SkinscanError(f"--dermoscopic-min-probability must lie between 0 and 1, not {q:g}")
    if q is None:
        q = DERMOSCOPIC_MIN_PROBABILITY
    # their errors before the export's work
    cv = _cv_thresholds(run, Path(args.thresholds_from)) if args.thresholds_from else None
    split = _photo_type_split(run) if args.photo_types else None
    path = export(runs, args.out, name=args.name, version_tag=args.version, check_images=check)
    print(f"wrote {path} and {path.with_suffix('.card.json')}")
    if split:  # before --test: the test metrics use the per-type calibration
        _add_photo_types(path, *split, cv=cv, dermoscopic_min_probability=q)
    if split and json.loads(path.with_suffix(".card.json").read_text()).get("diagnosis"):
        from .export import add_diagnosis_figures

        figures = add_diagnosis_figures(path, split[1], progress=True)
        shown = ", ".join(f"{s} {f['diagnosis_balanced_accuracy']:.2f}" for s, f in figures.items())
        print(f"diagnosis balanced accuracy on validation stored in the model card: {shown}")
    if args.test:
        report_dir = Path("reports") / f"{args.name}-test"
        record_test_metrics(path, _resolve(args, args.test), report_dir)
        print(f"test metrics recorded in the model card; report in {report_dir}")
    if args.gate:  # after --test: the test metrics score every test image, as without a gate
        _add_gate(path, run, Path(args.gate))
    if args.int8:  # last: the int8 model copies the finished card
        from .export import quantize_int8

        q = quantize_int8(path, validation_image_paths(run, limit=10_000), path.with_name(f"{path.stem}-int8.onnx"))
        print(f"wrote {q} (static int8; evaluate it before use: skinscan evaluate --model {q} ...)")
    return 0


def _photo_type_split(run: Path) -> tuple[list, list]:
    """The run's training and validation records for `--photo-types`, checked before any export work."""
    from .config import load_config
    from .phototype import SOURCE_PHOTO_TYPE, require_both_types
    from .train import load_training_records

    records, _ = load_training_records(load_config(run / "config.yaml"))
    unknown = sorted({r.source for r in records} - set(SOURCE_PHOTO_TYPE))
    if unknown:
        raise SkinscanError(
            f"--photo-types: cannot tell which kind of photo {', '.join(unknown)} holds "
            f"(known: {', '.join(f'{k} = {v}' for k, v in SOURCE_PHOTO_TYPE.items())})"
        )
    require_both_types([SOURCE_PHOTO_TYPE[r.source] for r in records])
    val_keys = set(json.loads((run / "data.json").read_text()).get("val_keys", []))
    val = [r for r in records if r.uid in val_keys]
    train = [r for r in records if r.uid not in val_keys]
    if not val:
        raise SkinscanError(f"--photo-types: {run}/data.json lists no validation images (a K-fold run?)")
    return train, val


def _cv_thresholds(run: Path, cv_run: Path) -> dict:
    """`--thresholds-from`: the thresholds per photo type from a K-fold run's out-of-fold predictions, which
    must score exactly the model's training photos at the run's target."""
    from .config import load_config
    from .phototype import cv_thresholds

    oof = cv_run / "oof.csv"
    if not oof.is_file():
        raise SkinscanError(
            f"--thresholds-from {cv_run}: no oof.csv there; train the same recipe with --set folds=3 (or more)"
        )
    mine, theirs = (json.loads((r / "data.json").read_text()).get("records_sha256") for r in (run, cv_run))
    if mine is None or mine != theirs:
        raise SkinscanError(
            f"--thresholds-from {cv_run}: its folds cover other photos than {run}'s training photos "
            "(records_sha256 differs); train it with the same data and exclude_patients"
        )
    with oof.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    target = load_config(run / "config.yaml").target_sensitivity
    cv = cv_thresholds(
        [int(r["fold"]) for r in rows],
        [r["source"] for r in rows],
        [int(r["label"]) for r in rows],
        [float(r["logit"]) for r in rows],
        target=target,
        run=str(cv_run),
        groups=[r["patient"] or f"{r['source']}/{r['key']}" for r in rows],  # patients where recorded
    )
    for t, v in cv["types"].items():
        c = v["cross_validation"]
        print(
            f"{t} threshold {v['threshold']:.3f}: out-of-fold sensitivity {c['sensitivity']:.3f}, specificity "
            f"{c['specificity']:.3f} on {c['n']} {c['source']} photos ({c['n_malignant']} malignant); AUC "
            f"{c['auc']:.3f} [{c['auc_ci'][0]:.3f}, {c['auc_ci'][1]:.3f}], ECE {c['ece']:.3f}"
        )
    return cv


def _add_photo_types(path: Path, train: list, val: list, cv: dict | None, dermoscopic_min_probability: float) -> None:
    from .export import add_photo_types
    from .phototype import SOURCE_PHOTO_TYPE

    section = add_photo_types(
        path,
        [r.path for r in train],
        [SOURCE_PHOTO_TYPE[r.source] for r in train],
        [f"{r.source}/{r.group}" for r in train],
        [r.path for r in val],
        [r.label for r in val],
        [SOURCE_PHOTO_TYPE[r.source] for r in val],
        cv=cv,
        dermoscopic_min_probability=dermoscopic_min_probability,
        progress=True,
    )
    fit = section["fit"]
    temps = ", ".join(
        f"{t} {v['temperature']:.2f} (threshold {v['threshold']:.3f})" for t, v in section["types"].items()
    )
    print(
        f"photo types stored in the model card: probe accuracy {fit['probe_accuracy_cross_validated']:.1%} "
        f"(cross-validated on the training photos), {fit['probe_accuracy_validation']:.1%} on validation; "
        f"temperatures {temps} (global {fit['global_temperature']:.2f}); judged dermoscopic where the probe's "
        f"P(dermoscopic) >= {section['probe']['dermoscopic_min_probability']:g}"
    )


def _add_gate(path: Path, run: Path, nonlesion: Path) -> None:
    from .config import load_config
    from .export import add_quality_gate
    from .train import load_training_records

    if not nonlesion.is_dir():
        raise SkinscanError(
            f"--gate {nonlesion}: no such folder; run from the repository root (the default is "
            f"{DEFAULT_NONLESION}) or pass the folder of non-lesion tuning images"
        )
    records, _ = load_training_records(load_config(run / "config.yaml"))
    section = add_quality_gate(
        path,
        [r.path for r in records],
        nonlesion,
        sources=[r.source for r in records],
        groups=[f"{r.source}/{r.group}" for r in records],
        progress=True,
    )
    fit = section["fit"]
    train = fit.get("cross_fitted_train_rejection", fit["novelty_cross_fitted_train_rejection"])
    flagged = fit.get("nonlesion_tune_flag_rate_cross_fitted", fit["novelty_nonlesion_tune_flag_rate"])
    print(
        f"quality gate stored in the model card ({fit['chosen']}): 'not a skin lesion' refuses {train} of the "
        f"training photos (cross-fitted) and flags {flagged:.1%} of the non-lesion tuning pictures"
    )


# ---------------------------------------------------------------- fit-answers
def cmd_fit_answers(args: argparse.Namespace) -> int:
    from .answers import Answers, fit_answer_adjustments, read_oof_logits, section_rows, store_section
    from .data import load_dataset

    data = _resolve(args, args.data)
    records = {r.uid: r for r in load_dataset(data)}
    recipe, oof = read_oof_logits(args.oof, args.recipe, sources={r.source for r in records.values()})
    unknown = [k for k in oof if k not in records]
    if unknown:
        raise SkinscanError(
            f"{len(unknown)} out-of-fold photo(s) are not in {data} (e.g. {unknown[0]}): pass the dataset the "
            "logits were computed on with --data"
        )
    keys = sorted(oof)
    wrong = [k for k in keys if oof[k][0] != records[k].label]
    if wrong:
        raise SkinscanError(f"{len(wrong)} label(s) in {args.oof} disagree with {data} (e.g. {wrong[0]})")
    section = fit_answer_adjustments(
        [oof[k][2] for k in keys],
        [Answers.from_phone_record(records[k].meta) for k in keys],
        [records[k].label for k in keys],
        [records[k].group for k in keys],
        l2=args.l2,
        fitted_on={
            "image_logits": f"{Path(args.oof).as_posix()}, {recipe}: out-of-fold, patient-grouped",
            "data": Path(data).name,
            "photos": len(keys),
        },
    )
    side = store_section(Path(args.model), section)
    print(
        f"fitted on {section['n_records']} photos of {section['n_patients']} patients (out-of-fold logits of "
        f"{recipe!r}; offset temperature {section['offset_temperature']:.3f}); odds ratio per answer:"
    )
    for name, value, ratio, n, count in section_rows(section):
        print(f"  {name:>20} {value:<22} x{ratio:6.3f}   ({count} of {n} records where known)")
    print(f"stored in the model card of {args.model} (and {side})")
    return 0


def cmd_fit_thresholds(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .predict import Predictor

    model = Predictor(args.model)  # a bad path or model: a clear error before anything is scored
    held_out = model.card.validation_keys
    datasets = ((model.card.model_extra or {}).get("training") or {}).get("data", {}).get("datasets", [])
    if not held_out or not datasets:
        raise SkinscanError(f"{args.model}'s card lists no validation photos (training.data.val_keys) to choose on")
    records = [r for d in datasets for r in load_dataset(_resolve(args, Path(d).name)) if r.uid in held_out]
    if len(records) < len(held_out):
        raise SkinscanError(
            f"{len(held_out) - len(records)} of the card's {len(held_out)} validation photos are missing under "
            f"{_data_root(args)}: pass the folder holding {', '.join(Path(d).name for d in datasets)} with --data-root"
        )
    del model
    from .export import refit_type_thresholds  # needs the train extra (MissingExtra says so)

    section = refit_type_thresholds(args.model, records, args.target, builds=args.builds, progress=not args.quiet)
    names = ", ".join([args.model, *args.builds])
    print(f"thresholds per photo type of {names}, {len(records)} validation photos: {section['threshold_rule']}")
    for t, entry in section["types"].items():
        before = section["threshold_fit"]["previous_thresholds"][t]["threshold"]
        print(f"  {t:>12}: {before:.4f} (the export's) -> {entry['threshold']:.4f} (calibrated probability)")
    print("  as served, per source (sensitivity / specificity on its validation photos):")
    for source, f in section["threshold_fit"]["as_served"].items():
        sens, spec = (("-" if v is None else f"{v:.3f}") for v in (f["sensitivity"], f["specificity"]))
        print(f"  {source:>22}: {sens} / {spec}  ({f['n']} photos, {f['n_malignant']} cancers)")
    return 0


# ---------------------------------------------------------------- batch (Ray Data)
def cmd_batch(args: argparse.Namespace) -> int:
    from .errors import MissingExtra

    try:  # the scale extra, before anything else: a missing one is a usage error, not a traceback
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:
        raise MissingExtra("scale", "skinscan batch", exc) from None
    from .ray_batch import run_batch

    summary = run_batch(
        args.input,
        args.output,
        model=args.model,
        address=args.address,
        force=args.force,
        batch_size=args.batch_size,
        actors=args.actors,
        threads_per_actor=args.threads_per_actor,
        progress=not args.quiet,
    )
    s = summary
    if not args.quiet:
        print(
            f"{s.scored} image(s) scored into {s.output} in {s.seconds:.1f} s ({s.images_per_second:.1f} img/s): "
            f"{s.refer} refer, {s.retakes} to retake, {s.errors} could not be read or scored"
            + (f"; {s.skipped} already there, skipped" if s.skipped else "")
            + ". Read it with pandas.read_parquet(folder).",
            file=sys.stderr,
        )
    return EXIT_SOME_FAILED if s.errors else 0


# ---------------------------------------------------------------- serve
_SERVE_FLAGS = (
    "host",
    "port",
    "workers",
    "model",
    "threads",
    "max_body_bytes",
    "max_pixels",
    "max_batch_items",
    "batch_window_ms",
    "max_batch_size",
    "api_key",
    "cors_origins",
    "request_timeout_s",
    "browser_model",
)


def _serve_log_config(verbose: bool) -> dict:
    """uvicorn's logging plus the service's logger, so that worker processes log it too."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    level = "DEBUG" if verbose else "INFO"
    config["loggers"]["skinscan"] = {"handlers": ["default"], "level": level, "propagate": False}
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .errors import ConfigError
    from .predict import Predictor
    from .service import Settings, create_app

    flags = {k: getattr(args, k) for k in _SERVE_FLAGS if getattr(args, k) is not None}
    try:
        settings = Settings(**flags)  # flags win over SKINSCAN_* environment variables
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid serve setting ({problems}); see `skinscan serve --help`") from None
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "debug" if args.verbose else "info",
        "access_log": False,  # the service logs its own line per request (id, sizes, timings; never images)
        "log_config": _serve_log_config(args.verbose),
        "timeout_graceful_shutdown": int(settings.request_timeout_s) + 1,
    }
    if args.replicas is not None or args.max_replicas is not None:
        from .ray_serve import serve_replicas  # Ray is imported here only

        serve_replicas(settings, args.replicas or 1, max_replicas=args.max_replicas, address=args.address)
        return 0
    if args.address:
        raise ConfigError("--address is for --replicas (a Ray cluster to run the replicas on)")
    if settings.workers == 1:
        predictor = Predictor(settings.model, threads=settings.threads)  # fail here, with a clear message
        uvicorn.run(create_app(settings, predictor=predictor), **common)
        return 0
    if settings.model is not None and not settings.model.is_file():
        raise ConfigError(f"--model {settings.model}: no such file")
    # Each worker process builds its own app from the environment, so pass the flags on through it.
    for key, value in flags.items():
        os.environ[f"SKINSCAN_{key.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    import shutil
    import tempfile

    from .service import MULTIPROC_ENV

    # The workers' metrics meet in a folder (prometheus_client's multiprocess mode): counts, never images.
    shm = Path("/dev/shm")
    metrics_dir = tempfile.mkdtemp(prefix="skinscan-metrics-", dir=shm if shm.is_dir() else None)
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        uvicorn.run("skinscan.service:create_app_from_env", factory=True, workers=settings.workers, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .answers import BODY_SITES, NEUTRAL_ANSWERS
    from .explain import HEATMAP_LEGEND

    parser = argparse.ArgumentParser(
        prog="skinscan",
        description="Screen photos of skin lesions for malignancy risk. A screening aid, not a diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"skinscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "predict",
        help="predict image files or folders (recursively)",
        description="Print the calibrated malignancy probability and referral decision per image: a table on a "
        "terminal, CSV rows when the output is piped (--format). Every input is a row; one that cannot be read "
        "(missing, not a supported picture, a bad answer in --answers) is a row with its error.",
        epilog=EXIT_HELP,
    )
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument(
        "--model",
        help=_model_help(),
    )
    p.add_argument("--output", "-o", help="also write the rows to FILE.csv or FILE.json")
    p.add_argument("--batch-size", type=int, default=16, help="images per inference batch (default 16)")
    p.add_argument("--quiet", "-q", action="store_true", help="no table or progress bar")
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        help="what to print: table (the default on a terminal), csv (the default when piped: the columns of "
        "-o FILE.csv) or json",
    )
    p.add_argument("--force", action="store_true", help="predict photos the quality gate refuses, too")
    p.add_argument(
        "--lesion", action="store_true", help="all given photos show ONE lesion: print each and their combined estimate"
    )
    p.add_argument(
        "--explain",
        metavar="DIR",
        help=f"also write heatmap overlays DIR/<name>.heatmap.png ({HEATMAP_LEGEND})",
    )
    g = p.add_argument_group(
        "answers about the spot (optional)",
        "What a photo cannot show adjusts the estimate, each known answer by its own odds ratio; unknown "
        "answers change nothing. The flags describe one photo; for several use --answers.",
    )
    g.add_argument(
        "--answers",
        metavar="FILE.csv",
        help="answers per image: columns path,age,sex,body_site,diameter_mm,itch,grew,hurt,changed,bleed,"
        "elevated,skin_cancer_history (path as given or resolved, or a bare file name where unique; "
        "an empty cell is unknown)",
    )
    g.add_argument("--age", help="age in years")
    g.add_argument("--sex", help="female, male, or other (other / prefer not to say: adjusts nothing)")
    g.add_argument(
        "--body-site",
        dest="body_site",
        help=f"{', '.join(BODY_SITES)}; or {', '.join(NEUTRAL_ANSWERS['body_site'])} (sites the fitted data "
        "lacks: they adjust nothing)",
    )
    g.add_argument("--diameter-mm", dest="diameter_mm", help="the spot's widest extent in millimetres")
    for name, question in (
        ("itch", "does it itch?"),
        ("grew", "has it grown in the last months?"),
        ("hurt", "does it hurt?"),
        ("changed", "has it changed (shape, colour) in the last months?"),
        ("bleed", "does it bleed?"),
        ("elevated", "is it raised above the skin?"),
        ("skin_cancer_history", "has the person had skin cancer before?"),
    ):
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="yes|no", help=question)
    p.set_defaults(func=cmd_predict)

    common_data = argparse.ArgumentParser(add_help=False)
    common_data.add_argument(
        "--data-root", help=f"folder holding named datasets (default ${DATA_ROOT_ENV} or {DEFAULT_DATA_ROOT})"
    )

    p = sub.add_parser(
        "train",
        parents=[common_data],
        help="fine-tune the network (needs skinscan[train])",
        description="Fine-tune EfficientNet-Lite on a dataset. Defaults: src/skinscan/defaults.yaml.",
    )
    p.add_argument(
        "--data",
        action="append",
        help="dataset folder, labels CSV, or a name under the data root (e.g. isic-mvb); repeat to train on several",
    )
    p.add_argument("--out", required=True, help="run folder for checkpoints, history and calibration")
    p.add_argument("--config", help="YAML file of settings (keys as in defaults.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. --set lr=3e-4")
    p.add_argument("--epochs", type=int, help="shortcut for --set epochs=N")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument(
        "--calibrate-only",
        action="store_true",
        help="with --resume: stop training and calibrate the best epoch so far (then export)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        parents=[common_data],
        help="metrics, plots and a report for a model",
        description="Score a labelled dataset: metrics.json, predictions.csv, plots and report.md.",
    )
    p.add_argument("--model", help=_model_help())
    p.add_argument("--data", required=True, help="dataset folder, labels CSV or name (e.g. isic-mvb)")
    p.add_argument("--split", default="auto", help="split folder to score (default: test if present)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--run", help="training run folder, to plot its training curves")
    p.add_argument(
        "--patients",
        metavar="FILE",
        help="score only these patients' photos (one id per line; e.g. a clinic's patients)",
    )
    p.add_argument(
        "--record",
        metavar="KEY",
        help="also store the metrics in the model's card as metrics.KEY (e.g. clinic_a), where they travel "
        "with the model; rewrites the model file (needs the onnx package)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for intervals (default 1000)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "loso",
        parents=[common_data],
        help="leave-one-source-out evaluation: train without each source, score it",
        description="For each source (a dataset, or an atlas or collection inside one), train on the others and "
        "score it, beside one pooled source-stratified grouped 5-fold run (in-source figures). The decision rule "
        "(a temperature and threshold per photo type) comes from the training sources' held-out predictions only, "
        "so each row shows whether the target sensitivity holds on a source never seen. Protocol `frozen` "
        "(default): ImageNet features + logistic-regression heads, drawn like the sampler: minutes on a CPU, "
        "for choosing data and balance. Protocol `finetune`: the whole recipe per source (a GPU's job; on a "
        "CPU a short schedule, --set epochs=3 --set samples_per_epoch=1280, takes about 10 minutes per "
        "source), keeping each source's logits for benchmarks/bench_decision_rules.py; its in-source run is "
        "K more trainings (OUT/in-source/, a K-fold `skinscan train`) whose oof.csv is also what "
        "`skinscan fit-answers --oof` fits the answers on. "
        "Writes loso.json, report.md and loso.png. Needs skinscan[train].",
    )
    p.add_argument("--config", help="training configuration (YAML) whose data and balance are evaluated")
    p.add_argument("--data", nargs="+", help="training datasets (instead of the config's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument(
        "--also-score",
        nargs="+",
        metavar="DATASET",
        help="datasets only scored, never trained on (e.g. clinical-atlas for a recipe without it)",
    )
    p.add_argument("--units", nargs="+", metavar="SOURCE", help="hold out only these sources (default: every one)")
    p.add_argument("--protocol", choices=["frozen", "finetune"], default="frozen", help="(default frozen)")
    p.add_argument(
        "--in-source-folds",
        type=int,
        default=5,
        metavar="K",
        help="folds of the pooled grouped in-source run (default 5; 0: none). finetune: K more trainings, in "
        "OUT/in-source/, whose oof.csv also feeds `skinscan fit-answers --oof`",
    )
    p.add_argument("--in-source-only", action="store_true", help="only the in-source run: no held-out unit")
    p.add_argument("--out", required=True, help="report folder (finetune: also the runs)")
    p.add_argument("--cache", default="runs/features", help="where frozen features are cached (default runs/features)")
    p.add_argument("--title", help="the report's title")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for intervals (default 1000)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_loso)

    p = sub.add_parser(
        "export",
        parents=[common_data],
        help="write the ONNX model and its model card",
        description="Export a training run to ONNX (card inside), checked against torch.",
    )
    p.add_argument(
        "run",
        nargs="+",
        help="training run folder; several runs (same settings but the seed, trained with one split_seed) make "
        "one ensemble model whose logit is their mean",
    )
    p.add_argument("--out", required=True, help="folder for <name>.onnx and <name>.card.json")
    p.add_argument("--name", default="skinscan-lite0", help="model name (default skinscan-lite0)")
    p.add_argument("--version", dest="version", help="model version (default: today's date)")
    p.add_argument("--test", help="also score this dataset's test split and record its metrics in the card")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write <name>-int8.onnx, statically quantised on the run's validation images",
    )
    p.add_argument(
        "--photo-types",
        action="store_true",
        help="calibrate dermoscopic images and phone photos each with its own temperature: a probe on the "
        "embedding tells them apart (fitted on the run's training photos), the temperatures are fitted on its "
        "validation photos; the decision boundary stays one unless --thresholds-from (see skinscan.phototype)",
    )
    p.add_argument(
        "--thresholds-from",
        metavar="CV_RUN",
        help="with --photo-types: a threshold per photo type chosen on the out-of-fold predictions (oof.csv) of "
        "a K-fold run of the same recipe and data (skinscan train ... --set folds=3): the calibrated probability "
        "that keeps the run's target_sensitivity on each source's pooled out-of-fold photos",
    )
    p.add_argument(
        "--dermoscopic-min-probability",
        type=float,
        metavar="Q",
        help="with --photo-types: the probe's P(dermoscopic) a photo needs to be judged as dermoscopic, else it "
        "is judged as a phone photo, whose threshold refers more (default 0.9: taking a phone photo for a "
        "dermoscopic one can miss a cancer, the reverse costs a referral)",
    )
    p.add_argument(
        "--gate",
        nargs="?",
        const=DEFAULT_NONLESION,
        metavar="NONLESION_DIR",
        help="also fit the quality gate's 'not a skin lesion' check on the run's training images and the "
        f"non-lesion tuning pictures (default {DEFAULT_NONLESION}, from the repository root)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "fit-answers",
        parents=[common_data],
        help="fit the answers' adjustments and store them in a model's card",
        description="Fit each answer's log-odds adjustment (skinscan.answers) on out-of-fold image logits of "
        "the phone photos, and write them into the model's card (the ONNX file and "
        "<name>.card.json). Needs the `onnx` package (skinscan[train]).",
    )
    p.add_argument("--model", required=True, help="ONNX model whose card receives the adjustments (rewritten)")
    p.add_argument(
        "--oof",
        required=True,
        help="out-of-fold image logits: the oof.csv of a K-fold run of the model's recipe (skinscan train ... --set "
        "folds=5; its rows of --data are used), or a results JSON of benchmarks/ablation_phone.py (with --recipe)",
    )
    p.add_argument("--recipe", help="with an ablation results JSON: the recipe whose logits to use, e.g. C")
    p.add_argument(
        "--data", default="pad-ufes-20-phone", help="the dataset the logits score (default pad-ufes-20-phone)"
    )
    p.add_argument("--l2", type=float, default=1.0, help="ridge penalty on each answer's contrast (default 1)")
    p.set_defaults(func=cmd_fit_answers)

    p = sub.add_parser(
        "fit-thresholds",
        parents=[common_data],
        help="choose a model's threshold per photo type again, by the rule leave-one-source-out chose",
        description="Score the validation photos the model's card lists (its training run's; never trained on) "
        "with the model itself and set each photo type's threshold to the highest that keeps --target "
        "sensitivity in every source of that type with enough cancers (skinscan.loso.decision_rule, the rule "
        "`benchmarks/bench_decision_rules.py` compares on sources never seen). Rewrites the card (the ONNX file "
        "and <name>.card.json); the export's thresholds stay in photo_types.threshold_fit, through refits. Needs "
        "the datasets the model trained on and skinscan[train].",
    )
    p.add_argument("--model", required=True, help="ONNX model with photo types (export --photo-types); rewritten")
    p.add_argument(
        "--builds",
        nargs="+",
        default=[],
        metavar="ONNX",
        help="other builds of the same model (its int8 build) that receive the same thresholds; rewritten",
    )
    p.add_argument(
        "--target",
        type=float,
        default=0.98,
        help="sensitivity to keep in every source of a type on the validation photos (default 0.98: the target "
        "that kept 0.95 on every source held out, docs/sources.md)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit_thresholds)

    p = sub.add_parser(
        "batch",
        help="score many images on Ray: a folder, glob, table or object store, into Parquet",
        description="Score every image of INPUT with the same model, preprocessing and quality gate as "
        "`predict`, on Ray Data (in-process on this machine's cores, or on a cluster with --address / "
        "RAY_ADDRESS). Writes one row per image (path, probability, decision, threshold, quality, reasons, "
        "error, answers' adjustments, model) into a folder of Parquet parts; an unreadable image, or a bad "
        "answer in an input table, gives a row with its error. Rerun with the same --output to finish an interrupted run: paths already there are "
        "skipped. Needs the scale extra: pip install 'skinscan[scale]'.",
        epilog=EXIT_HELP,
    )
    p.add_argument(
        "input",
        help="a folder (recursive), a quoted glob ('photos/**/*.jpg'), a .csv/.parquet table with a 'path' "
        "column (relative to the table; answer columns such as age, bleed are used), or a URI (s3://, gs://...)",
    )
    p.add_argument("--output", "-o", required=True, help="output folder, e.g. scores.parquet")
    p.add_argument(
        "--model",
        help=_model_help(),
    )
    p.add_argument("--address", help="Ray cluster to run on, e.g. 10.0.0.5:6379 (default: RAY_ADDRESS, else local)")
    p.add_argument("--force", action="store_true", help="predict photos the quality gate refuses, too")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference batch (default 32)")
    p.add_argument("--actors", type=int, help="model replicas (default: one per CPU of the cluster)")
    p.add_argument(
        "--threads-per-actor", type=int, default=1, help="CPUs (ONNX Runtime threads) per replica (default 1)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser(
        "serve",
        help="run the HTTP prediction service",
        description="Serve predictions over HTTP (docs at /docs). Every flag can also be set as an environment "
        "variable SKINSCAN_<FLAG>, e.g. SKINSCAN_API_KEY; flags win.",
    )
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes, each with its own model (default 1); for the most throughput on a multi-core "
        "machine use one per core with --threads 1",
    )
    p.add_argument(
        "--model",
        help=_model_help(),
    )
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per worker (default: all cores)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body in bytes (default 32 MiB)")
    p.add_argument("--max-pixels", type=int, help="largest image, width x height (default 250,000,000)")
    p.add_argument("--max-batch-items", type=int, help="most images per batch request (default 32)")
    p.add_argument("--batch-window-ms", type=float, help="dynamic batching wait in ms (default 2)")
    p.add_argument("--max-batch-size", type=int, help="most images per inference run (default 8)")
    p.add_argument("--api-key", help="require this key (prefer SKINSCAN_API_KEY: flags show in `ps`)")
    p.add_argument(
        "--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN", help="allow a CORS origin (repeat)"
    )
    p.add_argument("--request-timeout-s", type=float, help="limit for one request in seconds (default 30)")
    p.add_argument(
        "--browser-model",
        help=f"model the web page runs on the device in private mode (default {BROWSER_MODEL}; "
        "'none': no private mode)",
    )
    g = p.add_argument_group(
        "scaling out on Ray Serve (needs pip install 'skinscan[scale]')",
        "The same app as N Ray Serve replicas behind Ray's HTTP proxy; each replica reserves --threads CPUs "
        "(default: the cores shared among the replicas).",
    )
    g.add_argument("--replicas", type=int, help="run N replicas on Ray Serve instead of one uvicorn process")
    g.add_argument("--max-replicas", type=int, help="autoscale between --replicas and this many on load")
    g.add_argument("--address", help="Ray cluster for the replicas (default: RAY_ADDRESS, else Ray on this machine)")
    p.set_defaults(func=cmd_serve)
    _add_site_parser(sub)
    _add_pack_parser(sub)
    return parser


def _reexec_with_malloc_tuning() -> None:
    """glibc reads its malloc thresholds at start-up only; training is ~2x faster with them raised."""
    if sys.platform.startswith("linux") and not all(k in os.environ for k in _MALLOC_ENV):
        env = {**os.environ, **_MALLOC_ENV}
        os.execve(sys.executable, [sys.executable, "-m", "skinscan", *sys.argv[1:]], env)


def cmd_pack(args: argparse.Namespace) -> int:
    from .pack import pack_datasets
    from .preprocess import PreprocessSpec

    info = pack_datasets(
        _data_root(args),
        args.datasets,
        Path(args.out),
        spec=PreprocessSpec(size=args.image_size),
        quality=args.quality,
        max_mb=args.max_mb,
        threads=args.threads,
    )
    print(
        f"packed {info['images']} images of {', '.join(info['datasets'])} into {args.out}: "
        f"{info['bytes'] / 1e6:.1f} MB ({info['size']} px squares, WebP quality {info['quality']})"
        + (f"; {len(info['unreadable'])} unreadable, left out" if info["unreadable"] else "")
    )
    return 0


def _add_pack_parser(sub) -> None:
    p = sub.add_parser(
        "pack",
        help="a small copy of the datasets for a lent GPU (WebP squares, labels as they are)",
        description="Write a copy of the datasets for a machine that cannot read ../shared (a lent GPU receives "
        "only the repository, 64 MiB in all): every image replaced, under its own name, by the square training "
        "reads of it (the model's input size) as WebP; labels and manifests copied. Train or run loso there "
        "with --data-root OUT. Example: skinscan pack .pack/datasets --max-mb 36",
    )
    p.add_argument("out", help="folder to write (must be new or empty; keep it git-ignored)")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["isic-mvb", "pad-ufes-20-phone", "isic-archive-more", "clinical-atlas"],
        help="dataset folders under the data root (default: all four)",
    )
    p.add_argument("--data-root", help=f"folder holding the datasets (default ${DATA_ROOT_ENV} or {DEFAULT_DATA_ROOT})")
    p.add_argument("--image-size", type=int, default=224, help="side of the squares (the model's input; default 224)")
    p.add_argument(
        "--quality", type=int, default=50, help="WebP quality 1-100 (default 50: all four datasets in 34 MB)"
    )
    p.add_argument("--max-mb", type=float, help="fail if the pack is larger (e.g. what is left of the 64 MiB)")
    p.add_argument("--threads", type=int, default=2, help="images encoded at once (default 2)")
    p.set_defaults(func=cmd_pack)


def cmd_site(args: argparse.Namespace) -> int:
    from .private import write_site

    written = write_site(Path(args.out), args.model)
    size = sum(p.stat().st_size for p in written)
    print(f"wrote the page as a static site: {len(written)} files, {size / 1e6:.1f} MB in {args.out}")
    return 0


def _add_site_parser(sub) -> None:
    p = sub.add_parser(
        "site",
        help="write the web page as a static site (private mode only, no server)",
        description="Write the web page, ONNX Runtime Web and the browser model into OUT: serve the folder with "
        "any static file server (HTTPS, or localhost); every check runs on the device. See docs/private-mode.md.",
    )
    p.add_argument("out", help="folder to write (created)")
    p.add_argument("--model", help=f"the model the page runs (default {BROWSER_MODEL})")
    p.set_defaults(func=cmd_site)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command == "train" and argv is None:
        _reexec_with_malloc_tuning()
    try:
        return args.func(args)
    except SkinscanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
