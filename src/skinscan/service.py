"""`skinscan serve`: the HTTP prediction service (FastAPI + uvicorn).

Four steps, LitServe-style: load the Predictor once at start-up (and pass a warm-up inference before
reporting ready); decode the request into image bytes; predict through a dynamic batcher that feeds
`Predictor.predict` on one inference thread; encode `Prediction.to_dict()` plus the model's identity.

Every bad input is answered by `_error_response`, the one place that maps errors to HTTP codes:

| status | code                                       | when                                                |
| ------ | ------------------------------------------ | --------------------------------------------------- |
| 400    | empty_body, empty_image, invalid_json,     | the request cannot be read as one of the accepted   |
|        | invalid_base64, invalid_multipart,         | shapes (JSON `image`/`input`, multipart `file`,     |
|        | missing_image, too_many_images, ...        | raw `image/*` body)                                 |
| 401    | unauthorized                               | an API key is configured and the request lacks it   |
| 408    | request_timeout                            | the client did not send its body in time            |
| 413    | body_too_large                             | the body exceeds `max_body_bytes` (checked while    |
|        |                                            | reading, before parsing)                            |
| 415    | unsupported_media_type                     | a content type other than JSON, multipart, image/*  |
| 422    | invalid_image, too_many_pixels             | the bytes are not a usable image (not an image,     |
|        |                                            | truncated, unsupported format, decompression bomb)  |
| 422    | invalid_answers                            | an answer about the spot is out of range or not one |
|        |                                            | of its choices (the message names it)               |
| 422    | unknown_field                              | a body field, form field or query parameter that    |
|        |                                            | the route does not know (named; never ignored)      |
| 422    | invalid_request                            | a query parameter of the wrong type (?explain=maybe)|
| 501    | explain_unavailable                        | explain=true, but the model has no heatmap output   |
| 501    | answers_unavailable                        | answers sent, but the model has no adjustments      |
| 503    | timeout, not_ready, shutting_down          | busy past the time limit, still loading, stopping   |
| 500    | internal                                   | a bug (never the client's input): see the log       |

`/` serves the web page (static files in `skinscan/web`, no build step); `?explain=true` on
/v1/predict adds the heatmap (`skinscan.explain`).

Answers about the spot (`skinscan.answers`: age, sex, body_site, diameter_mm, and yes/no/unknown for itch,
grew, hurt, changed, bleed, elevated, skin_cancer_history) travel beside the image: `"answers": {...}` in a
JSON body (per item in a batch: `{"image": ..., "answers": {...}}`; once for a lesion, beside `"images"`),
and in multipart either as form fields named like the answers or as an `answers` field holding the JSON
object (in a batch: one `answers` field per `file`, in order; for a lesion, once). Each known answer's
adjustment comes back in `adjustments`. Anything else (an answer at the top of a JSON body, `?bleed=yes`,
an unknown form field) is a 422 `unknown_field` naming it: input is never ignored silently.

Images stay in memory (multipart bodies are parsed here, never spooled to disk) and never reach the
logs; logs carry the request id, sizes, status and timings only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import hmac
import io
import json
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .answers import ANSWER_FIELDS, QUESTIONS, Answers
from .card import BROWSER_MODEL
from .errors import InvalidAnswers, InvalidImage
from .explain import DEFAULT_MAX_SIDE, HEATMAP_LEGEND, explain, png_bytes
from .lesion import MAX_PHOTOS as MAX_LESION_PHOTOS
from .lesion import combine_photos
from .predict import Decoded, Prediction, Predictor
from .preprocess import MAX_PIXELS
from .private import PrivateBundle, browser_predictor, private_bundle, web_root

log = logging.getLogger("skinscan.service")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode (several workers)

MODEL_ROUTE_NAME = "skinscan"  # the model's name in KServe v2 routes: /v2/models/skinscan
_T = TypeVar("_T")


# ---------------------------------------------------------------- settings
class Settings(BaseSettings):
    """Service settings; each one is also an environment variable `SKINSCAN_<NAME>` and a `serve` flag."""

    model_config = SettingsConfigDict(env_prefix="SKINSCAN_", extra="forbid")

    host: str = Field("127.0.0.1", description="interface to listen on; 0.0.0.0 for all interfaces")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes (each loads the model)")
    model: Path | None = Field(None, description="ONNX model from `skinscan export` (default: the bundled model)")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per worker (default: all cores)")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest request body; larger gets 413")
    max_pixels: int = Field(
        MAX_PIXELS, ge=1, le=MAX_PIXELS, description="largest image (width x height) accepted; decompression bombs"
    )
    max_batch_items: int = Field(32, ge=1, le=1024, description="most images in one /v1/predict/batch request")
    batch_window_ms: float = Field(2.0, ge=0, le=1000, description="how long the batcher waits for more requests")
    max_batch_size: int = Field(8, ge=1, le=256, description="most images in one inference run")
    api_key: SecretStr | None = Field(None, description="if set, /v1, /v2/models and /metrics need this key")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS, comma-separated in the environment"
    )
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="limit for one request, body included")
    browser_model: str = Field(
        BROWSER_MODEL,
        description="model the web page runs on the device (private mode): a path or a bundled model's name; "
        "'none' serves no private mode",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("api_key", mode="after")
    @classmethod
    def _non_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("the API key is empty: unset SKINSCAN_API_KEY to serve without auth, or set a key")
        return value


# ---------------------------------------------------------------- typed responses (also the OpenAPI schema)
class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AdjustmentOut(BaseModel):
    answer: str = Field(description="the answer's name, e.g. bleed")
    value: float | str
    log_odds: float = Field(description="added to the photo's calibrated log-odds")
    odds_ratio: float = Field(description="the odds are multiplied by this")
    label: str = Field(description='for people, e.g. "bleeding: odds x3.1"')


class PredictResponse(BaseModel):
    """`Prediction.to_dict()` (without path/error) plus the model; fields Prediction gains later pass through,
    such as the quality gate's `quality` ("ok" | "retake") and `reasons` (sentences: what to fix)."""

    model_config = ConfigDict(extra="allow")

    probability: float | None = Field(None, description="null when the photo should be retaken (unless force)")
    decision: Literal["refer", "monitor"] | None = None
    threshold: float
    advice: str | None = None
    model: ModelInfo
    timing_ms: dict[str, float]
    adjustments: list[AdjustmentOut] = Field(
        default_factory=list, description="how each known answer moved the estimate (none without answers)"
    )
    image_probability: float | None = Field(None, description="the photo's estimate alone, when answers moved it")
    diagnosis: str | None = Field(
        None,
        description="the kind of lesion the photo looks most like (models with a diagnosis head; null otherwise): "
        "what it resembles, not a diagnosis; the referral advice comes from `probability` alone",
    )
    diagnosis_label: str | None = Field(None, description="`diagnosis` in words, e.g. 'a mole (nevus)'")
    diagnoses: dict[str, float] | None = Field(
        None, description="each kind's probability with every kind counting alike (the training mix divided out)"
    )
    # only with ?explain=true (see skinscan.explain for what the map shows)
    heatmap_png: str | None = Field(
        None,
        description="base64 PNG: the photo (longer side at most 1024 px) with the heatmap of influence blended "
        f"over it: {HEATMAP_LEGEND} (see skinscan.explain)",
    )
    heatmap: list[list[float]] | None = Field(
        None,
        description="the raw, signed class activation map over the centre square (rows x columns, logit units; "
        "positive = evidence for malignancy; its mean is the logit)",
    )


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    probability: float | None = None
    decision: Literal["refer", "monitor"] | None = None
    threshold: float | None = None
    advice: str | None = None
    timing_ms: dict[str, float] | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    model: ModelInfo
    results: list[BatchItem]
    timing_ms: dict[str, float]


# ---------------------------------------------------------------- errors: one place maps them to HTTP
class ApiError(Exception):
    """A client-facing error: HTTP status, a stable machine-readable code and a message saying how to fix it."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _too_many_pixels(width: int, height: int, limit: int) -> ApiError:
    return ApiError(
        422,
        "too_many_pixels",
        f"image is {width}x{height} = {width * height:,} pixels, more than this server's limit of {limit:,}; "
        "send a smaller photo",
    )


def _error_response(request: Request, exc: Exception) -> JSONResponse:
    """Every error response is built here: {error: {code, message}} with the matching HTTP status."""
    headers = None
    if isinstance(exc, ApiError):
        status, code, message, headers = exc.status, exc.code, exc.message, exc.headers
    elif isinstance(exc, InvalidImage):
        status, code, message = 422, "invalid_image", str(exc)
    elif isinstance(exc, InvalidAnswers):
        status, code, message = 422, "invalid_answers", str(exc)
    elif isinstance(exc, RequestValidationError):
        status, code, message = 422, "invalid_request", _validation_message(exc)
    elif isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        headers = getattr(exc, "headers", None)
    else:  # a bug, not the client's fault: say so without leaking internals
        rid = getattr(request.state, "request_id", "-")
        log.error("request %s failed: %s", rid, type(exc).__name__, exc_info=exc)
        status, code, message = 500, "internal", f"internal error (request id {rid}); the operators can see the log"
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(code).inc()
    body = ErrorResponse(error=ErrorDetail(code=code, message=message)).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors (e.g. ?explain=maybe) as one sentence per problem, like every other 4xx."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        where = (
            f"{loc[0]} parameter {'.'.join(loc[1:])!r}"
            if loc[:1] in (["query"], ["path"], ["header"])
            else ".".join(loc)
        )
        got = f" (got {err['input']!r})" if "input" in err else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return "; ".join(parts)[:500] or "invalid request"


# ---------------------------------------------------------------- metrics
class _Metrics:
    """Prometheus metrics in a registry of their own (one per app, so tests can build many apps).

    With several worker processes (`skinscan serve --workers N`) each process writes its values to the
    folder in PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set up by the CLI) and
    `/metrics` adds up every worker's, whichever worker answers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("skinscan_requests", "HTTP requests", ["route", "status"], registry=r)
        self.errors = Counter("skinscan_errors", "error responses by error code", ["code"], registry=r)
        self.latency = Histogram(
            "skinscan_request_seconds",
            "request latency",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.images = Counter("skinscan_images", "images predicted, by outcome", ["outcome"], registry=r)
        self.batch_size = Histogram(
            "skinscan_batch_size", "images per inference run", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.inference = Histogram(
            "skinscan_batch_seconds",
            "decode + inference time of one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        # multiprocess: 1 only when every live worker is ready
        self.ready = Gauge(
            "skinscan_ready", "1 once the model is loaded and warmed up", registry=r, multiprocess_mode="livemin"
        )

    def exposition(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


# ---------------------------------------------------------------- dynamic batching
@dataclass
class _Item:
    photo: Decoded
    future: asyncio.Future[Prediction]
    force: bool = False  # keep the probability of a photo the quality gate refuses
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers concurrent requests into one `Predictor.predict` call on a single inference thread.

    A batch starts with the first queued image and takes whatever else is queued; while other requests
    are still being parsed it waits up to `window_s` for them (never longer than needed: a lone request
    runs at once). The event loop only moves bytes and futures.
    """

    def __init__(self, predictor: Predictor, *, max_batch_size: int, window_s: float, metrics: _Metrics) -> None:
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.metrics = metrics
        self.parsing = 0  # requests read but not yet queued: worth waiting for
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="skinscan-infer")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="skinscan-batcher")

    async def close(self) -> None:
        """Finish every queued image, then stop (graceful shutdown)."""
        self._closing = True
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, photo: Decoded, force: bool = False) -> Prediction:
        """The prediction for a photo decoded by `Predictor.decode` (in the parse pool, in parallel)."""
        if photo.error is not None:  # nothing to infer: the error result at once
            return self.predictor.predict_decoded([photo])[0]
        if self._closing:
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another instance")
        item = _Item(photo, asyncio.get_running_loop().create_future(), force)
        self._queue.put_nowait(item)
        return await item.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    item = self._queue.get_nowait()
                elif self.parsing > 0 and (wait := deadline - loop.time()) > 0:
                    try:
                        item = await asyncio.wait_for(self._queue.get(), wait)
                    except asyncio.TimeoutError:
                        break
                else:
                    break
                if item is None:  # closing: run this batch, then stop
                    stop = True
                    break
                batch.append(item)
            live = [it for it in batch if not it.future.done()]  # a timed-out request cancels its future
            if live:
                await self._infer(loop, live)

    async def _infer(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            preds = await loop.run_in_executor(
                self._executor, lambda: self.predictor.predict_decoded([it.photo for it in items], force=True)
            )  # unforced per item below
        except Exception as exc:
            for it in items:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        self.metrics.batch_size.observe(len(items))
        self.metrics.inference.observe(time.perf_counter() - started)
        for it, pred in zip(items, preds, strict=True):
            if not it.future.done():
                it.future.set_result(pred if it.force else pred.unforced())


# ---------------------------------------------------------------- decode: request -> image bytes
def _b64decode(text: Any, where: str) -> bytes:
    """Base64 with or without padding or line breaks, standard or URL-safe, optionally a data: URL."""
    if not isinstance(text, str):
        raise ApiError(400, "invalid_base64", f"{where} must be a base64 string, not {type(text).__name__}")
    text = text.strip()
    if text[:5].lower() == "data:":
        head, comma, text = text.partition(",")
        if not comma or ";base64" not in head.lower():
            raise ApiError(
                400, "invalid_base64", f"{where}: data: URLs must be base64, e.g. 'data:image/jpeg;base64,/9j/...'"
            )
        mime = head[5:].split(";", 1)[0].strip().lower()
        if mime and not mime.startswith("image/"):
            raise ApiError(415, "unsupported_media_type", f"{where}: data: URL type {mime!r} is not an image/* type")
    compact = "".join(text.split()).rstrip("=")
    if "-" in compact or "_" in compact:
        compact = compact.translate(str.maketrans("-_", "+/"))
    if len(compact) % 4 == 1:
        raise ApiError(400, "invalid_base64", f"{where} is not valid base64 (its length is impossible)")
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, "invalid_base64", f"{where} is not valid base64 (characters outside A-Z a-z 0-9 + /)"
        ) from None
    if not data:
        raise ApiError(400, "empty_image", f"{where} is empty: send the photo's file content, base64-encoded")
    return data


def _json_image(item: Any, where: str, allowed: frozenset[str] = frozenset({"image", "input", "answers"})) -> bytes:
    if isinstance(item, str):
        return _b64decode(item, where)
    if isinstance(item, dict):
        _check_fields(item, allowed, where)
        for key in ("image", "input"):  # "input" is what the prototype's mobile clients send
            if key in item:
                return _b64decode(item[key], f"{where}.{key}")
    raise ApiError(400, "missing_image", f'{where}: expected {{"image": "<base64>"}} (or "input" for older clients)')


def _check_fields(doc: dict, allowed: frozenset[str], where: str) -> None:
    """A JSON object's keys must all be known: an unknown one is a 422 naming it, never ignored."""
    unknown = [k for k in doc if k not in allowed]
    if not unknown:
        return
    name = unknown[0]
    if name in ANSWER_FIELDS and "answers" in allowed:
        hint = f'answers go inside "answers", e.g. {{"answers": {{"{name}": ...}}}}'
    elif (name in ANSWER_FIELDS or name == "answers") and "images" in allowed:  # the top of a batch
        hint = 'a batch takes answers per image: {"images": [{"image": "<base64>", "answers": {...}}, ...]}'
    elif name in ANSWER_FIELDS or name == "answers":  # an item of a lesion
        hint = 'a lesion\'s answers belong to the lesion: send them once, as "answers" beside "images"'
    else:
        hint = f"the fields here are {', '.join(sorted(allowed))}"
    raise ApiError(422, "unknown_field", f"{where}: unknown field {name!r}; {hint}")


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", 'the body is not valid JSON; send {"image": "<base64>"}') from None


def _parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(field name, content) of each part, parsed in memory (Starlette would spool large files to disk)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(
            400, "invalid_multipart", "multipart/form-data without a boundary: let the client library set it"
        )
    parts: list[tuple[str, bytes]] = []
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        parts.append((disp.get(b"name", b"").decode("latin-1"), bytes(state["data"])))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise ApiError(400, "invalid_multipart", f"the multipart body is malformed ({exc})") from None
    if parser.state != MultipartState.END:
        raise ApiError(400, "invalid_multipart", "the multipart body is truncated (no closing boundary)")
    return parts


def _check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse images over the pixel limit from their header, before anything decodes them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        raise ApiError(422, "too_many_pixels", f"image has more than {2 * MAX_PIXELS:,} pixels; refused") from None
    except Exception:  # not readable as an image: the Predictor reports why, in its own words
        return
    if width * height > max_pixels:
        raise _too_many_pixels(width, height, max_pixels)


Route = Literal["one", "batch", "lesion"]
_TOP_FIELDS: dict[str, frozenset[str]] = {
    "one": frozenset({"image", "input", "answers", "force"}),
    "batch": frozenset({"images", "force"}),
    "lesion": frozenset({"images", "answers", "force"}),
}
_ITEM_FIELDS: dict[str, frozenset[str]] = {
    "batch": frozenset({"image", "input", "answers"}),  # answers per image
    "lesion": frozenset({"image", "input"}),  # the lesion's answers are the request's
}


def _images_from_body(
    body: bytes, content_type: str, *, route: Route, max_items: int, options: dict[str, Any] | None = None
) -> list[bytes | ApiError]:
    """The request's images (or, in a batch, a per-item error) from one of the three accepted shapes.
    `options` receives the flags a JSON body sets beside its images (`force`), and the answers: one per
    image for "one" and "batch" (Answers, None, or in a batch a per-item error), one for a "lesion".
    Every field must be known: an unknown one is a 422 naming it (answers are never ignored silently)."""
    options = {} if options is None else options
    mime = _check_content_type(content_type)
    if mime == "application/json" or mime.endswith("+json"):
        doc = _parse_json(body)
        if isinstance(doc, dict):
            _check_fields(doc, _TOP_FIELDS[route], "body")
        if isinstance(doc, dict) and "force" in doc:
            if not isinstance(doc["force"], bool):
                raise ApiError(400, "invalid_request", '"force" must be true or false (a JSON boolean)')
            options["force"] = doc["force"]
        if route != "one":
            items = doc.get("images") if isinstance(doc, dict) else doc
            if not isinstance(items, list):
                raise ApiError(400, "missing_image", 'expected {"images": ["<base64>", ...]} or a JSON list')
            _check_count(len(items), max_items)
            allowed = _ITEM_FIELDS[route]
            if route == "lesion":
                for i, it in enumerate(items):
                    if isinstance(it, dict):
                        _check_fields(it, allowed, f"images[{i}]")
                options["answers"] = [_answers(doc.get("answers") if isinstance(doc, dict) else None, "answers")]
            else:
                options["answers"] = [
                    _catch(_answers, it.get("answers"), f"images[{i}].answers") if isinstance(it, dict) else None
                    for i, it in enumerate(items)
                ]
            return [_catch(_json_image, it, f"images[{i}]", allowed) for i, it in enumerate(items)]
        if not isinstance(doc, dict):
            raise ApiError(400, "missing_image", 'expected a JSON object {"image": "<base64>"}')
        options["answers"] = [_answers(doc.get("answers"), "answers")]
        return [_json_image(doc, "body", _TOP_FIELDS["one"])]
    if mime == "multipart/form-data":
        parts = _parse_multipart(body, content_type)
        wanted = ("file",) if route == "one" else ("file", "files")
        known = {*wanted, "answers", *(ANSWER_FIELDS if route != "batch" else ())}
        unknown = next((name for name, _ in parts if name not in known), None)
        if unknown is not None:
            hint = (
                "a batch takes answers per file: one 'answers' field (JSON) per 'file'"
                if unknown in ANSWER_FIELDS
                else f"the fields here are {', '.join(sorted(known - set(ANSWER_FIELDS)))} and the answers"
            )
            raise ApiError(422, "unknown_field", f"unknown form field {unknown!r}; {hint}")
        files = [data for name, data in parts if name in wanted]
        if not files:
            raise ApiError(400, "missing_image", "multipart upload without a 'file' field: send the photo as 'file'")
        if route != "one":
            _check_count(len(files), max_items)
        elif len(files) > 1:
            raise ApiError(400, "too_many_images", "one 'file' per request here; use /v1/predict/batch for several")
        options["answers"] = _form_answers(parts, len(files), route == "batch")
        return [d if d else ApiError(400, "empty_image", "the uploaded file is empty (0 bytes)") for d in files]
    _check_content_type(content_type)
    return [body]  # a raw image/* body


def _answers(value: Any, where: str) -> Answers | None:
    """A JSON `answers` object (absent or null: none). A bad value is a 422 naming the answer."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_answers", f'{where} must be an object, e.g. {{"age": 67, "bleed": "yes"}}')
    try:
        return Answers.from_mapping(value, where)
    except InvalidAnswers as exc:
        raise ApiError(422, "invalid_answers", str(exc)) from None


def _form_answers(parts: list[tuple[str, bytes]], n_files: int, batch: bool) -> list[Answers | ApiError | None]:
    """Answers from multipart fields: one form field per answer (`age`, `bleed`...) or an `answers` field
    with the JSON object; in a batch, one `answers` field per file, in order (an empty one: no answers)."""
    blobs = [data for name, data in parts if name == "answers"]
    fields = {name: data for name, data in parts if name in ANSWER_FIELDS}
    if batch:
        if fields:
            raise ApiError(
                400, "invalid_answers", "a batch takes answers per file: one 'answers' field (JSON) per 'file'"
            )
        if blobs and len(blobs) != n_files:
            raise ApiError(
                400, "invalid_answers", f"{len(blobs)} 'answers' field(s) for {n_files} file(s): send one per file"
            )
        return [_catch(_answers_field, b, f"answers[{i}]") for i, b in enumerate(blobs)] or [None] * n_files
    if len(blobs) > 1:
        raise ApiError(
            400, "invalid_answers", "one 'answers' field per request here (a lesion's answers belong to the lesion)"
        )
    values = {}
    if blobs:
        values = _answers_field(blobs[0], "answers")
        values = values.model_dump() if values is not None else {}
        values = {k: v for k, v in values.items() if v is not None and v != "unknown"}
    for name, data in fields.items():
        if name in values:
            raise ApiError(400, "invalid_answers", f"{name} is given twice: as a form field and in 'answers'")
        values[name] = data.decode("utf-8", errors="replace")
    return [_answers(values, "answers") if values else None]


def _answers_field(data: bytes, where: str) -> Answers | None:
    text = data.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise ApiError(422, "invalid_answers", f'{where} is not a JSON object, e.g. {{"age": 67}}') from None
    return _answers(value, where)


def _check_content_type(content_type: str) -> str:
    """The body's MIME type if the service accepts it, else 415 with what to send instead."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if (
        mime in ("application/json", "multipart/form-data", "application/octet-stream")
        or mime.endswith("+json")
        or (mime.startswith("image/") and len(mime) > 6)
    ):
        return mime
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {mime or '(none)'!r} is not accepted: send application/json "
        '{"image": "<base64>"}, multipart/form-data with a \'file\' field, or the raw photo as image/jpeg etc.',
    )


def _check_count(n: int, max_items: int) -> None:
    if n == 0:
        raise ApiError(400, "missing_image", "the batch is empty: send at least one image")
    if n > max_items:
        raise ApiError(400, "too_many_images", f"{n} images in one batch; this server accepts at most {max_items}")


def _catch(fn: Callable[..., _T], *args: Any) -> _T | ApiError:
    try:
        return fn(*args)
    except ApiError as exc:
        return exc


# ---------------------------------------------------------------- encode: Prediction -> JSON
def _encode(pred: Prediction, extra_timing: dict[str, float]) -> dict[str, Any]:
    body = pred.to_dict()
    body.pop("path", None)  # file names can carry patient names: never echoed
    body.pop("error", None)
    body.pop("logit", None)
    body["timing_ms"] = {**body.pop("timings_ms", {}), **{k: round(v, 3) for k, v in extra_timing.items()}}
    return body


def _as_error(pred: Prediction) -> ApiError:
    return ApiError(422, "invalid_image", pred.error or "the image could not be read")


# ---------------------------------------------------------------- request plumbing
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds `limit` (declared or actual), before any parsing."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise _body_too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _body_too_large(len(body), limit)
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty: send an image (JSON, multipart or raw)")
    return bytes(body)


def _body_too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"request body of {size:,}+ bytes exceeds this server's limit of {limit:,} bytes"
    )


async def _within(coro: Awaitable[_T], seconds: float, on_timeout: ApiError) -> _T:
    try:
        return await asyncio.wait_for(coro, max(seconds, 0.001))
    except asyncio.TimeoutError:
        raise on_timeout from None


def _request_id(scope_headers: Sequence[tuple[bytes, bytes]]) -> str:
    for key, value in scope_headers:
        if key == b"x-request-id" and 0 < len(value) <= 64 and value.isascii() and value.decode().isprintable():
            return value.decode()
    return uuid.uuid4().hex


class _RequestLog:
    """ASGI middleware: request id (X-Request-ID in and out), one log line and metrics per request."""

    _ROUTES = frozenset(
        {
            "/v1/predict",
            "/v1/predict/batch",
            "/v1/predict/lesion",
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/metrics",
        }
        | {f"/v2/models/{MODEL_ROUTE_NAME}", f"/v2/models/{MODEL_ROUTE_NAME}/ready"}
    )

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _request_id(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = rid
        started, status, received = time.perf_counter(), 500, 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = scope["path"] if scope["path"] in self._ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            log.info("%s %s %s %d %dB %.1fms", rid, scope["method"], route, status, received, seconds * 1000)


@dataclass
class _State:
    settings: Settings
    metrics: _Metrics
    predictor: Predictor | None = None
    batcher: Batcher | None = None
    ready: bool = False
    pool: ThreadPoolExecutor | None = None
    bundle: PrivateBundle | None = None  # private mode's files, built on the first request for them


def _warm_up(predictor: Predictor, max_batch_size: int) -> None:
    """One batch of 1 and one of the largest size: proves the model runs and sizes ONNX Runtime's buffers."""
    buf = io.BytesIO()
    Image.new("RGB", (predictor.spec.size, predictor.spec.size), (180, 140, 120)).save(buf, "PNG")
    for n in sorted({1, max_batch_size}):
        preds = predictor.predict([buf.getvalue()] * n, batch_size=n, force=True)  # a flat image: a retake
        bad = [p for p in preds if not p.ok or p.probability is None or not math.isfinite(p.probability)]
        if bad:
            raise RuntimeError(f"warm-up inference failed: {bad[0].error or bad[0].probability}")


# ---------------------------------------------------------------- the app
_IMAGE_B64 = {"type": "string", "description": "base64 image, or a data:image/...;base64, URL"}
_FORCE = {"type": "boolean", "description": "predict a photo the quality gate refuses, too (as ?force=true)"}


def _answers_schema(description: str) -> dict[str, Any]:
    schema = Answers.model_json_schema()
    return {**schema, "description": description}


_MULTIPART_ANSWERS = {
    "answers": {"type": "string", "description": 'the answers as one JSON object, e.g. {"age": 67}'},
    **{name: {"type": "string", "description": question} for name, question in QUESTIONS.items()},
}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "image": _IMAGE_B64,
                        "input": {"type": "string", "description": "same as image (prototype clients)"},
                        "answers": _answers_schema(
                            "optional answers about the spot; each known one adjusts the estimate"
                        ),
                        "force": _FORCE,
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        **_MULTIPART_ANSWERS,
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _images_body(item_answers: bool, lesion_answers: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": {"image": _IMAGE_B64}}
    if item_answers:
        item["properties"]["answers"] = _answers_schema("this image's answers")
    json_props: dict[str, Any] = {"images": {"type": "array", "items": {"anyOf": [_IMAGE_B64, item]}}, "force": _FORCE}
    form_props: dict[str, Any] = {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}
    if lesion_answers:
        json_props["answers"] = _answers_schema("the lesion's answers: they adjust the combined estimate once")
        form_props.update(_MULTIPART_ANSWERS)
    else:
        form_props["answers"] = {
            "type": "array",
            "items": {"type": "string"},
            "description": "one JSON object per file, in order (empty: none)",
        }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": False, "properties": json_props}
                },
                "multipart/form-data": {"schema": {"type": "object", "properties": form_props}},
            },
        }
    }


_BATCH_BODY = _images_body(item_answers=True, lesion_answers=False)
_LESION_BODY = _images_body(item_answers=False, lesion_answers=True)
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 408, 413, 415, 422, 501, 503)}
# The page may load only what skinscan serves (photos stay in the browser as blob: and data: URLs).
# Private mode: 'wasm-unsafe-eval' lets ONNX Runtime Web compile its WebAssembly; cross-origin isolation
# (COOP + COEP) gives it SharedArrayBuffer, so it runs on several threads.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
    "img-src 'self' blob: data:; connect-src 'self' blob: data:; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable", "Cross-Origin-Resource-Policy": "same-origin"}
_WORKER_HEADERS = {
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def create_app(settings: Settings | None = None, *, predictor: Predictor | None = None) -> FastAPI:
    """The FastAPI app. The model loads (or `predictor` is adopted) and warms up in the lifespan start-up."""
    settings = settings or Settings()
    metrics = _Metrics()
    state = _State(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        state.pool = ThreadPoolExecutor(thread_name_prefix="skinscan-parse")
        state.predictor = predictor or await loop.run_in_executor(
            None, lambda: Predictor(settings.model, threads=settings.threads)
        )
        await loop.run_in_executor(None, _warm_up, state.predictor, settings.max_batch_size)
        state.batcher = Batcher(
            state.predictor,
            max_batch_size=settings.max_batch_size,
            window_s=settings.batch_window_ms / 1000,
            metrics=metrics,
        )
        state.batcher.start()
        state.ready = True
        metrics.ready.set(1)
        info = state.predictor.info()
        log.info("model %s %s (sha256 %s) ready", info["name"], info["version"], info["sha256"][:12])
        try:
            yield
        finally:
            state.ready = False
            metrics.ready.set(0)
            await state.batcher.close()  # in-flight requests already finished; drain anything left
            state.pool.shutdown(wait=True)
            log.info("stopped")

    app = FastAPIOffline(  # /docs with Swagger UI's files from the fastapi-offline package: no CDN
        static_url="/docs-assets",
        redoc_url=None,
        title="skinscan",
        version=__version__,
        description="Malignancy-risk screening of skin-lesion photos. A screening aid, not a diagnosis.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.service = state
    for exc_type in (ApiError, InvalidImage, InvalidAnswers, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, _error_response)  # type: ignore[arg-type]
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(_RequestLog, metrics=metrics)  # outermost: it sees every response, CORS ones included

    def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not given and scheme.lower() == "bearer":
            given = token.strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def service() -> tuple[Predictor, Batcher]:
        if not state.ready or state.predictor is None or state.batcher is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet; retry when /v2/health/ready says 200")
        return state.predictor, state.batcher

    async def take_images(
        request: Request, *, route: Route, query: frozenset[str] = frozenset({"force"})
    ) -> tuple[list[bytes | ApiError], list[Decoded | ApiError], float, bool, list[Answers | ApiError | None]]:
        """Read (with the size limit) and parse the body, and decode its photos, in the parse pool; returns
        the image bytes, the decoded photos, the deadline, the JSON body's `force` flag and the answers."""
        unknown = next((k for k in request.query_params if k not in query), None)
        if unknown is not None:
            where = " (answers travel in the body, not the query)" if unknown in ANSWER_FIELDS else ""
            raise ApiError(
                422,
                "unknown_field",
                f"unknown query parameter {unknown!r}{where}; the parameters here are {', '.join(sorted(query))}",
            )
        started = time.perf_counter()
        deadline = started + settings.request_timeout_s
        _, batcher = service()
        content_type = request.headers.get("content-type", "")
        _check_content_type(content_type)  # before reading a body we would refuse anyway
        body = await _within(
            _read_body(request, settings.max_body_bytes),
            deadline - time.perf_counter(),
            ApiError(408, "request_timeout", f"the body did not arrive within {settings.request_timeout_s:g} s"),
        )
        batcher.parsing += 1
        options: dict[str, Any] = {}
        try:
            loop = asyncio.get_running_loop()
            predictor = state.predictor

            def parse() -> tuple[list[bytes | ApiError], list[Decoded | ApiError]]:
                images = [
                    _catch(_checked, im, settings.max_pixels) if isinstance(im, bytes) else im
                    for im in _images_from_body(
                        body, content_type, route=route, max_items=settings.max_batch_items, options=options
                    )
                ]
                return images, [predictor.decode(im) if isinstance(im, bytes) else im for im in images]

            images, photos = await loop.run_in_executor(state.pool, parse)
        finally:
            batcher.parsing -= 1
        answers = options.get("answers") or [None] * len(images)
        given = any(isinstance(a, Answers) and not a.empty for a in answers)
        if given and state.predictor is not None and state.predictor.answers_section is None:
            raise ApiError(
                501,
                "answers_unavailable",
                "this server's model has no adjustments for answers: send the photo without answers",
            )
        return images, photos, deadline, options.get("force", False), answers

    async def predict_all(
        photos: list[Decoded | ApiError], deadline: float, force: bool = False
    ) -> list[Prediction | ApiError]:
        _, batcher = service()
        timeout = ApiError(
            503, "timeout", f"no answer within {settings.request_timeout_s:g} s: the server is busy, retry later"
        )

        async def one(photo: Decoded | ApiError) -> Prediction | ApiError:
            return photo if isinstance(photo, ApiError) else await batcher.submit(photo, force)

        return await _within(asyncio.gather(*(one(p) for p in photos)), deadline - time.perf_counter(), timeout)

    protected = [Depends(require_key)]

    @app.post(
        "/v1/predict",
        summary="Predict one photo (JSON base64, multipart 'file', or raw image/* body)",
        response_model=PredictResponse,
        responses=_ERRORS,  # type: ignore[arg-type]
        openapi_extra=_PREDICT_BODY,
        dependencies=protected,
    )
    async def predict(request: Request, explain: bool = False, force: bool = False) -> JSONResponse:
        """`?explain=true` adds `heatmap_png` and `heatmap`: the regions that drove the prediction.
        A photo the quality gate refuses is a 200 answer with `quality: "retake"`, its `reasons` and no
        probability; `?force=true` (or `"force": true` in a JSON body) adds the probability anyway."""
        started = time.perf_counter()
        images, photos, deadline, body_force, answers = await take_images(
            request, route="one", query=frozenset({"explain", "force"})
        )
        (result,) = await predict_all(photos, deadline, force or body_force)
        if isinstance(result, ApiError):
            raise result
        if not result.ok:
            raise _as_error(result)
        predictor, _ = service()
        result = _adjusted(predictor, result, answers[0])
        metrics.images.labels("retake" if result.quality == "retake" else "ok").inc()
        heatmap: dict[str, Any] = {}
        timing: dict[str, float] = {}
        if explain:
            t = time.perf_counter()
            heatmap = await asyncio.get_running_loop().run_in_executor(state.pool, _heatmap, images[0], result)
            timing["explain"] = (time.perf_counter() - t) * 1000
        body = _encode(result, {**timing, "total": (time.perf_counter() - started) * 1000})
        body["model"] = predictor.info()
        # exclude_unset: the heatmap fields appear only when asked for
        return JSONResponse(PredictResponse(**body, **heatmap).model_dump(exclude_unset=True))

    @app.post(
        "/v1/predict/batch",
        summary="Predict several photos: JSON {'images': [...]} or multipart 'file' fields; per-item errors",
        response_model=BatchResponse,
        responses=_ERRORS,  # type: ignore[arg-type]
        openapi_extra=_BATCH_BODY,
        dependencies=protected,
    )
    async def predict_batch(request: Request, force: bool = False) -> JSONResponse:
        """Per item: a prediction, a photo to retake (`quality: "retake"`; `force` as in /v1/predict), or an error."""
        started = time.perf_counter()
        _, photos, deadline, body_force, answers = await take_images(request, route="batch")
        results = await predict_all(photos, deadline, force or body_force)
        predictor, _ = service()
        items = []
        for i, r in enumerate(results):
            err = r if isinstance(r, ApiError) else (None if r.ok else _as_error(r))
            if err is None and isinstance(answers[i], ApiError):
                err = answers[i]  # bad answers fail their item alone, as a bad image does
            elif err is None:
                r = _adjusted(predictor, r, answers[i])
            if err is not None:
                metrics.images.labels("error").inc()
                metrics.errors.labels(err.code).inc()
                items.append({"index": i, "error": {"code": err.code, "message": err.message}})
            else:
                metrics.images.labels("retake" if r.quality == "retake" else "ok").inc()
                items.append({"index": i, **_encode(r, {})})
        timing = {"total": round((time.perf_counter() - started) * 1000, 3)}
        return JSONResponse(
            BatchResponse(model=predictor.info(), results=items, timing_ms=timing).model_dump(exclude_none=True)
        )

    @app.post(
        "/v1/predict/lesion",
        summary="Several photos of ONE lesion (as /v1/predict/batch): a combined estimate plus each photo's",
        responses=_ERRORS,  # type: ignore[arg-type]
        openapi_extra=_LESION_BODY,
        dependencies=protected,
    )
    async def predict_lesion(request: Request, force: bool = False) -> JSONResponse:
        """The photos' logits are averaged over those the quality gate accepts (all, with `force`); answers
        (the first item's) adjust the combined estimate once. Unreadable photos are set aside with a reason."""
        started = time.perf_counter()
        images, photos, deadline, body_force, answers = await take_images(request, route="lesion")
        if len(images) > MAX_LESION_PHOTOS:
            raise ApiError(400, "too_many_images", f"a lesion takes at most {MAX_LESION_PHOTOS} photos")
        (lesion_answers,) = answers  # one set for the lesion
        if isinstance(lesion_answers, ApiError):
            raise lesion_answers
        results = await predict_all(photos, deadline, force or body_force)
        predictor, _ = service()
        photos = [
            Prediction(None, None, None, None, error=r.message) if isinstance(r, ApiError) else r for r in results
        ]
        body = combine_photos(predictor, photos, lesion_answers).to_dict()
        return JSONResponse(
            {
                **body,
                "model": predictor.info(),
                "timing_ms": {"total": round((time.perf_counter() - started) * 1000, 3)},
            }
        )

    @app.get("/v2/health/live", summary="KServe v2 liveness: the process answers")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", summary="KServe v2 readiness: model loaded and warm-up inference passed")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)

    @app.get("/v2", summary="KServe v2 server metadata")
    async def server_metadata() -> dict:
        return {"name": "skinscan", "version": __version__, "extensions": []}

    @app.get(f"/v2/models/{MODEL_ROUTE_NAME}", summary="KServe v2 model metadata", dependencies=protected)
    async def model_metadata() -> dict:
        predictor, _ = service()
        card = predictor.card
        return {
            "name": MODEL_ROUTE_NAME,
            "versions": [card.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "probability", "datatype": "FP64", "shape": [-1]},
                {"name": "decision", "datatype": "BYTES", "shape": [-1]},
            ],
            "model": predictor.info(),
            "threshold": card.threshold,
            # calibration per detected photo type (null: one temperature and threshold for every photo)
            "photo_types": predictor.photo_type_calibration(),
            "preprocessing": card.spec.to_dict(),
            "intended_use": card.intended_use,
            # the answers this model can use beside the photo (null: none; see skinscan.answers)
            "answers": list(ANSWER_FIELDS) if predictor.answers_section is not None else None,
        }

    @app.get(f"/v2/models/{MODEL_ROUTE_NAME}/ready", summary="KServe v2 model readiness", dependencies=protected)
    async def model_ready() -> JSONResponse:
        return JSONResponse({"name": MODEL_ROUTE_NAME, "ready": state.ready}, status_code=200 if state.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=protected)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # the web page: static files shipped in the package, no build step, nothing loaded from elsewhere
    web = _web_root()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(web / "index.html", headers=_PAGE_HEADERS)

    @app.get("/sw.js", include_in_schema=False)
    async def service_worker() -> FileResponse:
        return FileResponse(web / "sw.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @app.get("/manifest.webmanifest", include_in_schema=False)
    async def web_manifest() -> FileResponse:
        return FileResponse(web / "manifest.webmanifest", media_type="application/manifest+json")

    runtime_wasm = web / "vendor" / "onnxruntime-web" / "ort-wasm-simd-threaded.wasm.gz"

    @app.get("/web/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm", include_in_schema=False)
    async def runtime(request: Request) -> Response:
        # stored gzipped in the package (3.8 MB instead of 14.8 MB); sent as it is to every browser that says
        # it takes gzip (all do), unpacked for a client that does not
        data = runtime_wasm.read_bytes()
        headers = {**_IMMUTABLE, "Vary": "Accept-Encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(data, media_type="application/wasm", headers={**headers, "Content-Encoding": "gzip"})
        return Response(gzip.decompress(data), media_type="application/wasm", headers=headers)

    @app.get("/web/vendor/onnxruntime-web/ort-wasm-simd-threaded.mjs", include_in_schema=False)
    async def runtime_worker() -> FileResponse:
        # the runtime starts its threads as module workers of this script: under the page's COEP a worker's
        # script must declare COEP itself, or Chromium blocks it (net::ERR_BLOCKED_BY_RESPONSE)
        return FileResponse(
            runtime_wasm.with_name("ort-wasm-simd-threaded.mjs"), media_type="text/javascript", headers=_WORKER_HEADERS
        )

    def private() -> PrivateBundle:
        if settings.browser_model.lower() == "none":
            raise ApiError(404, "no_private_mode", "this server serves no private mode (browser_model is 'none')")
        if state.bundle is None:
            predictor_, _ = service()
            state.bundle = private_bundle(browser_predictor(settings.browser_model, predictor_))
        return state.bundle

    @app.get("/private/model.json", include_in_schema=False)
    async def private_manifest() -> Response:
        bundle = await asyncio.get_running_loop().run_in_executor(None, private)
        return Response(bundle.manifest_bytes, media_type="application/json", headers={"Cache-Control": "no-cache"})

    @app.get("/private/{folder}/{name}", include_in_schema=False)
    async def private_file(folder: str, name: str) -> Response:
        bundle = await asyncio.get_running_loop().run_in_executor(None, private)
        data = bundle.files.get(f"private/{folder}/{name}")
        if data is None:
            raise ApiError(404, "not_found", f"no private-mode file {folder}/{name}: fetch /private/model.json first")
        return Response(data, media_type="application/octet-stream", headers=_IMMUTABLE)

    app.mount("/web", StaticFiles(directory=web), name="web")
    return app


def _adjusted(predictor: Predictor, pred: Prediction, answers: Answers | ApiError | None) -> Prediction:
    """The prediction with its answers' adjustments (after the batcher: the image's inference is shared)."""
    return predictor.adjust(pred, answers) if isinstance(answers, Answers) else pred


def _heatmap(data: bytes | ApiError, pred: Prediction) -> dict[str, Any]:
    """The `explain=true` fields: overlay PNG (base64) and raw map; none for a photo to retake (no map)."""
    if pred.cam is None:
        if pred.probability is None:
            return {}
        raise ApiError(
            501,
            "explain_unavailable",
            "this server's model has no heatmap output (`cam`): re-export it, or drop explain",
        )
    if isinstance(data, ApiError):  # cannot happen: the image predicted fine
        raise data
    png = png_bytes(explain(data, pred, max_side=DEFAULT_MAX_SIDE))
    return {"heatmap_png": base64.b64encode(png).decode(), "heatmap": np.round(pred.cam.astype(np.float64), 4).tolist()}


def _web_root() -> Path:
    return web_root()


def _checked(data: bytes, max_pixels: int) -> bytes:
    _check_pixels(data, max_pixels)
    return data


def create_app_from_env() -> FastAPI:
    """uvicorn factory for several workers: each worker process reads `SKINSCAN_*` and loads its model."""
    return create_app(Settings())
