"""Private mode in a real browser (Debian's Chromium, Playwright): photos checked on the device agree with
the server's results for the same bytes and the same model file; nothing but GETs leaves the page and the
server predicts nothing meanwhile; after one visit the page checks a photo offline with the server gone.
Needs .ci/install-browser (skips without it, fails in CI)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_process import start_serve, stop_serve
from skinscan.card import default_model_path
from skinscan.explain import influence
from skinscan.predict import Predictor
from test_web import browser  # noqa: F401  (the browser fixture)

REPO = Path(__file__).resolve().parents[1]
RESULT = ".outcome, .error-box"
MODEL = default_model_path()  # parity: the same model file on both sides
HEATMAP_TOLERANCE = 0.15  # largest difference of one cell of the influence map (0-1)...


def _map_jitter(predictor, path: Path) -> float:
    """...unless the model's own map moves more than that when the same photo is re-saved as a JPEG of
    quality 95 (an imperceptible change): the browser's JPEG decoder and resize are not Pillow's, so its
    map can differ from the server's as much as the server's differs from itself. Measured here: on one
    phone photo the default model's map moves by 0.45 under such a re-save."""
    import io

    from PIL import Image

    from skinscan.preprocess import load_pixels, normalise

    with Image.open(path) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=95)
    cams = [
        predictor.run(normalise(load_pixels(src, predictor.spec)[None], predictor.spec))["cam"][0]
        for src in (path, io.BytesIO(buf.getvalue()))
    ]
    return float(np.abs(influence(cams[0]) - influence(cams[1])).max())


def _server(model: Path = MODEL) -> tuple:
    return start_serve(model, args=("--browser-model", str(model)))


@pytest.fixture(scope="module")
def server():
    proc, url = _server()
    yield url
    stop_serve(proc)


def _predictions(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(v) for v in re.findall(r'^skinscan_requests_total\{[^}]*route="/v1/[^}]*\} ([0-9.e+]+)$', text, re.M)
    )


def _photos(tmp: Path, data_root: Path) -> list[Path]:
    archive = sorted((data_root / "isic-mvb" / "test").glob("*/*.jpg"))[::60][:10]
    phone = sorted((data_root / "pad-ufes-20-phone" / "images").glob("*.jpg"))[::50][:10]
    src = Image.open(REPO / "examples" / "phone-malignant-bcc.jpg").convert("RGB")
    big = tmp / "twelve-megapixel.jpg"
    src.resize((4000, 3000), Image.BICUBIC).save(big, quality=92)
    rotated = tmp / "exif-rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the stored pixels are the upright photo turned back
    src.transpose(Image.ROTATE_90).save(rotated, exif=exif, quality=95)
    return [*archive, *phone, big, rotated]


class DevicePage:
    def __init__(self, chromium, url: str) -> None:
        self.context = chromium.new_context()
        self.context.set_default_timeout(120_000)
        self.page = self.context.new_page()
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url + "/")
        self.page.wait_for_selector("html[data-ready='true']")

    def check(self, path: Path) -> dict:
        self.page.click("#restart-button") if self.page.is_visible("#restart-button") else None
        self.page.set_input_files("#file-input", str(path))
        el = self.page.wait_for_selector(".outcome, .error-box")
        attrs = self.page.evaluate("(el) => Object.assign({}, el.dataset)", el)
        return attrs


@pytest.mark.data
def test_device_checks_agree_with_the_server_and_send_nothing(browser, server, data_root, tmp_path) -> None:  # noqa: F811
    photos = _photos(tmp_path, data_root)
    page = DevicePage(browser, server)
    assert page.page.evaluate("document.documentElement.dataset.mode") == "device"
    assert "never leaves" in page.page.inner_text("#privacy-item")
    before = _predictions(server)
    start = len(page.requests)
    device = [page.check(p) for p in photos]
    assert not page.errors, page.errors
    sent = page.requests[start:]
    assert all(method == "GET" for method, _ in sent), [r for r in sent if r[0] != "GET"]
    assert not [u for _, u in sent if "/v1/" in u]
    assert _predictions(server) == before, "the server predicted during on-device checks"

    agree, rows, jittery = 0, [], []
    own = Predictor(MODEL)
    for path, got in zip(photos, device, strict=True):
        assert got.get("mode") == "device", (path.name, got)
        ref = httpx.post(f"{server}/v1/predict?explain=true", files={"file": path.read_bytes()}, timeout=60).json()
        same = got.get("quality") == ref["quality"]
        if same and ref["probability"] is not None:
            p = float(got["probability"])
            same = abs(p - ref["probability"]) <= 0.02 and got.get("decision") == ref["decision"]
            grid = np.array(json.loads(got["influence"]))
            diff = float(np.abs(grid - influence(np.array(ref["heatmap"]))).max())
            if diff > HEATMAP_TOLERANCE:
                jitter = _map_jitter(own, path)
                assert diff <= jitter, (
                    f"{path.name}: the maps differ by {diff:.3f}; a JPEG re-save moves it {jitter:.3f}"
                )
                jittery.append(path.name)
        rows.append((path.name, got.get("probability"), ref["probability"], got.get("quality"), ref["quality"]))
        agree += same
    # the bar: at least 98 of 100 agree (here: every photo but at most 2%)
    assert agree >= len(photos) - len(photos) // 50, rows
    assert len(jittery) <= len(photos) // 10, jittery  # most maps agree within the plain tolerance


def test_server_mode_asks_nothing_and_uploads_without_metadata(browser, server, tmp_path) -> None:  # noqa: F811
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0)}  # a GPS position
    photo = tmp_path / "with-gps.jpg"
    Image.open(REPO / "examples" / "phone-benign-nevus.jpg").save(photo, exif=exif)
    assert b"Exif" in photo.read_bytes()
    page = DevicePage(browser, server)
    page.page.evaluate(  # keep a copy of every file the page uploads
        """() => { const f = window.fetch; window.uploads = [];
        const b64 = (bytes) => { let s = ""; for (let i = 0; i < bytes.length; i += 0x8000)
          s += String.fromCharCode(...bytes.subarray(i, i + 0x8000)); return btoa(s); };
        window.fetch = async (u, o) => { if (o && o.body instanceof FormData) for (const [, v] of o.body.entries())
          if (v instanceof Blob) window.uploads.push(b64(new Uint8Array(await v.arrayBuffer())));
          return f(u, o); }; }"""
    )
    page.page.check("#mode-server")
    assert "sent to this skinscan server" in page.page.inner_text("#privacy-item")
    attrs = page.check(photo)
    assert attrs.get("mode") == "server" and attrs.get("probability"), page.page.inner_text("#result")
    (sent,) = [base64.b64decode(u) for u in page.page.evaluate("window.uploads")]
    assert sent[:4] == b"\x89PNG" and b"Exif" not in sent and not Image.open(io.BytesIO(sent)).getexif()
    page.page.check("#mode-device")  # and back
    assert page.check(photo).get("mode") == "device"
    page.context.close()


@pytest.mark.xfail(
    strict=True,
    reason="known gap: after the reload offline the page's on-device check never finishes (the service worker "
    "has cached the page, runtime, model and graphs; what hangs is not found yet, see docs/private-mode.md)",
)
def test_offline_after_one_visit(browser, tmp_path) -> None:  # noqa: F811
    proc, url = _server()
    try:
        page = DevicePage(browser, url)
        version = page.page.inner_text("#model-info")
        page.page.wait_for_function(
            """async () => {
                const keys = (await (await caches.open('skinscan')).keys()).map((r) => r.url);
                return navigator.serviceWorker.controller !== null && keys.some((u) => u.endsWith('/model.onnx'))
                    && keys.some((u) => u.endsWith('.wasm'));
            }""",
            timeout=120_000,
        )
    finally:
        stop_serve(proc)
    page.context.set_offline(True)
    page.page.reload()
    page.page.wait_for_selector("html[data-ready='true']")
    attrs = page.check(REPO / "examples" / "isic-malignant-1.jpg")
    assert attrs.get("mode") == "device" and float(attrs["probability"]) > 0.5
    assert "version" in version and page.page.inner_text("#model-info").split(" (")[0] == version.split(" (")[0]
    page.context.close()
