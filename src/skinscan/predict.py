"""Predictor: ONNX Runtime inference behind the one preprocessing function. No torch import."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np

from .card import ADVICE, ModelCard, card_from_metadata, default_model_path, sha256_file
from .data import IMAGE_SUFFIXES
from .errors import InvalidImage, ModelLoadError, SkinscanError
from .metrics import sigmoid
from .preprocess import ImageSource, load_pixels, normalise

Decision = Literal["refer", "monitor"]


@dataclass(frozen=True)
class Prediction:
    """The result for one image. `probability` is calibrated; `decision` uses the model's threshold."""

    path: str | None
    probability: float | None
    decision: Decision | None
    threshold: float
    logit: float | None = None
    error: str | None = None
    timings_ms: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    cam: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def advice(self) -> str | None:
        return ADVICE[self.decision] if self.decision else None

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "probability": self.probability,
            "decision": self.decision,
            "threshold": self.threshold,
            "advice": self.advice,
            "error": self.error,
            "timings_ms": dict(self.timings_ms),
        }


class Predictor:
    """Load a skinscan ONNX model once; predict images (paths, bytes, file objects or PIL images).

    >>> predictor = Predictor()                      # the bundled default model
    >>> result = predictor("examples/isic-malignant-1.jpg")
    >>> result.decision in ("refer", "monitor")
    True
    """

    def __init__(self, model: str | Path | None = None, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_path = Path(model) if model is not None else default_model_path()
        if not self.model_path.is_file():
            raise ModelLoadError(f"model file {self.model_path} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            raise ModelLoadError(f"cannot load {self.model_path} as an ONNX model: {exc}") from None
        self.card: ModelCard = card_from_metadata(
            self.session.get_modelmeta().custom_metadata_map, str(self.model_path)
        )
        self.spec = self.card.spec
        self.sha256 = sha256_file(self.model_path)
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def threshold(self) -> float:
        return self.card.threshold

    def info(self) -> dict:
        return {"name": self.card.name, "version": self.card.version, "sha256": self.sha256}

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised (N, 3, S, S) float32 -> (raw logits (N,), class activation maps (N, h, w) or None)."""
        out = dict(zip(self._outputs, self.session.run(None, {self.card.input_name: batch}), strict=True))
        return out["logit"].reshape(-1), out.get("cam")

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(np.asarray(logits, dtype=np.float64) / self.card.temperature)

    def __call__(self, source: ImageSource, name: str | None = None) -> Prediction:
        return self.predict([source], names=[name] if name else None)[0]

    def predict(
        self,
        sources: Sequence[ImageSource],
        *,
        names: Sequence[str | None] | None = None,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> list[Prediction]:
        """Predict many images; one that cannot be read yields a Prediction with `error` set."""
        if names is None:
            names = [str(s) if isinstance(s, (str, Path)) else None for s in sources]
        results: list[Prediction] = []
        for start in range(0, len(sources), batch_size):
            chunk = list(zip(sources[start : start + batch_size], names[start : start + batch_size], strict=True))
            results.extend(self._predict_chunk(chunk))
            if progress:
                progress(len(chunk))
        return results

    def _predict_chunk(self, chunk: list[tuple[ImageSource, str | None]]) -> list[Prediction]:
        pixels, decode_ms, errors = [], [], {}
        for i, (source, _) in enumerate(chunk):
            t = time.perf_counter()
            try:
                pixels.append(load_pixels(source, self.spec))
            except InvalidImage as exc:
                errors[i] = str(exc)
            decode_ms.append((time.perf_counter() - t) * 1000)
        logits = cams = None
        infer_ms = 0.0
        if pixels:
            t = time.perf_counter()
            logits, cams = self.run(normalise(np.stack(pixels), self.spec))
            infer_ms = (time.perf_counter() - t) * 1000 / len(pixels)
            probs = self.calibrate(logits)
        out, j = [], 0
        for i, (_, name) in enumerate(chunk):
            if i in errors:
                out.append(
                    Prediction(
                        name,
                        None,
                        None,
                        self.threshold,
                        error=errors[i],
                        timings_ms=MappingProxyType({"decode": round(decode_ms[i], 3)}),
                    )
                )
                continue
            p = float(probs[j])
            out.append(
                Prediction(
                    path=name,
                    probability=p,
                    decision="refer" if p >= self.threshold else "monitor",
                    threshold=self.threshold,
                    logit=float(logits[j]),
                    timings_ms=MappingProxyType({"decode": round(decode_ms[i], 3), "infer": round(infer_ms, 3)}),
                    cam=None if cams is None else cams[j],
                )
            )
            j += 1
        return out


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and image files found recursively in folders (sorted). Missing paths raise."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists():
            found.append(p)
        else:
            raise SkinscanError(f"{p}: no such file or folder")
    return found
