"""The model card: a JSON document stored inside the ONNX file (metadata key `skinscan.card`) and
written beside it for people. Everything (Predictor, service, evaluation) reads it from the model."""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import ModelLoadError
from .preprocess import PreprocessSpec

CARD_KEY = "skinscan.card"
CARD_FORMAT = 1
BUNDLED_MODEL = "skinscan-lite0-sources.onnx"  # the default model (server, CLI, Python API)
# The page's private mode runs the int8 build of the default: a quarter of its bytes, so that a first visit
# stays small on the wire (docs/private-mode.md gives both builds' figures).
BROWSER_MODEL = "skinscan-lite0-sources-int8"

INTENDED_USE = (
    "skinscan is a screening aid that estimates how likely a photographed skin lesion is to be malignant, "
    "to help decide whether to see a dermatologist soon. It is not a diagnosis and does not replace a "
    "doctor: any lesion that changes, bleeds, itches or worries you should be seen by a doctor whatever "
    "the result. Not validated for use by itself in clinical decisions."
)
KNOWN_LIMITS = (
    "Trained on seven sources (training.data.per_source): ISIC dermoscopy (HAM10000 and other archive "
    "collections), PAD-UFES-20 phone photos from one Brazilian programme (mostly skin types II-III), and clinical "
    "photos of three atlases (Fitzpatrick17k, DermNet NZ, SD-198), few of them of skin types V-VI. Expect lower "
    "accuracy on cameras, dermoscopes and lesion types it has rarely seen, and on darker skin: see the "
    "leave-one-source-out figures in docs/sources.md.",
    "The probability is calibrated on the validation data of those sources; the prevalence of cancer among "
    "people using a screening app is far lower, so positive predictive value will be lower too.",
    "It judges one lesion per photo and expects the lesion near the centre of the frame (the centre square is "
    "what the model sees); a lesion small in a wide frame is judged worse.",
)
ADVICE = {
    "refer": "Higher risk: see a dermatologist soon. This is a screening estimate, not a diagnosis.",
    "monitor": (
        "Lower risk: keep monitoring the lesion and see a doctor if it changes, bleeds or itches. "
        "This is a screening estimate, not a diagnosis."
    ),
}


class ModelCard(BaseModel):
    """The fields every reader relies on; further keys (metrics, data, licences...) ride along."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: int = CARD_FORMAT
    name: str
    version: str
    architecture: str
    input_name: str = "image"
    outputs: list[str] = Field(default_factory=lambda: ["logit", "cam", "embedding"])
    preprocessing: dict[str, Any]
    temperature: float = Field(gt=0)
    threshold: float = Field(gt=0, lt=1)
    threshold_rule: str = ""
    intended_use: str = INTENDED_USE
    # the diagnosis head: {"classes": [...], "prior": {...}, "balanced_accuracy": {...}}; None: no head
    diagnosis: dict[str, Any] | None = None

    @cached_property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocessing)

    @cached_property
    def validation_keys(self) -> frozenset[str]:
        """`Record.uid` of the photos the networks never trained on (the run's validation split; they chose
        the epoch and the calibration); empty where the card does not say."""
        training = getattr(self, "training", None) or {}
        return frozenset((training.get("data") or {}).get("val_keys", []))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, sort_keys=False)


def default_model_path() -> Path:
    """The default model bundled inside the package."""
    return Path(str(resources.files("skinscan").joinpath("models", BUNDLED_MODEL)))


def bundled_models() -> list[str]:
    """Names of the models inside the package (`Predictor("skinscan-lite0-sources-int8")` loads one by name)."""
    return sorted(p.name[: -len(".onnx")] for p in default_model_path().parent.glob("*.onnx"))


# What each bundled model is for, in a few words (`skinscan predict --help` lists them).
BUNDLED_USES = {
    "skinscan-lite0-sources": "the default: phone, clinical and dermoscopic photos, with the quality gate and the "
    "answers",
    "skinscan-lite0-sources-int8": "the default model quantised to int8: what the page runs on the device; see its card",
}


def bundled_model_uses() -> dict[str, str]:
    """Every bundled model's name -> what it is for (the default first)."""
    names = sorted(bundled_models(), key=lambda n: (n != BUNDLED_MODEL[: -len(".onnx")], n))
    return {name: BUNDLED_USES.get(name, "see its model card") for name in names}


def resolve_model(model: str | Path | None) -> Path:
    """A model path, or the name of a bundled model, or None for the default model."""
    if model is None:
        return default_model_path()
    path = Path(model)
    if not path.exists() and str(model) in bundled_models():
        return default_model_path().parent / f"{model}.onnx"
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_from_metadata(metadata: dict[str, str], where: str) -> ModelCard:
    raw = metadata.get(CARD_KEY)
    if raw is None:
        raise ModelLoadError(f"{where} has no skinscan model card; export models with `skinscan export`")
    try:
        card = ModelCard(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{where}: the model card is invalid: {exc}") from None
    if card.format > CARD_FORMAT:
        raise ModelLoadError(f"{where}: model card format {card.format} is newer than this skinscan; upgrade it")
    return card


def require_card_writer() -> None:
    """Writing a card needs the `onnx` package (the `train` extra): a clear error, to call before long work."""
    from .errors import MissingExtra

    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise MissingExtra("train", "writing the model card", exc) from None


def write_card(onnx_path: Path, card: dict[str, Any]) -> Path:
    """Store `card` inside the ONNX file and beside it as `<name>.card.json` (needs the `onnx` package)."""
    require_card_writer()
    import onnx

    ModelCard(**card)  # validate before writing anything
    model = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in model.metadata_props}
    props[CARD_KEY] = json.dumps(card)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(onnx_path))
    side = onnx_path.with_suffix(".card.json")
    side.write_text(json.dumps(card, indent=2) + "\n")
    return side
