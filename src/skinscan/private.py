"""Private mode: what the web page needs to check a photo on the device, as files.

The page fetches `private/model.json` (no-cache), then the files it names under `private/<sha12>/`: the
model, the `before` and `after` graphs (skinscan.graphs, built from the model's card) and nothing else; the
runtime is ONNX Runtime Web under `web/vendor/`. Files under `private/<sha12>/` never change (their name
holds the model's hash), so the service worker keeps them until a model with another hash replaces them.
`skinscan serve` serves these files; `skinscan site OUT` writes them with the page as a static site.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .card import ADVICE, BROWSER_MODEL, resolve_model
from .graphs import MEASURES, PROBLEM_ORDER
from .predict import Predictor
from .preprocess import DECODE_SIDE_FACTOR
from .quality import REASONS

RUNTIME = "web/vendor/onnxruntime-web"


@dataclass(frozen=True)
class PrivateBundle:
    """`model.json` and the files it names, by path relative to the site's root."""

    manifest: dict
    files: dict[str, bytes]

    @property
    def manifest_bytes(self) -> bytes:
        return json.dumps(self.manifest, indent=1).encode()


def private_bundle(predictor: Predictor, *, server: bool = True) -> PrivateBundle:
    """The private-mode files of `predictor`'s model. `server`: whether a skinscan server answers beside
    the page (false for a static site: the page then offers no server checks)."""
    folder = f"private/{predictor.sha256[:12]}"
    files = {
        f"{folder}/model.onnx": predictor.model_path.read_bytes(),
        f"{folder}/before.onnx": predictor.graph_bytes["before"],
        f"{folder}/after.onnx": predictor.graph_bytes["after"],
    }
    thresholds = predictor.gate.thresholds
    manifest = {
        "name": predictor.card.name,
        "version": predictor.card.version,
        "sha256": predictor.sha256,
        "model": f"{folder}/model.onnx",
        "before": f"{folder}/before.onnx",
        "after": f"{folder}/after.onnx",
        "bytes": {path: len(data) for path, data in files.items()},
        "input_name": predictor.card.input_name,
        "size": predictor.spec.size,
        "max_side_factor": DECODE_SIDE_FACTOR,
        "measures": list(MEASURES),
        "problems": list(PROBLEM_ORDER),
        "reasons": {code: REASONS[code] for code in PROBLEM_ORDER},
        "min_side": thresholds.min_side,
        "advice": ADVICE,
        "photo_types": predictor.photo_types is not None,
        "has_ood": predictor.gate.ood is not None,
        "runtime": runtime_version(),
        "server": server,
    }
    return PrivateBundle(manifest, files)


def browser_predictor(model: str | Path | None, server_predictor: Predictor | None) -> Predictor:
    """The Predictor of the model the page runs (reusing the server's when it is the same file)."""
    path = resolve_model(model or BROWSER_MODEL)
    if server_predictor is not None and path.resolve() == server_predictor.model_path.resolve():
        return server_predictor
    return Predictor(path, threads=1)


def web_root() -> Path:
    return Path(str(resources.files("skinscan").joinpath("web")))


def runtime_version() -> str:
    return (web_root() / "vendor" / "onnxruntime-web" / "VERSION").read_text().strip()


def write_site(out: Path, model: str | Path | None = None) -> list[Path]:
    """The page as a static site in `out`: index.html, manifest, service worker, web/ (the runtime's .wasm
    written out plain) and private/: serve the folder with any static file server; no Python needed."""
    out = Path(out)
    web = web_root()
    bundle = private_bundle(browser_predictor(model, None), server=False)
    written: list[Path] = []

    def put(rel: str, data: bytes) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)

    for src in sorted(web.rglob("*")):
        if not src.is_file() or "__pycache__" in src.parts:
            continue
        rel = src.relative_to(web).as_posix()
        if rel in ("index.html", "sw.js", "manifest.webmanifest"):
            put(rel, src.read_bytes())  # at the site's root: the service worker's scope is the whole site
        elif rel.endswith(".wasm.gz"):
            put(f"web/{rel[: -len('.gz')]}", gzip.decompress(src.read_bytes()))
        else:
            put(f"web/{rel}", src.read_bytes())
    put("private/model.json", bundle.manifest_bytes)
    for rel, data in bundle.files.items():
        put(rel, data)
    return written
