"""Shared fixtures: where the datasets live, and small synthetic images written on the fly."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project reads the shared data from ../shared/datasets, relative to the repository root.
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "datasets"

# Quadrant colours of `quadrants()`: distinct enough to survive lossy codecs.
RED, GREEN, BLUE, YELLOW = (220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 20)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _data_missing(message: str) -> None:
    """Skip on a developer machine; fail in CI, where a silently skipped data test hides a regression."""
    if _in_ci():
        pytest.fail(f"{message} (CI is set, so data tests fail instead of skipping)", pytrace=False)
    pytest.skip(message)


def find_data_root() -> Path:
    """The folder holding the shared datasets: $SKINSCAN_DATA, else ../shared/datasets (skip or fail if absent)."""
    env = os.environ.get("SKINSCAN_DATA")
    root = Path(env) if env else DEFAULT_DATA_ROOT
    if not root.is_dir():
        _data_missing(f"{root}: ../shared/datasets not found; set SKINSCAN_DATA to the folder that holds the datasets")
    return root


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model, bundled inside the package."""
    from skinscan.card import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def predictor(model_path: Path):
    """One Predictor of the default model for the tests that only read from it (monkeypatch to alter it)."""
    from skinscan.predict import Predictor

    return Predictor(model_path)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return find_data_root()


def _dataset(data_root: Path, name: str, marker: str = "labels.csv") -> Path:
    """The dataset folder `name` under the data root (skip, or fail in CI, where its `marker` is missing)."""
    path = data_root / name
    if not (path / marker).is_file():
        _data_missing(f"{path}: {name} not found under the data root; set SKINSCAN_DATA")
    return path


@pytest.fixture(scope="session")
def isic_mvb(data_root: Path) -> Path:
    return _dataset(data_root, "isic-mvb", "manifest.csv")


@pytest.fixture(scope="session")
def isic_archive_more(data_root: Path) -> Path:
    return _dataset(data_root, "isic-archive-more")


@pytest.fixture(scope="session")
def clinical_atlas(data_root: Path) -> Path:
    return _dataset(data_root, "clinical-atlas")


@pytest.fixture(scope="session")
def pad_ufes(data_root: Path) -> Path:
    return _dataset(data_root, "pad-ufes-20-phone")


def quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """RGB image with four solid quadrants: top-left red, top-right green, bottom-left blue, bottom-right yellow."""
    img = Image.new("RGB", (width, height))
    w2, h2 = width // 2, height // 2
    img.paste(RED, (0, 0, w2, h2))
    img.paste(GREEN, (w2, 0, width, h2))
    img.paste(BLUE, (0, h2, w2, height))
    img.paste(YELLOW, (w2, h2, width, height))
    return img


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    """The bytes of `img` saved in `fmt` (HEIF works once pillow_heif's opener is registered)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


@pytest.fixture
def write_image(tmp_path: Path) -> Callable[..., Path]:
    """Write a small image under tmp_path: write_image("a/b.png", img=None, fmt=None, **save_params) -> Path.

    Without `img` a 32x24 quadrant image is written; the format defaults to the file suffix.
    """

    def _write(name: str, img: Image.Image | None = None, fmt: str | None = None, **params) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (img if img is not None else quadrants(32, 24)).save(path, format=fmt, **params)
        return path

    return _write


def near(pixel, colour, tol: int = 40) -> bool:
    """Every channel of `pixel` within `tol` of `colour` (lossy codecs move colours a little)."""
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour, strict=True))


@pytest.fixture(scope="session")
def diagnosis_model(tmp_path_factory, model_path: Path) -> Path:
    """A model with a `diagnosis` output: the default where it has one (a trained head), else the default
    with one grafted on (a fixed random linear head on its embedding, log-softmax; the card names the
    classes), for plumbing tests of `diagnosis` without training a network."""
    onnx = pytest.importorskip("onnx", reason="needs the train extra (onnx) to write a model")
    import json

    import numpy as np
    from onnx import helper, numpy_helper

    from skinscan.card import CARD_KEY, write_card
    from skinscan.data import DIAGNOSES

    model = onnx.load(str(model_path))
    if any(o.name == "diagnosis" for o in model.graph.output):
        return model_path  # the default has a trained diagnosis head: nothing to graft
    dim = next(o for o in model.graph.output if o.name == "embedding").type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (dim, len(DIAGNOSES))).astype(np.float32)
    b = np.zeros(len(DIAGNOSES), np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(w, "diag_w"), numpy_helper.from_array(b, "diag_b")])
    model.graph.node.extend(
        [
            helper.make_node("MatMul", ["embedding", "diag_w"], ["diag_mm"]),
            helper.make_node("Add", ["diag_mm", "diag_b"], ["diag_raw"]),
            helper.make_node("LogSoftmax", ["diag_raw"], ["diagnosis"], axis=1),
        ]
    )
    model.graph.output.append(
        helper.make_tensor_value_info("diagnosis", onnx.TensorProto.FLOAT, [None, len(DIAGNOSES)])
    )
    out = tmp_path_factory.mktemp("diagnosis") / "with-diagnosis.onnx"
    onnx.save(model, str(out))
    card = json.loads({p.key: p.value for p in model.metadata_props}[CARD_KEY])
    card["outputs"] = [*card["outputs"], "diagnosis"]
    card["diagnosis"] = {"classes": list(DIAGNOSES), "prior": {c: 0.1 for c in DIAGNOSES}}
    write_card(out, card)
    return out
