"""Refresh the vendored ONNX Runtime Web files from npm at a pinned version (needs `npm`; run by hand).

    python scripts/refresh_onnxruntime_web.py            # the pinned VERSION below
    python scripts/refresh_onnxruntime_web.py 1.32.0     # another version (then update VERSION here)

Writes src/skinscan/web/vendor/onnxruntime-web/: only what the page needs, the WebAssembly build with SIMD
and threads (one .wasm that also runs single-threaded where the page is not cross-origin isolated), its
loader and the wasm-only ES module API. WebGPU/JSEP builds (29 MB) are left out. The .wasm is stored
gzipped (3.8 MB instead of 14.8 MB: the repository travels to GPU machines under 64 MiB); `skinscan serve`
sends it with `Content-Encoding: gzip` and `skinscan site` writes it out plain for static hosting.
SHA256SUMS holds the checksums of the files as npm ships them (the .wasm before gzip) and the tarball's
npm integrity; tests/test_private_mode.py checks the vendored files against it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "1.31.1"
PACKAGE = "onnxruntime-web"
FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
GZIPPED = ("ort-wasm-simd-threaded.wasm",)
DEST = Path(__file__).resolve().parents[1] / "src" / "skinscan" / "web" / "vendor" / PACKAGE
# The npm package carries no licence file; its package.json says MIT. This is ONNX Runtime's licence text.
LICENSE = """MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def main(version: str = VERSION) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["npm", "pack", f"{PACKAGE}@{version}", "--json"], cwd=tmp, check=True, capture_output=True, text=True
        )
        info = json.loads(out.stdout)[0]
        tarball = Path(tmp) / info["filename"]
        algo, _, digest = info["integrity"].partition("-")
        if hashlib.new(algo, tarball.read_bytes()).digest() != base64.b64decode(digest):
            sys.exit(f"error: {tarball.name} does not match npm's integrity {info['integrity']}")
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        dist = Path(tmp) / "package" / "dist"
        if DEST.exists():
            shutil.rmtree(DEST)
        DEST.mkdir(parents=True)
        sums = []
        for name in FILES:
            data = (dist / name).read_bytes()
            sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
            if name in GZIPPED:  # mtime 0: the same bytes on every refresh
                (DEST / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
            else:
                (DEST / name).write_bytes(data)
    (DEST / "LICENSE").write_text(LICENSE)
    (DEST / "SHA256SUMS").write_text(
        f"# {PACKAGE} {version} from npm (integrity {info['integrity']}); "
        "checksums of the files as shipped (.wasm before gzip)\n" + "\n".join(sums) + "\n"
    )
    (DEST / "VERSION").write_text(version + "\n")
    print(f"{PACKAGE} {version} -> {DEST}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
