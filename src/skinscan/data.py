"""Dataset readers -> `Record`s, and the grouped splits that keep patients and near-duplicates together.

Three layouts are read:
- class folders: `ROOT/[SPLIT/]{benign,malignant}/*` (with `manifest.csv` at ROOT when present, as in isic-mvb);
- a labels CSV: columns `file,malignant`, optional `patient_id`, `lesion_id`, `dup_group`, `source` or
  `collection` (the record's source, e.g. the atlas), `diagnosis_group` or `diagnostic` (the diagnosis class),
  `fitzpatrick` or `fitspatrick` (skin type); paths relative to the CSV;
- an ISIC Archive download (`isic image download`): `metadata.csv` with `isic_id` and `benign_malignant`
  (older exports) or `diagnosis_1` = Benign / Malignant / Indeterminate (newer ones).
Images are keyed by their path relative to the dataset root, never by bare file name.

Every record carries its `source`: the unit that leave-one-source-out holds out as a whole (a dataset, or
a collection or atlas inside one), and its `dataset` (the folder it was read from, which keys it).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
CLASS_DIRS = {"benign": 0, "malignant": 1}


# The diagnosis classes of the diagnosis head (the datasets' `diagnosis_group`); order = the head's outputs.
DIAGNOSES = (
    "melanoma",
    "bcc",
    "scc",
    "actinic_keratosis",
    "nevus",
    "benign_keratosis",
    "dermatofibroma",
    "vascular",
    "other_malignant",
    "other_benign",
)
# how people read each class (the page and the CLI show these)
DIAGNOSIS_LABELS = {
    "melanoma": "melanoma (a skin cancer)",
    "bcc": "basal cell carcinoma (a skin cancer)",
    "scc": "squamous cell carcinoma (a skin cancer)",
    "actinic_keratosis": "actinic keratosis (a sun-damage spot that doctors treat)",
    "nevus": "a mole (nevus)",
    "benign_keratosis": "a seborrheic or other benign keratosis",
    "dermatofibroma": "a dermatofibroma (a harmless skin nodule)",
    "vascular": "a blood-vessel spot (e.g. angioma)",
    "other_malignant": "another skin cancer",
    "other_benign": "another harmless growth",
}
MALIGNANT_DIAGNOSES = frozenset({"melanoma", "bcc", "scc", "other_malignant"})
# the phone set's diagnostic codes -> classes
_DIAGNOSIS_CODES = {
    "mel": "melanoma",
    "bcc": "bcc",
    "scc": "scc",
    "ack": "actinic_keratosis",
    "nev": "nevus",
    "sek": "benign_keratosis",
}
# Diagnoses a dataset implies by its class folder where it records none: every benign isic-mvb image is a
# HAM10000 nevus (its README); its malignant folder mixes diagnoses, so those stay unknown (masked).
_FOLDER_DIAGNOSES = {"isic-mvb": {0: "nevus"}}
# Source names as the labels CSVs write them -> short names for configs and reports
_SOURCE_NAMES = {"HAM10000": "ham10000", "ISIC archive (pre-2019, not HAM)": "isic-archive-pre2019"}


def diagnosis_class(value: str | None) -> str | None:
    """A recorded diagnosis as one of DIAGNOSES (`MEL` -> melanoma); None when blank or unknown."""
    text = (value or "").strip().lower()
    text = _DIAGNOSIS_CODES.get(text, text)
    return text if text in DIAGNOSES else None


def source_name(value: str) -> str:
    """`HAM10000` -> `ham10000`; names already short pass unchanged."""
    value = value.strip()
    return _SOURCE_NAMES.get(value, value)


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
    dataset: str = ""  # the folder read; "" = the same as source
    diagnosis: str | None = None  # one of DIAGNOSES; None = not recorded (the diagnosis loss is masked)
    skin_type: int | None = None  # Fitzpatrick 1-6 where recorded

    @property
    def uid(self) -> str:
        """`dataset/key`: unique across every dataset read together (run files and reports key by it)."""
        return f"{self.dataset or self.source}/{self.key}"


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
                        dataset=root.name,
                        diagnosis=_FOLDER_DIAGNOSES.get(root.name, {}).get(label),
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
    """Columns `file,malignant` (+ optional `patient_id`, `lesion_id`, `dup_group`, `source`/`collection`,
    `diagnosis_group`/`diagnostic`, `fitzpatrick`/`fitspatrick`; every other column is kept in `meta`).

    Groups keep together what must not be split: a patient where recorded; else the images linked by a
    lesion id or a near-duplicate group (connected: two lesions sharing a near-copy are one group)."""
    csv_path = Path(csv_path)
    root = csv_path.parent
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"file", "malignant"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        records = []
        links: list[tuple[str, ...]] = []
        for i, row in enumerate(reader, start=2):
            patient = (row.get("patient_id") or "").strip() or None
            lesion_id = (row.get("lesion_id") or "").strip() or None
            lesion = f"{patient or '?'}/{lesion_id}" if lesion_id else None
            key = row["file"].strip()
            source = source_name(row.get("source") or row.get("collection") or "") or root.name
            dup = (row.get("dup_group") or "").strip()
            links.append(
                (f"patient:{patient}",)
                if patient
                else tuple(x for x in (lesion and f"lesion:{lesion}", dup and f"dup:{dup}") if x)
            )
            meta = {k: v for k, v in row.items() if k not in ("file", "malignant", "patient_id", "lesion_id")}
            records.append(
                Record(
                    path=root / key,
                    label=_bool_label(row["malignant"], f"{csv_path}:{i}"),
                    source=source,
                    key=key,
                    patient=patient,
                    lesion=lesion,
                    group=key,
                    meta=meta,
                    dataset=root.name,
                    diagnosis=diagnosis_class(row.get("diagnosis_group") or row.get("diagnostic")),
                    skin_type=_skin_type(row.get("fitzpatrick") or row.get("fitspatrick")),
                )
            )
    return _linked_groups(records, links)


def _skin_type(value: str | None) -> int | None:
    try:
        number = float((value or "").strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() and 1 <= number <= 6 else None


def _linked_groups(records: list[Record], links: list[tuple[str, ...]]) -> list[Record]:
    """Each record's group = the smallest link of its connected component (records sharing any link)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for own in links:
        for other in own[1:]:
            a, b = find(own[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [replace(r, group=find(own[0])) if own else r for r, own in zip(records, links, strict=True)]


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


def sampling_weights(
    records: Sequence[Record],
    source_weights: dict[str, float] | None = None,
    source_balance: float = 1.0,
    diagnosis_balance: float = 1.0,
) -> np.ndarray:
    """Each record's share of an epoch's draws (the shares sum to 1).

    A source's share is `source_weights[source]` where given (every source must then be named), else
    proportional to its image count raised to `source_balance` (1 = the natural mix, 0 = every source
    alike). Inside a source, a diagnosis's share is proportional to its count raised to `diagnosis_balance`
    (records without a recorded diagnosis count as one class per label); images within a class alike.
    """
    from collections import Counter

    if not records:
        return np.zeros(0)
    sources = Counter(r.source for r in records)
    if source_weights:
        unnamed = sorted(set(sources) - set(source_weights))
        if unnamed:
            raise DatasetError(f"source_weights names no weight for source(s) {unnamed}; sources: {sorted(sources)}")
        share = {s: float(source_weights[s]) for s in sources}
    else:
        share = {s: float(n) ** source_balance for s, n in sources.items()}
    total = sum(share.values())
    if total <= 0:
        raise DatasetError("source_weights give every training source a weight of 0")
    classes = Counter((r.source, _class_of(r)) for r in records)
    within = {s: sum(n**diagnosis_balance for (src, _), n in classes.items() if src == s) for s in sources}
    w = np.array(
        [
            share[r.source]
            / total
            * classes[r.source, _class_of(r)] ** diagnosis_balance
            / within[r.source]
            / classes[r.source, _class_of(r)]
            for r in records
        ]
    )
    return w / w.sum()


def _class_of(r: Record) -> str:
    return r.diagnosis or f"?{r.label}"


def diagnosis_prior(records: Sequence[Record], weights: np.ndarray) -> np.ndarray:
    """The share of each of DIAGNOSES among the draws that carry a diagnosis (what the head learns as its
    prior, and what prediction divides out so that every class counts alike)."""
    prior = np.zeros(len(DIAGNOSES))
    for r, w in zip(records, weights, strict=True):
        if r.diagnosis:
            prior[DIAGNOSES.index(r.diagnosis)] += w
    return prior / prior.sum() if prior.sum() else prior


def prior_shift(prior: Sequence[float]) -> np.ndarray:
    """What the diagnosis head's raw logits gain so that every class counts alike: -log(prior), and -1e4 for
    classes the training data lacked (their weights never learned anything). float32, as the graph holds it."""
    p = np.asarray(prior, dtype=np.float64)
    return np.where(p > 0, -np.log(np.where(p > 0, p, 1.0)), -1e4).astype(np.float32)
