"""The three dataset readers, duplicate and leak handling, and the grouped splits (synthetic and real data)."""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import find_data_root, quadrants
from skinscan.data import (
    Record,
    drop_exact_duplicates,
    grouped_split,
    load_dataset,
    read_class_folders,
    read_isic_download,
    read_labels_csv,
    resolve_dataset,
    without_leaks,
)
from skinscan.errors import DatasetError


def write_csv(path: Path, rows: list[dict[str, str]], fieldnames: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _tiny(seed: int) -> Image.Image:
    """A distinct tiny image per seed, so md5s differ unless a test wants a duplicate."""
    return Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))


# ---------------------------------------------------------------- class folders
CLASS_TREE = {
    "train/benign/1.jpg": 1,
    "train/benign/2.png": 2,
    "train/benign/3.JPG": 3,  # suffixes are matched case-insensitively
    "train/benign/sub/4.jpg": 4,  # nested folders are read too
    "train/malignant/1.jpg": 5,  # same bare name as train/benign/1.jpg
    "train/malignant/2.webp": 6,
    "test/benign/3.jpg": 7,
    "test/malignant/3.jpg": 8,
}


@pytest.fixture
def class_tree(tmp_path: Path, write_image) -> Path:
    for name, seed in CLASS_TREE.items():
        write_image(f"ds/{name}", _tiny(seed), "WEBP" if name.endswith(".webp") else None)
    (tmp_path / "ds/train/benign/notes.txt").write_text("not an image")
    (tmp_path / "ds/train/malignant/.DS_Store").write_bytes(b"\0\0")
    (tmp_path / "ds/README.md").write_text("a dataset")
    return tmp_path / "ds"


def test_class_folders_read_every_split(class_tree: Path) -> None:
    records = read_class_folders(class_tree)

    assert sorted(r.key for r in records) == sorted(CLASS_TREE)
    assert len({r.key for r in records}) == len(records), "keys are unique although bare names repeat"
    for r in records:
        assert r.label == (1 if "/malignant/" in r.key else 0)
        assert r.split == r.key.split("/")[0]
        assert r.path == class_tree / r.key and r.path.is_file()
        assert r.source == "ds"
        assert r.group == r.key, "without a manifest each image is its own group"
        assert r.md5 is None


def test_class_folders_read_one_split(class_tree: Path) -> None:
    train = read_class_folders(class_tree, "train")
    test = read_class_folders(class_tree, "test")

    assert Counter(r.label for r in train) == {0: 4, 1: 2}
    assert {r.key for r in test} == {"test/benign/3.jpg", "test/malignant/3.jpg"}
    assert {r.split for r in train} == {"train"}
    assert load_dataset(class_tree, split="test") == test


def test_class_folders_without_split_folders(tmp_path: Path, write_image) -> None:
    write_image("flat/benign/a.jpg", _tiny(1))
    write_image("flat/malignant/b.jpg", _tiny(2))

    records = load_dataset(tmp_path / "flat")

    assert {(r.key, r.label, r.split) for r in records} == {("benign/a.jpg", 0, None), ("malignant/b.jpg", 1, None)}


def test_class_folder_errors(tmp_path: Path, class_tree: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="benign"):
        read_class_folders(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="no benign/ or malignant/"):
        read_class_folders(class_tree, "validation")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_manifest_supplies_md5_and_near_duplicate_groups(class_tree: Path) -> None:
    write_csv(
        class_tree / "manifest.csv",
        [
            {"path": "train/benign/1.jpg", "md5": "m1", "dup_group": "0"},
            {"path": "test/benign/3.jpg", "md5": "m2", "dup_group": "0"},
            {"path": "train/malignant/1.jpg", "md5": "m3", "dup_group": ""},
        ],
    )
    records = {r.key: r for r in read_class_folders(class_tree)}

    assert records["train/benign/1.jpg"].group == records["test/benign/3.jpg"].group == "dup:0"
    assert records["train/malignant/1.jpg"].group == "train/malignant/1.jpg"
    assert records["train/benign/1.jpg"].md5 == "m1"
    assert records["train/benign/2.png"].md5 is None

    train = [r for r in records.values() if r.split == "train"]
    test = [r for r in records.values() if r.split == "test"]
    assert [r.key for r in without_leaks(test, train)] == ["test/malignant/3.jpg"]


def test_exact_duplicates_are_dropped_by_content(tmp_path: Path, write_image) -> None:
    first = write_image("dups/benign/a.png", _tiny(1))
    (tmp_path / "dups/benign/b.png").write_bytes(first.read_bytes())
    (tmp_path / "dups/malignant").mkdir()
    (tmp_path / "dups/malignant/c.png").write_bytes(first.read_bytes())
    write_image("dups/malignant/d.png", _tiny(2))

    kept, dropped = drop_exact_duplicates(read_class_folders(tmp_path / "dups"))

    assert dropped == 2
    assert [r.key for r in kept] == ["benign/a.png", "malignant/d.png"], "the first copy is kept"


# ---------------------------------------------------------------- labels CSV
LABEL_ROWS = [
    {"file": "img/a.jpg", "malignant": "1", "patient_id": "P1", "lesion_id": "7", "diagnostic": "BCC"},
    {"file": "img/b.jpg", "malignant": "0", "patient_id": "P2", "lesion_id": "7", "diagnostic": "NEV"},
    {"file": "img/c.jpg", "malignant": "True", "patient_id": "P1", "lesion_id": "8", "diagnostic": "SCC"},
    {"file": "img/d.jpg", "malignant": "false", "patient_id": "", "lesion_id": "9", "diagnostic": "SEK"},
    {"file": "img/e.jpg", "malignant": "0", "patient_id": "", "lesion_id": "", "diagnostic": "ACK"},
    {"file": "img/f.jpg", "malignant": "1", "patient_id": "P1", "lesion_id": "7", "diagnostic": "BCC"},
]


@pytest.fixture
def labels_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "phone" / "labels.csv", LABEL_ROWS)


def test_labels_csv_reads_labels_paths_and_meta(labels_csv: Path) -> None:
    records = read_labels_csv(labels_csv)

    assert [r.key for r in records] == [row["file"] for row in LABEL_ROWS]
    assert [r.label for r in records] == [1, 0, 1, 0, 0, 1]
    assert all(r.path == labels_csv.parent / r.key for r in records)
    assert records[0].meta["diagnostic"] == "BCC"
    assert "file" not in records[0].meta and "malignant" not in records[0].meta
    assert {r.source for r in records} == {"phone"}


def test_labels_csv_lesion_ids_repeat_across_patients(labels_csv: Path) -> None:
    a, b, c, d, e, f = read_labels_csv(labels_csv)

    assert a.lesion != b.lesion, "lesion 7 of P1 and lesion 7 of P2 are different lesions"
    assert a.lesion == f.lesion, "the same patient's lesion 7, photographed twice"
    assert a.lesion != c.lesion
    assert (a.patient, b.patient, d.patient) == ("P1", "P2", None)
    # the group is the patient whenever it is known: all of P1's images stay together
    assert a.group == c.group == f.group == "patient:P1"
    assert b.group == "patient:P2"
    assert d.group != e.group and d.group not in {a.group, b.group}
    assert d.lesion is not None and e.lesion is None


def test_labels_csv_errors(tmp_path: Path) -> None:
    bad_label = write_csv(tmp_path / "bad.csv", [{"file": "a.jpg", "malignant": "maybe"}])
    with pytest.raises(DatasetError, match=r"bad\.csv:2.*'maybe'"):
        read_labels_csv(bad_label)
    no_label = write_csv(tmp_path / "nolabel.csv", [{"file": "a.jpg", "diagnosis": "BCC"}])
    with pytest.raises(DatasetError, match=r"missing column.*malignant"):
        read_labels_csv(no_label)


def test_load_dataset_finds_a_labels_csv(labels_csv: Path) -> None:
    assert load_dataset(labels_csv.parent) == read_labels_csv(labels_csv)
    assert load_dataset(labels_csv) == read_labels_csv(labels_csv)
    with pytest.raises(DatasetError, match="split"):
        load_dataset(labels_csv.parent, split="train")


def test_grouped_split_keeps_patients_together_on_synthetic_records() -> None:
    # 60 patients with 1-4 photos each; patient i is malignant when i % 3 == 0
    records = [
        Record(
            path=Path(f"p{i}_{j}.jpg"),
            label=int(i % 3 == 0),
            source="s",
            key=f"p{i}_{j}.jpg",
            patient=f"P{i}",
            group=f"patient:P{i}",
        )
        for i in range(60)
        for j in range(1 + i % 4)
    ]

    train, val = grouped_split(records, 0.2, seed=3)

    assert sorted(r.key for r in train + val) == sorted(r.key for r in records)
    assert not {r.patient for r in train} & {r.patient for r in val}
    assert 0.1 < len(val) / len(records) < 0.3
    assert 0 < sum(r.label for r in val) < len(val), "both classes in validation"


def test_grouped_split_refuses_too_few_of_a_class() -> None:
    records = [
        Record(path=Path(f"{i}.jpg"), label=int(i < 2), source="s", key=f"{i}.jpg", group=f"{i}.jpg") for i in range(40)
    ]
    with pytest.raises(DatasetError, match="too few"):
        grouped_split(records, 0.2, seed=0)


# ---------------------------------------------------------------- ISIC Archive download
# `isic image download` writes <isic_id>.jpg files, metadata.csv and attribution/licence files.
OLD_COLUMNS = [
    "isic_id",
    "attribution",
    "copyright_license",
    "benign_malignant",
    "diagnosis",
    "patient_id",
    "lesion_id",
]
NEW_COLUMNS = [
    "isic_id",
    "attribution",
    "copyright_license",
    "diagnosis_1",
    "diagnosis_2",
    "diagnosis_3",
    "patient_id",
    "lesion_id",
]
# isic_id -> (old benign_malignant, new diagnosis_1, diagnosis text, patient, lesion)
ISIC_ROWS = {
    "ISIC_0000001": ("benign", "Benign", "nevus", "IP_0000001", "IL_0000001"),
    "ISIC_0000002": ("malignant", "Malignant", "melanoma", "IP_0000001", "IL_0000002"),
    "ISIC_0000003": ("malignant", "Malignant", "basal cell carcinoma", "", "IL_0000003"),
    "ISIC_0000004": ("benign", "Benign", "seborrheic keratosis", "IP_0000002", ""),
    "ISIC_0000005": ("indeterminate", "Indeterminate", "atypical melanocytic proliferation", "IP_0000003", ""),
    "ISIC_0000006": ("indeterminate/malignant", "Indeterminate", "", "", ""),
    "ISIC_0000007": ("", "", "", "", ""),  # unlabelled
}
EXPECTED_LABELS = {"ISIC_0000001": 0, "ISIC_0000002": 1, "ISIC_0000003": 1, "ISIC_0000004": 0}


def write_isic_download(folder: Path, variant: str) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for n, (isic_id, (old, new, diagnosis, patient, lesion)) in enumerate(ISIC_ROWS.items()):
        quadrants(16, 12).save(folder / f"{isic_id}.jpg")
        row = {"isic_id": isic_id, "attribution": "Anonymous", "copyright_license": "CC-0"}
        row |= {"patient_id": patient, "lesion_id": lesion}
        if variant == "old":
            row |= {"benign_malignant": old, "diagnosis": diagnosis}
        else:
            row |= {"diagnosis_1": new, "diagnosis_2": diagnosis.title() if n < 4 else "", "diagnosis_3": ""}
        rows.append(row)
    write_csv(folder / "metadata.csv", rows, OLD_COLUMNS if variant == "old" else NEW_COLUMNS)
    (folder / "attribution.txt").write_text("Anonymous (CC-0)\n")
    return folder


@pytest.mark.parametrize("variant", ["old", "new"])
def test_isic_download_reads_labels_and_skips_the_rest(tmp_path: Path, variant: str, caplog) -> None:
    folder = write_isic_download(tmp_path / "isic", variant)

    with caplog.at_level(logging.WARNING, logger="skinscan.data"):
        records = read_isic_download(folder)

    assert {r.key.removesuffix(".jpg"): r.label for r in records} == EXPECTED_LABELS
    assert all(r.path == folder / r.key and r.path.is_file() for r in records)
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3 image(s)" in warnings[0].getMessage()
    assert "indeterminate" in warnings[0].getMessage()


def test_isic_download_groups_by_patient_then_lesion(tmp_path: Path) -> None:
    records = {r.key: r for r in read_isic_download(write_isic_download(tmp_path / "isic", "new"))}
    one, two, three, four = (records[f"ISIC_000000{i}.jpg"] for i in (1, 2, 3, 4))

    assert one.group == two.group == "patient:IP_0000001"
    assert one.lesion != two.lesion
    assert three.patient is None and "IL_0000003" in three.group
    assert four.group == "patient:IP_0000002"
    assert one.meta["diagnosis_2"] == "Nevus" and "isic_id" not in one.meta


def test_isic_download_counts_missing_images(tmp_path: Path, caplog) -> None:
    folder = write_isic_download(tmp_path / "isic", "old")
    (folder / "ISIC_0000002.jpg").unlink()

    with caplog.at_level(logging.WARNING, logger="skinscan.data"):
        records = read_isic_download(folder)

    assert {r.key for r in records} == {"ISIC_0000001.jpg", "ISIC_0000003.jpg", "ISIC_0000004.jpg"}
    assert "skipped 4 image(s)" in caplog.text


def test_isic_download_with_only_labelled_rows_warns_nothing(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "clean"
    folder.mkdir()
    quadrants().save(folder / "ISIC_0000001.jpg")
    write_csv(folder / "metadata.csv", [{"isic_id": "ISIC_0000001", "benign_malignant": "malignant"}])

    with caplog.at_level(logging.WARNING, logger="skinscan.data"):
        records = read_isic_download(folder)

    assert [(r.key, r.label) for r in records] == [("ISIC_0000001.jpg", 1)]
    assert not caplog.records


def test_load_dataset_recognises_an_isic_download(tmp_path: Path) -> None:
    folder = write_isic_download(tmp_path / "isic", "new")
    assert load_dataset(folder) == read_isic_download(folder)


def test_isic_download_errors(tmp_path: Path) -> None:
    no_id = write_csv(tmp_path / "a/metadata.csv", [{"image": "x", "benign_malignant": "benign"}])
    with pytest.raises(DatasetError, match="isic_id"):
        read_isic_download(no_id.parent)
    no_label = write_csv(tmp_path / "b/metadata.csv", [{"isic_id": "ISIC_1", "diagnosis": "nevus"}])
    with pytest.raises(DatasetError, match="benign_malignant or diagnosis_1"):
        read_isic_download(no_label.parent)


def test_resolve_dataset(tmp_path: Path) -> None:
    (tmp_path / "root/isic-mvb").mkdir(parents=True)

    assert resolve_dataset("isic-mvb", tmp_path / "root") == tmp_path / "root/isic-mvb"
    assert resolve_dataset(str(tmp_path), tmp_path / "elsewhere") == tmp_path
    with pytest.raises(DatasetError, match="SKINSCAN_DATA"):
        resolve_dataset("no-such-set", tmp_path / "root")


# ---------------------------------------------------------------- the data_root fixture itself
MISSING = re.escape("../shared/datasets not found; set SKINSCAN_DATA")


def test_missing_data_skips_outside_ci(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SKINSCAN_DATA", str(tmp_path / "no-datasets-here"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        find_data_root()


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_data_fails_in_ci(monkeypatch, tmp_path: Path, ci: str) -> None:
    monkeypatch.setenv("SKINSCAN_DATA", str(tmp_path / "no-datasets-here"))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=MISSING):
        find_data_root()


def test_data_root_follows_skinscan_data(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SKINSCAN_DATA", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    assert find_data_root() == tmp_path


# ---------------------------------------------------------------- real data: isic-mvb
@pytest.fixture(scope="module")
def isic_train(isic_mvb: Path) -> list[Record]:
    return read_class_folders(isic_mvb, "train")


@pytest.fixture(scope="module")
def isic_test(isic_mvb: Path) -> list[Record]:
    return read_class_folders(isic_mvb, "test")


@pytest.mark.data
def test_isic_mvb_sizes_and_keys(isic_train: list[Record], isic_test: list[Record]) -> None:
    assert len(isic_train) == 2637
    assert len(isic_test) == 660
    assert Counter(r.label for r in isic_train) == {0: 1440, 1: 1197}
    assert Counter(r.label for r in isic_test) == {0: 360, 1: 300}
    keys = [r.key for r in isic_train + isic_test]
    assert len(set(keys)) == len(keys) == 3297
    assert {"train/benign/3.jpg", "test/malignant/3.jpg"} <= set(keys)
    assert len({r.path.name for r in isic_train + isic_test}) < len(keys), "bare names do repeat"
    assert all(r.md5 for r in isic_train + isic_test), "md5 comes from manifest.csv"


@pytest.mark.data
def test_isic_mvb_de_leaked_test_set_has_646_images(isic_train: list[Record], isic_test: list[Record]) -> None:
    clean = without_leaks(isic_test, isic_train)

    assert len(clean) == 646
    train_groups = {r.group for r in isic_train}
    removed = [r for r in isic_test if r not in clean]
    assert all(r.group.startswith("dup:") and r.group in train_groups for r in removed)


@pytest.mark.data
def test_isic_mvb_exact_duplicates_dropped(isic_train: list[Record]) -> None:
    kept, dropped = drop_exact_duplicates(isic_train)

    assert dropped >= 1
    assert len(kept) == len(isic_train) - dropped
    twins = {"train/malignant/768.jpg", "train/malignant/769.jpg"}
    assert len(twins & {r.key for r in kept}) == 1
    assert len({r.md5 for r in kept}) == len(kept)


@pytest.fixture(scope="module")
def isic_split(isic_train: list[Record]) -> tuple[list[Record], list[Record]]:
    return grouped_split(isic_train, 0.15, seed=0)


def _malignant_share(records: list[Record]) -> float:
    return sum(r.label for r in records) / len(records)


@pytest.mark.data
def test_isic_mvb_grouped_split_is_grouped_and_stratified(isic_train, isic_split) -> None:
    train, val = isic_split

    assert sorted(r.key for r in train + val) == sorted(r.key for r in isic_train)
    assert not {r.key for r in train} & {r.key for r in val}
    assert 0.1 < len(val) / len(isic_train) < 0.2
    sides = {}
    for side, records in (("train", train), ("val", val)):
        for r in records:
            if r.group.startswith("dup:"):
                sides.setdefault(r.group, set()).add(side)
    assert len(sides) >= 10, "isic-mvb train holds near-duplicate groups"
    assert all(len(s) == 1 for s in sides.values()), {g: s for g, s in sides.items() if len(s) > 1}
    assert abs(_malignant_share(val) - _malignant_share(train)) < 0.03


@pytest.mark.data
def test_isic_mvb_grouped_split_is_reproducible(isic_train, isic_split) -> None:
    again = grouped_split(isic_train, 0.15, seed=0)
    other = grouped_split(isic_train, 0.15, seed=1)

    assert [r.key for r in again[1]] == [r.key for r in isic_split[1]]
    assert {r.key for r in other[1]} != {r.key for r in isic_split[1]}


# ---------------------------------------------------------------- real data: pad-ufes-20-phone
@pytest.mark.data
def test_pad_ufes_labels(pad_ufes: Path) -> None:
    records = read_labels_csv(pad_ufes / "labels.csv")
    with (pad_ufes / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))

    assert len(records) == 586
    assert len({r.patient for r in records}) == 434
    assert sum(r.label for r in records) == 240
    assert all(r.path.is_file() for r in records)
    # lesion ids alone repeat across patients; the reader's lesion is (patient, lesion)
    assert len({r.lesion for r in records}) == len({(row["patient_id"], row["lesion_id"]) for row in rows})
    assert len({r.lesion for r in records}) > len({row["lesion_id"] for row in rows})
    assert all(r.group == f"patient:{r.patient}" for r in records)


@pytest.mark.data
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pad_ufes_split_never_shares_a_patient(pad_ufes: Path, seed: int) -> None:
    records = load_dataset(pad_ufes)

    train, val = grouped_split(records, 0.2, seed=seed)

    assert len(train) + len(val) == 586
    assert not {r.patient for r in train} & {r.patient for r in val}
    assert abs(_malignant_share(val) - _malignant_share(train)) < 0.06
