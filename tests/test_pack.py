"""`skinscan pack`: a small copy of the datasets for a lent GPU that reads like the originals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinscan.cli import main
from skinscan.data import load_dataset
from skinscan.preprocess import PreprocessSpec, load_pixels
from skinscan.stamps import INK_CIRCLE, ink_circle


@pytest.fixture(scope="module")
def packed(pad_ufes: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "datasets"
    assert main(["pack", str(out), "--data-root", str(pad_ufes.parent), "--datasets", pad_ufes.name]) == 0
    return out


@pytest.mark.data
def test_the_pack_reads_like_the_originals(packed: Path, pad_ufes: Path) -> None:
    original, copy = load_dataset(pad_ufes), load_dataset(packed / pad_ufes.name)
    fields = [(r.uid, r.label, r.source, r.group, r.patient, r.diagnosis) for r in original]
    assert [(r.uid, r.label, r.source, r.group, r.patient, r.diagnosis) for r in copy] == fields
    assert (packed / pad_ufes.name / "labels.csv").read_bytes() == (pad_ufes / "labels.csv").read_bytes()
    info = json.loads((packed / "PACK.json").read_text())
    assert info["images"] + len(info["kept_as_is"]) == len(original) and not info["unreadable"]
    assert info["format"] == "WEBP"
    size = sum(p.stat().st_size for p in packed.rglob("*") if p.is_file())
    assert info["bytes"] <= size and info["bytes"] / len(original) < 4000  # about 2.7 kB a photo


@pytest.mark.data
def test_a_packed_photo_is_the_square_training_reads_up_to_webp_loss(packed: Path, pad_ufes: Path) -> None:
    spec = PreprocessSpec()
    for r_orig, r_pack in list(zip(load_dataset(pad_ufes), load_dataset(packed / pad_ufes.name), strict=True))[::60]:
        with Image.open(r_pack.path) as img:
            assert img.format == "WEBP" and img.size == (spec.size, spec.size)
        a, b = load_pixels(r_orig.path, spec).astype(int), load_pixels(r_pack.path, spec).astype(int)
        assert np.abs(a - b).mean() < 6, r_orig.uid  # measured: about 3-4 levels at quality 50
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


@pytest.mark.data
def test_pack_refuses_to_overwrite_and_says_when_it_is_too_large(
    packed: Path, pad_ufes: Path, tmp_path, capsys
) -> None:
    root = ["--data-root", str(pad_ufes.parent), "--datasets", pad_ufes.name]
    assert main(["pack", str(packed), *root]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "small"), *root, "--max-mb", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "more than --max-mb 0.1" in err and "Traceback" not in err
    assert (tmp_path / "small" / "PACK.json").is_file()  # the pack written is kept
    assert main(["pack", str(tmp_path / "none"), "--data-root", str(tmp_path), "--datasets", "nope"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.data
def test_the_pack_keeps_the_photo_a_mark_is_cut_from_so_stamp_augment_pastes_the_same_mark(
    packed: Path, pad_ufes: Path
) -> None:
    rel = INK_CIRCLE[0]  # the phone set's ink circle: cut by a crop box in the original photo's pixels
    assert json.loads((packed / "PACK.json").read_text())["kept_as_is"] == [rel]
    assert (packed / rel).read_bytes() == (pad_ufes.parent / rel).read_bytes()
    cut, from_pack = ink_circle(pad_ufes.parent), ink_circle(packed)
    assert from_pack.size == cut.size and np.array_equal(np.asarray(from_pack), np.asarray(cut))
