"""`skinscan batch`: score many images on Ray Data with the same Predictor as `skinscan predict`.

Inputs (`list_inputs`): a folder (searched recursively), a glob, a CSV or Parquet table with a `path` column
(and optionally the answers' columns: age, sex, bleed...), or an object-store URI (s3://, gs://, abfs://,
hdfs://, file://) read through pyarrow filesystems. Ray runs in-process on this machine's cores unless an
address is given (`--address`, or `RAY_ADDRESS`), then on that cluster; every node needs skinscan installed
and must see the inputs (a shared folder or an object store).

The images go through `ray.data` `map_batches` on a pool of actors; each actor loads the model once
(`_Scorer`: a `Predictor`, its preprocessing, quality gate and ONNX session) and scores a batch of images,
never failing on one: an unreadable image becomes a row with its `error`. The driver writes every finished
block as its own Parquet file into the output folder (`OUT.parquet/part-*.parquet`, written to a temporary
name and renamed), so a run stopped at any point keeps what it finished, and a rerun with the same output
skips the paths already there. Pandas, Polars, DuckDB and pyarrow read the folder as one table.

Ray is an extra (`pip install 'skinscan[scale]'`); nothing here imports it before a run starts.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import IMAGE_SUFFIXES
from .errors import InvalidAnswers, SkinscanError
from .ray_cluster import connect

if TYPE_CHECKING:
    import pyarrow as pa

    from .answers import Answers
    from .predict import Prediction

log = logging.getLogger("skinscan")

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
_GLOB_CHARS = set("*?[")
_PART_PREFIX = "part-"


def _schema() -> pa.Schema:
    """The output table; the same for every part file, so that they read as one table."""
    import pyarrow as pa

    adjustment = pa.struct(
        [
            ("answer", pa.string()),
            ("value", pa.string()),
            ("log_odds", pa.float64()),
            ("odds_ratio", pa.float64()),
            ("label", pa.string()),
        ]
    )
    return pa.schema(
        [
            ("path", pa.string()),
            ("probability", pa.float64()),
            ("decision", pa.string()),
            ("threshold", pa.float64()),
            ("photo_type", pa.string()),
            ("quality", pa.string()),
            ("reasons", pa.list_(pa.string())),
            ("error", pa.string()),
            ("image_probability", pa.float64()),
            ("adjustments", pa.list_(adjustment)),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("model_sha256", pa.string()),
        ]
    )


@dataclass(frozen=True)
class BatchInputs:
    """What to score: paths (local paths or URIs, each once) and, where a table gave them, answers (or,
    for a table row with a bad answer, that row's error message: the row is written with it, unscored)."""

    paths: list[str]
    answers: list[Answers | str | None] | None = None


@dataclass(frozen=True)
class BatchSummary:
    """How a `run_batch` went. `skipped`: paths already in the output from an earlier run."""

    output: Path
    inputs: int
    skipped: int
    scored: int
    errors: int
    retakes: int
    refer: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- inputs
def _is_uri(text: str) -> bool:
    return "://" in text


def _filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path inside it, for any URI pyarrow knows (s3://, gs://, file://...)."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ValueError by scheme
        raise SkinscanError(f"{uri}: cannot open this location through pyarrow filesystems: {exc}") from None


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_inputs(spec: str | Path) -> BatchInputs:
    """The images `spec` names: a folder, a glob, an image file, a CSV/Parquet table with a `path` column
    (relative paths are relative to the table's folder; answer columns are read), or a URI of any of these
    in an object store. Paths repeated in a table are scored once (a repeat with other answers is an error)."""
    spec = str(spec)
    if spec.lower().endswith(TABLE_SUFFIXES):
        return _read_table(spec)
    if _is_uri(spec):
        import pyarrow.fs as pafs

        fs, root = _filesystem(spec)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return BatchInputs([spec])
        if info.type != pafs.FileType.Directory:
            raise SkinscanError(f"{spec}: no such file or folder in the object store")
        scheme = spec.split("://", 1)[0]
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(f.path for f in found if f.type == pafs.FileType.File and _is_image(f.path))
        return BatchInputs([f"{scheme}://{f}" for f in files])
    path = Path(spec)
    if path.is_dir():
        from .predict import collect_images

        return BatchInputs(collect_images([path]).paths)
    if path.is_file():
        return BatchInputs([spec])
    if _GLOB_CHARS & set(spec):
        return BatchInputs(sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)))
    raise SkinscanError(f"{spec}: no such file, folder or table (give a folder, a glob, a .csv/.parquet or a URI)")


def _read_table(spec: str) -> BatchInputs:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from .answers import ANSWER_FIELDS, Answers

    try:
        if _is_uri(spec):
            fs, inner = _filesystem(spec)
            with fs.open_input_file(inner) as fh:
                table = pacsv.read_csv(fh) if spec.lower().endswith(".csv") else pq.read_table(fh)
            base = spec.rsplit("/", 1)[0]
        else:
            if not Path(spec).is_file():
                raise SkinscanError(f"{spec}: no such table")
            table = pacsv.read_csv(spec) if spec.lower().endswith(".csv") else pq.read_table(spec)
            base = str(Path(spec).parent)
    except SkinscanError:
        raise
    except Exception as exc:  # pyarrow's parse errors
        raise SkinscanError(f"{spec}: cannot read this table: {exc}") from None
    if "path" not in table.column_names:
        raise SkinscanError(f"{spec}: the table needs a 'path' column (found: {', '.join(table.column_names)})")
    answer_cols = [c for c in table.column_names if c in ANSWER_FIELDS]
    rows = table.select(["path", *answer_cols]).to_pylist()
    paths: list[str] = []
    answers: list[Answers | str | None] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2 if spec.lower().endswith(".csv") else 1):
        raw = row.pop("path")
        if raw is None or not str(raw).strip():
            raise SkinscanError(f"{spec}:{line}: the path cell is empty")
        raw = str(raw).strip()
        path = raw if _is_uri(raw) or os.path.isabs(raw) else f"{base}/{raw}"
        values = {k: ("" if v is None else str(v)) for k, v in row.items()}
        given: Answers | str | None = None
        if answer_cols:
            try:
                given = Answers.from_mapping(values, f"{spec}:{line}")
            except InvalidAnswers as exc:  # that image's error row; the others are scored
                given = str(exc)
        if path in seen:
            if answers[seen[path]] != given:
                raise InvalidAnswers(f"{spec}:{line}: {raw} is listed twice with different answers")
            continue
        seen[path] = len(paths)
        paths.append(path)
        answers.append(given)
    if answer_cols:
        log.info("answers read from the columns %s", ", ".join(answer_cols))
    return BatchInputs(paths, answers if answer_cols else None)


def read_image_bytes(path: str) -> bytes:
    """The file's bytes, from a local path or through the pyarrow filesystem of a URI."""
    if _is_uri(path):
        fs, inner = _filesystem(path)
        with fs.open_input_stream(inner) as fh:
            return fh.read()
    return Path(path).read_bytes()


# ---------------------------------------------------------------- the output folder
def scored_paths(output: Path) -> set[str]:
    """Paths already in the output folder; left-over temporary files of a stopped run are removed."""
    import pyarrow.parquet as pq

    if output.exists() and not output.is_dir():
        raise SkinscanError(
            f"{output} exists and is not a folder: the output of `skinscan batch` is a folder of Parquet parts "
            "(pick a new name; pandas.read_parquet reads the folder)"
        )
    if not output.is_dir():
        return set()
    for tmp in output.glob(f".{_PART_PREFIX}*.tmp"):
        tmp.unlink()
    done: set[str] = set()
    for part in sorted(output.glob(f"{_PART_PREFIX}*.parquet")):
        try:
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        except Exception as exc:  # not written by skinscan batch: refuse to mix
            raise SkinscanError(f"{part}: not a readable part of a skinscan batch output ({exc})") from None
    return done


def _write_part(output: Path, table: pa.Table, run_id: str, index: int) -> None:
    import pyarrow.parquet as pq

    final = output / f"{_PART_PREFIX}{run_id}-{index:06d}.parquet"
    tmp = output / f".{final.name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)  # a part is there whole or not at all


# ---------------------------------------------------------------- scoring (runs inside Ray actors)
def _rows(predictions: Sequence[Prediction], info: dict[str, str]) -> dict[str, list]:
    cols: dict[str, list] = {name: [] for name in _schema().names}
    for p in predictions:
        cols["path"].append(p.path)
        cols["probability"].append(p.probability)
        cols["decision"].append(p.decision)
        cols["threshold"].append(p.threshold)
        cols["photo_type"].append(p.photo_type)
        cols["quality"].append(p.quality)
        cols["reasons"].append(list(p.reasons))
        cols["error"].append(p.error)
        cols["image_probability"].append(p.image_probability)
        cols["adjustments"].append([{**a.to_dict(), "value": str(a.value)} for a in p.adjustments])
        cols["model_name"].append(info["name"])
        cols["model_version"].append(info["version"])
        cols["model_sha256"].append(info["sha256"])
    return cols


class _Scorer:
    """A Ray Data actor: one Predictor (loaded once) scoring batches of paths into output rows."""

    def __init__(self, model: str | None, force: bool, threads: int) -> None:
        from .predict import Predictor

        self.predictor = Predictor(model, threads=threads)
        self.info = self.predictor.info()
        self.force = force

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        from .answers import Answers
        from .predict import Prediction

        paths = batch.column("path").to_pylist()
        raw_answers = batch.column("answers").to_pylist() if "answers" in batch.column_names else [None] * len(paths)
        bad = (
            batch.column("answers_error").to_pylist() if "answers_error" in batch.column_names else [None] * len(paths)
        )
        results: list[Prediction | None] = [None] * len(paths)
        sources, names, answers, where = [], [], [], []
        for i, (path, raw) in enumerate(zip(paths, raw_answers, strict=True)):
            if bad[i]:  # a bad answer in the input table: this row's error
                results[i] = Prediction(path, None, None, None, error=bad[i])
                continue
            try:
                sources.append(read_image_bytes(path))
            except Exception as exc:  # missing, unreadable, a folder...: this row's error, not the job's
                results[i] = Prediction(path, None, None, None, error=f"cannot read: {exc}")
                continue
            names.append(path)
            answers.append(None if raw is None else Answers.model_validate_json(raw))
            where.append(i)
        if sources:
            # a bad image is its own row's error (Predictor.decode never raises for one)
            preds = self.predictor.predict(
                sources, names=names, batch_size=len(sources), force=self.force, answers=answers
            )
            for i, pred in zip(where, preds, strict=True):
                results[i] = pred
        return pa.Table.from_pydict(_rows(results, self.info), schema=_schema())  # type: ignore[arg-type]


# ---------------------------------------------------------------- the job
def run_batch(
    inputs: str | Path | BatchInputs,
    output: str | Path,
    *,
    model: str | Path | None = None,
    address: str | None = None,
    force: bool = False,
    batch_size: int = 32,
    actors: int | None = None,
    threads_per_actor: int = 1,
    progress: bool = True,
) -> BatchSummary:
    """Score every image of `inputs` (see `list_inputs`) into the Parquet folder `output`, skipping paths
    already there. `address`: a Ray cluster (default: RAY_ADDRESS, else Ray starts on this machine).
    `actors`: model replicas (default: one per CPU of the cluster). Interrupted (Ctrl-C), it keeps every
    finished part and says so: the same call again scores the rest."""
    started = time.perf_counter()
    output = Path(output)
    items = inputs if isinstance(inputs, BatchInputs) else list_inputs(inputs)
    if not items.paths:
        raise SkinscanError(f"no images found in {inputs}")
    done = scored_paths(output)
    todo = [i for i, p in enumerate(items.paths) if p not in done]
    skipped = len(items.paths) - len(todo)
    if skipped:
        log.info("%d of %d images already in %s: skipped", skipped, len(items.paths), output)
    if not todo:
        return BatchSummary(output, len(items.paths), skipped, 0, 0, 0, 0, time.perf_counter() - started)

    from .answers import Answers
    from .predict import Predictor

    predictor = Predictor(model)  # fails here, before Ray starts, on a bad model; also checks the answers
    if items.answers and any(isinstance(a, Answers) and not a.empty for a in items.answers):
        predictor.answers_adjustments()
    del predictor
    # A bundled name (or None: the default) is resolved by each node in its own install; a file, absolute.
    model_arg = str(Path(model).resolve()) if model is not None and Path(str(model)).is_file() else model

    ray = connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_actors = actors or max(1, cpus // threads_per_actor)
    rows = [{"path": items.paths[i]} for i in todo]
    if items.answers:
        for row, i in zip(rows, todo, strict=True):
            a = items.answers[i]
            row["answers"] = a.model_dump_json() if isinstance(a, Answers) else None
            row["answers_error"] = a if isinstance(a, str) else None
    # Blocks of a few batches: enough of them to keep every actor busy, small enough to lose little work
    # when an actor dies (Ray retries the block's task on a restarted actor).
    n_blocks = max(n_actors, math.ceil(len(rows) / (batch_size * 4)))
    ds = ray.data.from_items(rows, override_num_blocks=min(n_blocks, len(rows))).map_batches(
        _Scorer,
        fn_constructor_kwargs={"model": model_arg, "force": force, "threads": threads_per_actor},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=threads_per_actor,
    )  # Ray Data's actor pools restart a dead actor and retry its tasks (max_restarts = max_task_retries = -1)
    output.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    scored = errors = retakes = refer = 0
    try:
        for index, table in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            table = table.select(_schema().names).cast(_schema())
            _write_part(output, table, run_id, index)
            scored += table.num_rows
            errors += table.num_rows - table.column("error").null_count
            retakes += table.column("quality").to_pylist().count("retake")
            refer += table.column("decision").to_pylist().count("refer")
    except KeyboardInterrupt:
        raise SkinscanError(
            f"interrupted: the {scored} image(s) scored in this run are saved in {output}; "
            "run the same command again to score the rest"
        ) from None
    return BatchSummary(
        output, len(items.paths), skipped, scored, errors, retakes, refer, time.perf_counter() - started
    )


def read_output(output: str | Path) -> pa.Table:
    """The whole output folder as one table (all runs' parts)."""
    import pyarrow.parquet as pq

    output = Path(output)
    parts = sorted(output.glob(f"{_PART_PREFIX}*.parquet"))
    if not parts:
        raise SkinscanError(f"{output}: no batch output here")
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(p) for p in parts])
