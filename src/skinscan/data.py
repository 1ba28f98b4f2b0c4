"""Dataset readers -> `Record`s, and the grouped splits that keep patients and near-duplicates together.

Three layouts are read:
- class folders: `ROOT/[SPLIT/]{benign,malignant}/*` (with `manifest.csv` at ROOT when present, as in isic-mvb);
- a labels CSV: columns `file,malignant`, optional `patient_id`, `lesion_id` (paths relative to the CSV);
- an ISIC Archive download (`isic image download`): `metadata.csv` with `isic_id` and `benign_malignant`
  (older exports) or `diagnosis_1` = Benign / Malignant / Indeterminate (newer ones).
Images are keyed by their path relative to the dataset root, never by bare file name.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
CLASS_DIRS = {"benign": 0, "malignant": 1}


# what the phone set records about each photo (its columns), as the model card and the evaluation name it
META_FIELDS = {"skin_type_fitzpatrick": "fitspatrick", "body_site": "region", "diagnosis": "diagnostic"}


def meta_level(value: object) -> str:
    """A recorded value as a label: "2.0" -> "2"; blank -> "not recorded"."""
    text = str(value or "").strip()
    if not text:
        return "not recorded"
    try:
        number = float(text)
    except ValueError:
        return text.lower()
    return str(int(number)) if number.is_integer() else text.lower()


@dataclass(frozen=True)
class Record:
    """One labelled image. `key` is unique within its dataset; `group` keeps related images together."""

    path: Path
    label: int
    source: str
    key: str
    split: str | None = None
    patient: str | None = None
    lesion: str | None = None  # "patient/lesion": lesion ids alone repeat across patients
    group: str = ""
    md5: str | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def _bool_label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in ("1", "true", "malignant", "yes"):
        return 1
    if v in ("0", "false", "benign", "no"):
        return 0
    raise DatasetError(f"{where}: label {value!r} is not 0/1 (malignant column)")


def read_class_folders(root: Path, split: str | None = None) -> list[Record]:
    """`ROOT/SPLIT/{benign,malignant}/*` or `ROOT/{benign,malignant}/*`, plus `manifest.csv` if present."""
    root = Path(root)
    manifest = _read_manifest(root / "manifest.csv")
    splits = [split] if split else sorted(p.name for p in root.iterdir() if p.is_dir() and _has_classes(p))
    if not splits and _has_classes(root):
        splits = [""]
    if not splits:
        raise DatasetError(f"{root}: expected benign/ and malignant/ folders, optionally inside split folders")
    records: list[Record] = []
    for sp in splits:
        base = root / sp if sp else root
        if not _has_classes(base):
            raise DatasetError(f"{base}: no benign/ or malignant/ folder (splits here: {', '.join(splits)})")
        for cls, label in CLASS_DIRS.items():
            for path in sorted((base / cls).rglob("*"), key=lambda p: str(p)):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                key = path.relative_to(root).as_posix()
                row = manifest.get(key, {})
                dup = row.get("dup_group", "")
                records.append(
                    Record(
                        path=path,
                        label=label,
                        source=root.name,
                        key=key,
                        split=sp or None,
                        group=f"dup:{dup}" if dup else key,
                        md5=row.get("md5") or None,
                    )
                )
    return records


def _has_classes(p: Path) -> bool:
    return any((p / c).is_dir() for c in CLASS_DIRS)


def _read_manifest(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def read_labels_csv(csv_path: Path) -> list[Record]:
    """Columns `file,malignant` (+ optional `patient_id`, `lesion_id`; other columns kept in `meta`)."""
    csv_path = Path(csv_path)
    root = csv_path.parent
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"file", "malignant"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        records = []
        for i, row in enumerate(reader, start=2):
            patient = (row.get("patient_id") or "").strip() or None
            lesion_id = (row.get("lesion_id") or "").strip() or None
            lesion = f"{patient or '?'}/{lesion_id}" if lesion_id else None
            key = row["file"].strip()
            meta = {k: v for k, v in row.items() if k not in ("file", "malignant", "patient_id", "lesion_id")}
            records.append(
                Record(
                    path=root / key,
                    label=_bool_label(row["malignant"], f"{csv_path}:{i}"),
                    source=root.name,
                    key=key,
                    patient=patient,
                    lesion=lesion,
                    group=f"patient:{patient}" if patient else (f"lesion:{lesion}" if lesion else key),
                    meta=meta,
                )
            )
    return records


def read_isic_download(folder: Path) -> list[Record]:
    """A folder written by `isic image download`: `metadata.csv` + `<isic_id>.jpg`."""
    folder = Path(folder)
    meta_path = folder / "metadata.csv"
    with meta_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if "isic_id" not in cols:
            raise DatasetError(f"{meta_path}: no isic_id column; is this an `isic image download` folder?")
        if "benign_malignant" not in cols and "diagnosis_1" not in cols:
            raise DatasetError(f"{meta_path}: needs a benign_malignant or diagnosis_1 column for labels")
        records, skipped = [], 0
        for row in reader:
            label = _isic_label(row)
            image = next(
                (
                    folder / f"{row['isic_id']}{s}"
                    for s in (".jpg", ".jpeg", ".png")
                    if (folder / f"{row['isic_id']}{s}").is_file()
                ),
                None,
            )
            if label is None or image is None:
                skipped += 1
                continue
            patient = (row.get("patient_id") or "").strip() or None
            lesion_id = (row.get("lesion_id") or "").strip() or None
            records.append(
                Record(
                    path=image,
                    label=label,
                    source=folder.name,
                    key=image.name,
                    patient=patient,
                    lesion=f"{patient or '?'}/{lesion_id}" if lesion_id else None,
                    group=f"patient:{patient}" if patient else (f"lesion:{lesion_id}" if lesion_id else image.name),
                    meta={k: v for k, v in row.items() if k != "isic_id"},
                )
            )
    if skipped:
        log.warning("%s: skipped %d image(s) that are indeterminate, unlabelled or missing", folder, skipped)
    return records


def _isic_label(row: dict[str, str]) -> int | None:
    bm = (row.get("benign_malignant") or "").strip().lower()
    if bm in ("benign", "malignant"):
        return CLASS_DIRS[bm]
    d1 = (row.get("diagnosis_1") or "").strip().lower()
    if d1 in ("benign", "malignant"):
        return CLASS_DIRS[d1]
    return None  # indeterminate, "indeterminate/benign", or unlabelled


def load_dataset(path: str | Path, split: str | None = None) -> list[Record]:
    """Read any supported layout; `split` picks a split folder of a class-folder dataset."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".csv":
        return read_labels_csv(p)
    if not p.is_dir():
        raise DatasetError(f"dataset {p} does not exist (give a folder or a labels CSV)")
    if (p / "metadata.csv").is_file():
        return read_isic_download(p)
    if (p / "labels.csv").is_file() and not _has_classes(p):
        records = read_labels_csv(p / "labels.csv")
    else:
        records = read_class_folders(p, split)
        split = None
    if split is not None:
        raise DatasetError(f"{p} has no split folders; drop --split")
    if not records:
        raise DatasetError(f"{p}: no images found")
    return records


def resolve_dataset(name_or_path: str, data_root: Path) -> Path:
    """`isic-mvb` -> `<data_root>/isic-mvb`; an existing path is returned unchanged."""
    p = Path(name_or_path)
    if p.exists():
        return p
    candidate = Path(data_root) / name_or_path
    if candidate.exists():
        return candidate
    raise DatasetError(
        f"dataset {name_or_path!r} not found as a path nor under {data_root} "
        "(set SKINSCAN_DATA or --data-root to the folder that holds the datasets)"
    )


def file_md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def drop_exact_duplicates(records: Iterable[Record]) -> tuple[list[Record], int]:
    """Keep the first of each set of byte-identical images (md5 from the manifest or computed)."""
    seen: set[str] = set()
    kept, dropped = [], 0
    for r in records:
        digest = r.md5 or file_md5(r.path)
        if digest in seen:
            dropped += 1
            continue
        seen.add(digest)
        kept.append(r)
    return kept, dropped


def without_leaks(test: Sequence[Record], train: Sequence[Record]) -> list[Record]:
    """Test records whose near-duplicate group also holds a training image are removed."""
    train_groups = {r.group for r in train}
    return [r for r in test if r.group not in train_groups]


def _strata(records: Sequence[Record]) -> np.ndarray:
    # stratify by source and label together, so each source keeps its class balance on both sides
    return np.array([f"{r.source}:{r.label}" for r in records])


def grouped_split(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Stratified train/validation split that keeps each group (patient, near-duplicates) on one side."""
    n_splits = max(2, round(1 / val_fraction))
    return next(grouped_kfold(records, n_splits, seed))


def grouped_kfold(records: Sequence[Record], k: int, seed: int) -> Iterator[tuple[list[Record], list[Record]]]:
    """K (train, validation) pairs; each group lies in exactly one validation fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    strata = _strata(records)
    _, counts = np.unique(strata, return_counts=True)
    if len(records) == 0 or counts.min() < k:
        raise DatasetError(f"too few images of one class or source to make {k} grouped folds")
    groups = np.array([f"{r.source}/{r.group}" for r in records])  # groups never merge across datasets
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for train_idx, val_idx in splitter.split(np.zeros(len(records)), strata, groups):
        yield [records[i] for i in train_idx], [records[i] for i in val_idx]


def read_patient_list(path: str | Path) -> set[str]:
    """Patient ids, one per line; `#` starts a comment."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"patient list {p} does not exist")
    lines = (line.split("#", 1)[0].strip() for line in p.read_text(encoding="utf-8").splitlines())
    return {line for line in lines if line}
