"""Predictor: ONNX Runtime inference behind the one preprocessing function. No torch import."""

from __future__ import annotations

import dataclasses
import io
import logging
import mimetypes
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
from PIL import Image

from .answers import Adjustment, Answers, apply_answers, section_from_card
from .card import ADVICE, ModelCard, card_from_metadata, resolve_model, sha256_file
from .data import DIAGNOSIS_LABELS, IMAGE_SUFFIXES
from .errors import InvalidAnswers, InvalidImage, ModelLoadError
from .graphs import MEASURES, PROBLEM_ORDER, finish_graph, prepare_graph
from .metrics import sigmoid
from .phototype import PhotoTypes
from .preprocess import ImageSource, load_pixels
from .quality import REASONS, QualityGate, QualityReport, Verdict

Decision = Literal["refer", "monitor"]

log = logging.getLogger("skinscan")


@dataclass(frozen=True)
class Prediction:
    """The result for one image. `probability` is calibrated; `decision` uses the model's threshold.

    `quality` is the quality gate's verdict ("ok" or "retake"; None when the image could not be read) and
    `reasons` says what to fix. A retake has no probability or decision unless the prediction was forced
    (`force=True`); `quality_report` holds the gate's measures.

    With answers about the spot (`skinscan.answers`), `adjustments` lists how each known answer moved the
    log-odds, `probability` includes them and `image_probability` is the photo's alone.

    `photo_type` ("dermoscopic" | "phone") is the detected kind of photo where the model calibrates each
    kind with its own temperature (`skinscan.phototype`); `threshold` is then that type's.

    `diagnosis` is the kind of lesion the photo looks most like and `diagnoses` each kind's probability,
    where the model has a diagnosis head (else None). Every kind counts alike there (the training mix is
    divided out), so they say what the photo resembles, not how common each kind is; the referral advice
    comes from `probability` alone.

    An input that could not be read or scored has its `error` and no decision fields (no probability,
    decision or threshold): nothing was compared with anything.
    """

    path: str | None
    probability: float | None
    decision: Decision | None
    threshold: float | None
    logit: float | None = None
    error: str | None = None
    timings_ms: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    cam: np.ndarray | None = field(default=None, repr=False, compare=False)
    quality: Verdict | None = None
    reasons: tuple[str, ...] = ()
    quality_report: QualityReport | None = field(default=None, repr=False, compare=False)
    adjustments: tuple[Adjustment, ...] = ()
    image_probability: float | None = None
    photo_type: str | None = None
    diagnosis: str | None = None
    diagnoses: Mapping[str, float] | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def unforced(self) -> Prediction:
        """This result as an unforced prediction gives it: a retake loses its probability and decision."""
        if self.quality != "retake" or self.probability is None:
            return self
        return dataclasses.replace(
            self,
            probability=None,
            decision=None,
            logit=None,
            cam=None,
            adjustments=(),
            image_probability=None,
            diagnosis=None,
            diagnoses=None,
        )

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
            "quality": self.quality,
            "reasons": list(self.reasons),
            "adjustments": [a.to_dict() for a in self.adjustments],
            "image_probability": self.image_probability,
            "photo_type": self.photo_type,
            "diagnosis": self.diagnosis,
            "diagnosis_label": DIAGNOSIS_LABELS.get(self.diagnosis) if self.diagnosis else None,
            "diagnoses": None if self.diagnoses is None else dict(self.diagnoses),
            "timings_ms": dict(self.timings_ms),
        }


@dataclass(frozen=True)
class Decoded:
    """One photo after `Predictor.decode`: the model's uint8 (S, S, 3) pixels, the network input (3, S, S),
    the decoded photo's shorter side, the quality gate's pixel measures and the time taken; or, for an
    unusable image, its `error`."""

    pixels: np.ndarray | None = field(repr=False)
    shorter_side: int | None
    measures: Mapping[str, float] | None
    error: str | None = None
    decode_ms: float = 0.0
    measure_ms: float = 0.0
    image: np.ndarray | None = field(default=None, repr=False)


class Predictor:
    """Load a skinscan ONNX model once; predict images (paths, bytes, file objects or PIL images).

    >>> predictor = Predictor()                      # the bundled default model
    >>> result = predictor("examples/isic-malignant-1.jpg")
    >>> result.decision in ("refer", "monitor")
    True
    """

    def __init__(self, model: str | Path | None = None, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_path = resolve_model(model)  # a path, a bundled model's name, or None: the default
        if not self.model_path.is_file():
            raise ModelLoadError(f"model file {self.model_path} does not exist")
        options = ort.SessionOptions()
        # ONNX Runtime's memory pattern plans one block per input shape; for the two-network default model
        # it held 460 MB at batch 8 against 290 MB without it, at the same speed (measured here).
        options.enable_mem_pattern = False
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
        self.gate = QualityGate.from_card(self.card, self._outputs)  # pixel checks, + OOD if the card has one
        self.answers_section = section_from_card(self.card)  # the answers' adjustments; None if not fitted
        self.photo_types = PhotoTypes.from_card(self.card)  # a temperature per photo type; None: one for all
        # The arithmetic before and after the network, as ONNX graphs built from the card: the same graphs
        # the web page runs in private mode (skinscan.graphs; `graph_bytes` is what the service sends).
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        dim = shapes.get("embedding", [None, 1])[-1]
        self._embedding_dim = dim if isinstance(dim, int) else 1
        self.graph_bytes = {
            "before": prepare_graph(self.spec).SerializeToString(),
            "after": finish_graph(self.card, self._embedding_dim).SerializeToString(),
        }
        graph_options = ort.SessionOptions()
        graph_options.intra_op_num_threads = 1  # small graphs; a server runs several decodes in parallel
        self._before, self._after = (
            ort.InferenceSession(self.graph_bytes[k], graph_options, providers=["CPUExecutionProvider"])
            for k in ("before", "after")
        )

    @property
    def threshold(self) -> float:
        """The card's threshold (for a photo of a detected type: `threshold_for(photo_type)`)."""
        return self.card.threshold

    def temperature_for(self, photo_type: str | None) -> float:
        if self.photo_types is None or photo_type is None:
            return self.card.temperature
        return self.photo_types.temperatures[photo_type]

    def threshold_for(self, photo_type: str | None) -> float:
        if self.photo_types is None or photo_type is None:
            return self.card.threshold
        return self.photo_types.threshold(photo_type)

    def photo_type_calibration(self) -> dict[str, dict[str, float]] | None:
        """{type: {temperature, threshold}} where the model calibrates each photo type on its own, else None."""
        if self.photo_types is None:
            return None
        return {
            t: {"temperature": self.temperature_for(t), "threshold": self.threshold_for(t)}
            for t in self.photo_types.temperatures
        }

    def detect_photo_types(self, embeddings: np.ndarray | None, n: int) -> list[str | None]:
        """The detected type of each photo (None for all when the card calibrates every photo alike)."""
        if self.photo_types is None or embeddings is None:
            return [None] * n
        return list(self.photo_types.detect(embeddings))

    def info(self) -> dict:
        return {"name": self.card.name, "version": self.card.version, "sha256": self.sha256}

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Normalised (N, 3, S, S) float32 -> the model's outputs by name: `logit` (N,), and where the model
        has them `cam` (N, h, w) class activation maps, `embedding` (N, C) pooled features and `diagnosis`
        (N, classes) log-probabilities of the diagnosis classes (the card's `diagnosis.classes`)."""
        out = dict(zip(self._outputs, self.session.run(None, {self.card.input_name: batch}), strict=True))
        out["logit"] = out["logit"].reshape(-1)
        return out

    def calibrate(self, logits: np.ndarray, photo_types: Sequence[str | None] | None = None) -> np.ndarray:
        """Calibrated probabilities: sigmoid(logit / temperature), the temperature of each photo's type when
        `photo_types` are given (see `detect_photo_types`), else the card's."""
        z = np.asarray(logits, dtype=np.float64)
        if photo_types is None:
            return sigmoid(z / self.card.temperature)
        return sigmoid(z / np.array([self.temperature_for(t) for t in photo_types]).reshape(z.shape))

    def __call__(
        self, source: ImageSource, name: str | None = None, *, force: bool = False, answers: Answers | None = None
    ) -> Prediction:
        return self.predict(
            [source], names=[name] if name else None, force=force, answers=None if answers is None else [answers]
        )[0]

    def adjust(self, prediction: Prediction, answers: Answers | None) -> Prediction:
        """`prediction` with the known answers' adjustments: probability = sigmoid(logit / temperature +
        their sum), decision at the same threshold. No known answer (or no probability): unchanged."""
        if answers is None or answers.empty or prediction.probability is None or prediction.logit is None:
            return prediction
        logit, adjustments = apply_answers(
            prediction.logit / self.temperature_for(prediction.photo_type), answers, self.answers_adjustments()
        )
        if not adjustments:  # answers that move nothing (other / unfitted values): exactly the image's estimate
            return prediction
        p = float(sigmoid(logit))
        return dataclasses.replace(
            prediction,
            probability=p,
            decision="refer" if p >= prediction.threshold else "monitor",
            adjustments=adjustments,
            image_probability=prediction.probability,
        )

    def answers_adjustments(self) -> dict:
        """The card's answers section; a model without one raises InvalidAnswers (answers are never ignored
        silently)."""
        if self.answers_section is None:
            raise InvalidAnswers(
                f"the model {self.card.name} {self.card.version} has no adjustments for answers in its card: "
                "predict without answers, or fit them with `skinscan fit-answers`"
            )
        return self.answers_section

    def predict(
        self,
        sources: Sequence[ImageSource],
        *,
        names: Sequence[str | None] | None = None,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
        force: bool = False,
        answers: Sequence[Answers | None] | None = None,
    ) -> list[Prediction]:
        """Predict many images; one that cannot be read yields a Prediction with `error` set.

        Every image passes the quality gate first: a photo to retake gets `quality="retake"`, its reasons,
        and no probability, unless `force` (then it has both, and stays a retake).
        `answers` (one per image, None for none) adjust each estimate: see `adjust`.
        """
        if names is None:
            names = [str(s) if isinstance(s, (str, Path)) else None for s in sources]
        if answers is not None:
            if len(answers) != len(sources):
                raise InvalidAnswers(f"{len(answers)} sets of answers for {len(sources)} images: give one per image")
            if any(a is not None and not a.empty for a in answers):
                self.answers_adjustments()  # before any inference: a model without adjustments refuses answers
        results: list[Prediction] = []
        for start in range(0, len(sources), batch_size):
            chunk = list(zip(sources[start : start + batch_size], names[start : start + batch_size], strict=True))
            results.extend(self._predict_chunk(chunk, force))
            if progress:
                progress(len(chunk))
        if answers is not None:
            results = [self.adjust(r, a) for r, a in zip(results, answers, strict=True)]
        return results

    def _predict_chunk(self, chunk: list[tuple[ImageSource, str | None]], force: bool) -> list[Prediction]:
        return self.predict_decoded([self.decode(source) for source, _ in chunk], [n for _, n in chunk], force=force)

    def decode(self, source: ImageSource) -> Decoded:
        """Everything about one photo that needs no model: decode, resize, the quality gate's pixel measures.
        Never raises for a bad image: the result carries its `error`. Thread-safe, so a server decodes
        photos in parallel while the batched inference (`predict_decoded`) runs."""
        t = time.perf_counter()
        try:
            data = _read(source)
            pixels = load_pixels(data, self.spec)  # Pillow's resize (the browser: the graph's; see graphs.py)
            side = _shorter_side(data)
        except InvalidImage as exc:
            return Decoded(None, None, None, error=str(exc), decode_ms=(time.perf_counter() - t) * 1000)
        except Exception as exc:  # a decoder tripping over a malformed file: this image's error, nobody else's
            log.warning("undecodable image raised %s (not InvalidImage)", type(exc).__name__)
            message = f"cannot read the image ({type(exc).__name__}); send a JPEG, PNG, WebP or HEIC photo"
            return Decoded(None, None, None, error=message, decode_ms=(time.perf_counter() - t) * 1000)
        decode_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        image, square, measures = self._before.run(None, {"pixels": pixels})
        return Decoded(
            square,
            side,
            dict(zip(MEASURES, measures.astype(np.float64).tolist(), strict=True)),
            decode_ms=decode_ms,
            measure_ms=(time.perf_counter() - t) * 1000,
            image=image[0],
        )

    def finish(
        self, outputs: Mapping[str, np.ndarray], shorter_sides: Sequence[int | None], measures: np.ndarray
    ) -> dict:
        """The `after` graph on the network's outputs: probability, threshold, is_phone, ood_score, problems,
        influence (see skinscan.graphs)."""
        n = len(outputs["logit"])
        feeds = {
            "logit": outputs["logit"].astype(np.float32),
            "embedding": outputs.get("embedding", np.zeros((n, self._embedding_dim), np.float32)),
            "cam": outputs.get("cam", np.zeros((n, 1, 1), np.float32)),
            "shorter_side": np.array([s or 0 for s in shorter_sides], dtype=np.float32),
            "measures": np.asarray(measures, dtype=np.float32).reshape(n, len(MEASURES)),
        }
        names = [o.name for o in self._after.get_outputs()]
        return dict(zip(names, self._after.run(None, feeds), strict=True))

    def _report(
        self, measures: Mapping[str, float], side: int | None, ood: float, problems: np.ndarray
    ) -> QualityReport:
        codes = tuple(code for code, on in zip(PROBLEM_ORDER, problems, strict=True) if on)
        min_side = self.gate.thresholds.min_side
        return QualityReport(
            verdict="retake" if codes else "ok",
            reasons=tuple(REASONS[c].format(side=side, min_side=min_side) for c in codes),
            problems=codes,
            shorter_side=side,
            ood_score=None if self.gate.ood is None else float(ood),
            **measures,
        )

    def _diagnoses(self, log_probs: np.ndarray | None) -> list[dict] | None:
        """Each photo's `diagnosis` and `diagnoses` fields from the model's diagnosis output (None: none)."""
        classes = (self.card.diagnosis or {}).get("classes")
        if log_probs is None or not classes:
            return None
        probs = np.exp(np.asarray(log_probs, dtype=np.float64))
        return [
            {
                "diagnosis": classes[int(np.argmax(row))],
                "diagnoses": MappingProxyType({c: round(float(v), 4) for c, v in zip(classes, row, strict=True)}),
            }
            for row in probs
        ]

    def predict_decoded(
        self, decoded: Sequence[Decoded], names: Sequence[str | None] | None = None, *, force: bool = False
    ) -> list[Prediction]:
        """One inference over the decoded photos (see `decode`), then the quality gate's verdicts."""
        names = list(names) if names is not None else [None] * len(decoded)
        good = [d for d in decoded if d.error is None]
        infer_ms = gate_ms = 0.0
        if good:
            t = time.perf_counter()
            outputs = self.run(np.stack([d.image for d in good]))
            logits, cams = outputs["logit"], outputs.get("cam")
            diagnoses = self._diagnoses(outputs.get("diagnosis"))
            infer_ms = (time.perf_counter() - t) * 1000 / len(good)
            t = time.perf_counter()
            sides = [d.shorter_side for d in good]
            done = self.finish(outputs, sides, np.array([[d.measures[k] for k in MEASURES] for d in good]))
            probs = done["probability"]
            types = [("phone" if v else "dermoscopic") if self.photo_types else None for v in done["is_phone"]]
            reports = [
                self._report(d.measures, d.shorter_side, done["ood_score"][i], done["problems"][i])
                for i, d in enumerate(good)
            ]
            gate_ms = (time.perf_counter() - t) * 1000 / len(good)
        out, j = [], 0
        for d, name in zip(decoded, names, strict=True):
            if d.error is not None:
                timings = MappingProxyType({"decode": round(d.decode_ms, 3)})
                out.append(Prediction(name, None, None, None, error=d.error, timings_ms=timings))
                continue
            p, report, threshold = float(probs[j]), reports[j], float(done["threshold"][j])
            timings = {
                "decode": round(d.decode_ms, 3),
                "infer": round(infer_ms, 3),
                "gate": round(gate_ms + d.measure_ms, 3),
            }
            out.append(
                Prediction(
                    path=name,
                    probability=p,
                    decision="refer" if p >= threshold else "monitor",
                    threshold=threshold,
                    logit=float(logits[j]),
                    timings_ms=MappingProxyType(timings),
                    cam=None if cams is None else cams[j],
                    quality=report.verdict,
                    reasons=report.reasons,
                    quality_report=report,
                    photo_type=types[j],
                    **(diagnoses[j] if diagnoses else {}),
                )
            )
            if not force:
                out[-1] = out[-1].unforced()
            j += 1
        return out


def _read(source: ImageSource) -> ImageSource:
    """File contents as bytes (read once: decoding and the size check share them); other sources as given."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        return path.read_bytes() if path.is_file() else source  # a missing file: load_pixels says so
    if isinstance(source, (bytes, bytearray, memoryview, Image.Image)):
        return source
    return source.read()  # a file object


def _shorter_side(data: ImageSource) -> int | None:
    """The photo's shorter side in pixels, from its header: Pillow's `open` parses the header and decodes
    nothing (the pixels come from `load_pixels`, once). EXIF rotation does not change the shorter side."""
    if isinstance(data, Image.Image):
        return min(data.size)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data) as img:
            return min(img.size)
    except Exception:  # load_pixels already read it; a header Pillow cannot parse again only skips the size check
        return None


@dataclass(frozen=True)
class Inputs:
    """What `collect_images` found. `paths` are predicted, each into its own row: image files, paths that do
    not exist and picture files of a format skinscan does not read (their rows say why). `left_out` are the
    other files found in folders (notes, tables...), which are not pictures at all. Paths keep the text they
    were given in (a folder's files start with the folder as given)."""

    paths: list[str]
    left_out: list[str] = field(default_factory=list)


# picture formats that a folder of photos may hold but skinscan does not read (their rows say so)
_OTHER_PICTURE_SUFFIXES = {".gif", ".svg", ".avif", ".jxl", ".ico", ".dng", ".cr2", ".nef", ".arw", ".psd", ".jp2"}


def _is_picture(path: Path) -> bool:
    suffix = path.suffix.lower()
    guessed = mimetypes.guess_type(path.name)[0] or ""
    return suffix in IMAGE_SUFFIXES or suffix in _OTHER_PICTURE_SUFFIXES or guessed.startswith("image/")


def collect_images(paths: Iterable[str | Path]) -> Inputs:
    """Files as given (missing ones too: their prediction says "no such file"), and the pictures found
    recursively in folders (sorted), those of formats skinscan does not read included: every input meant
    as a photo gets a row, none is dropped silently. Hidden files and folders are ignored."""
    found: list[str] = []
    left_out: list[str] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            found.append(str(raw))
            continue
        for f in sorted(f for f in p.rglob("*") if f.is_file()):
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts):
                continue
            (found if _is_picture(f) else left_out).append(os.path.join(str(raw), str(rel)))
    return Inputs(found, left_out)
