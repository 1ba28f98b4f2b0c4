"""Private mode's pieces that need no browser: the vendored ONNX Runtime Web files."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "src" / "skinscan" / "web" / "vendor" / "onnxruntime-web"


def test_vendored_runtime_matches_its_checksums() -> None:
    lines = [ln.split() for ln in (VENDOR / "SHA256SUMS").read_text().splitlines() if not ln.startswith("#")]
    assert {name for _, name in lines} == {
        "ort.wasm.min.mjs",
        "ort-wasm-simd-threaded.mjs",
        "ort-wasm-simd-threaded.wasm",
    }
    for digest, name in lines:
        path = VENDOR / name
        data = path.read_bytes() if path.exists() else gzip.decompress((VENDOR / f"{name}.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == digest, name
    assert "MIT License" in (VENDOR / "LICENSE").read_text()
    version = (VENDOR / "VERSION").read_text().strip()
    assert version in (VENDOR / "SHA256SUMS").read_text()
    assert f'VERSION = "{version}"' in (VENDOR.parents[3].parent / "scripts" / "refresh_onnxruntime_web.py").read_text()
