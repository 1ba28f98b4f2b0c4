"""Private mode in a real browser (Debian's Chromium, Playwright): photos checked on the device agree with
the server's results for the same bytes and the same model file; nothing but GETs leaves the page and the
server predicts nothing meanwhile; after one visit the page checks a photo offline with the server gone.
Needs .ci/install-browser (skips without it, fails in CI)."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_process import start_serve, stop_serve
from skinscan.card import BROWSER_MODEL, default_model_path, resolve_model
from skinscan.explain import influence
from skinscan.predict import Predictor
from skinscan.preprocess import DECODE_SIDE_FACTOR, decode_image
from test_web import browser  # noqa: F401  (the browser fixture)

REPO = Path(__file__).resolve().parents[1]
RESULT = ".outcome, .error-box"
MODEL = default_model_path()  # parity: the same model file on both sides
HEATMAP_TOLERANCE = 0.1  # largest difference of one cell of the influence map (0-1); measured: 0.038


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
    # 100 photos, as the bar counts them (at least 98 of 100 agree)
    archive = sorted((data_root / "isic-mvb" / "test").glob("*/*.jpg"))[::13][:49]
    phone = sorted((data_root / "pad-ufes-20-phone" / "images").glob("*.jpg"))[::11][:49]
    src = Image.open(REPO / "examples" / "phone-malignant-bcc.jpg").convert("RGB")
    big = tmp / "twelve-megapixel.jpg"
    src.resize((4000, 3000), Image.BICUBIC).save(big, quality=92)
    rotated = tmp / "exif-rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the stored pixels are the upright photo turned back
    src.transpose(Image.ROTATE_90).save(rotated, exif=exif, quality=95)
    return [*archive, *phone, big, rotated]


class DevicePage:
    def __init__(self, chromium, url: str, cores: int | None = None) -> None:
        self.context = chromium.new_context()
        self.context.set_default_timeout(120_000)
        if cores:  # a browser that reports this many cores
            self.context.add_init_script(
                f"Object.defineProperty(navigator, 'hardwareConcurrency', {{get: () => {cores}}})"
            )
        self.page = self.context.new_page()
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url + "/")
        self.page.wait_for_selector("html[data-ready='true']")

    def check(self, path: Path) -> dict:
        self.page.click("#restart-button") if self.page.is_visible("#restart-button") else None
        self.page.set_input_files("#file-input", str(path))
        el = self.page.wait_for_selector(".outcome, .error-box")
        attrs = self.page.evaluate("(el) => Object.assign({}, el.dataset)", el)
        return attrs


@pytest.fixture(scope="module")
def device_run(browser, server, data_root, tmp_path_factory):  # noqa: F811
    """100 photos checked on the device, with the requests the page made meanwhile and the server's
    prediction count before and after."""
    photos = _photos(tmp_path_factory.mktemp("photos"), data_root)
    page = DevicePage(browser, server)
    mode, privacy = page.page.evaluate("document.documentElement.dataset.mode"), page.page.inner_text("#privacy-item")
    before = _predictions(server)
    start = len(page.requests)
    device = [page.check(p) for p in photos]
    return {
        "photos": photos, "device": device, "errors": page.errors, "sent": page.requests[start:],
        "predicted": (before, _predictions(server)), "mode": mode, "privacy": privacy,
    }  # fmt: skip


@pytest.mark.data
def test_device_checks_send_nothing_and_agree_with_the_server_on_probability(device_run, server) -> None:
    assert device_run["mode"] == "device" and "never leaves" in device_run["privacy"]
    assert not device_run["errors"], device_run["errors"]
    sent = device_run["sent"]
    assert all(method == "GET" for method, _ in sent), [r for r in sent if r[0] != "GET"]
    assert not [u for _, u in sent if "/v1/" in u]
    before, after = device_run["predicted"]
    assert after == before, "the server predicted during on-device checks"
    off = []
    for path, got in zip(device_run["photos"], device_run["device"], strict=True):
        assert got.get("mode") == "device", (path.name, got)
        ref = httpx.post(f"{server}/v1/predict", files={"file": path.read_bytes()}, timeout=60).json()
        assert got.get("quality") == ref["quality"], path.name
        if ref["probability"] is not None and abs(float(got["probability"]) - ref["probability"]) > 0.02:
            off.append((path.name, got["probability"], ref["probability"]))
    assert len(off) <= len(device_run["photos"]) // 50, off  # 98 of 100 within 0.02 (measured: 100)


@pytest.mark.data
def test_device_checks_agree_with_the_server(device_run, server) -> None:
    photos, device = device_run["photos"], device_run["device"]
    agree, rows, diffs = 0, [], []
    for path, got in zip(photos, device, strict=True):
        ref = httpx.post(f"{server}/v1/predict?explain=true", files={"file": path.read_bytes()}, timeout=60).json()
        same = got.get("quality") == ref["quality"]
        if same and ref["probability"] is not None:
            p = float(got["probability"])
            same = abs(p - ref["probability"]) <= 0.02 and got.get("decision") == ref["decision"]
            grid = np.array(json.loads(got["influence"]))
            diff = float(np.abs(grid - influence(np.array(ref["heatmap"]))).max())
            diffs.append(diff)
            same = same and diff <= HEATMAP_TOLERANCE
        if not same:
            rows.append((path.name, got.get("probability"), ref["probability"], got.get("decision"), ref["decision"],
                         got.get("quality"), ref["quality"], diffs[-1] if diffs else None))  # fmt: skip
        agree += same
    assert np.median(diffs) <= HEATMAP_TOLERANCE / 3, np.median(diffs)  # maps: most agree well inside it
    # the bar: at least 98 of 100 agree (probability, decision, verdict and map; measured: 100)
    assert agree >= len(photos) - len(photos) // 50, rows


def test_device_checks_run_on_threads_where_the_page_is_cross_origin_isolated(browser, server) -> None:  # noqa: F811
    # ONNX Runtime takes half the cores (at most 4) where SharedArrayBuffer is there: a browser reporting 4
    # cores checks on 2 WebAssembly threads (module workers, which need the worker script's COEP header),
    # one reporting 2 on one; both give the same result
    photo = REPO / "examples" / "phone-malignant-bcc.jpg"
    results = {}
    for cores in (4, 2):
        page = DevicePage(browser, server, cores=cores)
        assert page.page.evaluate("self.crossOriginIsolated")
        results[cores] = page.check(photo)
        assert not page.failed and not page.errors, (page.failed, page.errors)
        page.context.close()
    assert results[4]["mode"] == results[2]["mode"] == "device"
    assert (results[4]["threads"], results[2]["threads"]) == ("2", "1")
    assert float(results[4]["probability"]) == pytest.approx(float(results[2]["probability"]), abs=1e-4)
    headers = httpx.get(f"{server}/web/vendor/onnxruntime-web/ort-wasm-simd-threaded.mjs").headers
    assert headers["cross-origin-embedder-policy"] == "require-corp"


def test_a_heic_photo_is_checked_on_the_device_or_sent_only_when_asked(browser, server, tmp_path) -> None:  # noqa: F811
    # Chromium on Linux cannot decode HEIC (phones save it): the page must ask before it sends the file as it
    # is (its metadata cannot be removed), and send nothing until then; a browser that decodes it checks it on
    # the device, in agreement with the server
    import pillow_heif

    pillow_heif.register_heif_opener()
    heic = tmp_path / "phone-photo.heic"
    Image.open(REPO / "examples" / "phone-malignant-bcc.jpg").save(heic, quality=90)
    ref = httpx.post(f"{server}/v1/predict", files={"file": heic.read_bytes()}, timeout=60).json()
    page = DevicePage(browser, server)
    start = len(page.requests)
    page.page.set_input_files("#file-input", str(heic))
    el = page.page.wait_for_selector(".outcome, .error-box, .ask-upload")
    if el.get_attribute("data-mode") == "device":  # this browser decodes HEIC
        assert abs(float(el.get_attribute("data-probability")) - ref["probability"]) <= 0.02
    else:
        assert "cannot read this file" in el.inner_text() and "ask-upload" in el.get_attribute("class")
        assert all(method == "GET" for method, _ in page.requests[start:]), page.requests[start:]
        page.page.click(".ask-send")
        attrs = page.page.evaluate("(el) => Object.assign({}, el.dataset)", page.page.wait_for_selector(".outcome"))
        assert attrs["mode"] == "server" and float(attrs["probability"]) == pytest.approx(ref["probability"], abs=1e-6)
        assert [m for m, u in page.requests[start:] if m == "POST"] == ["POST"]
        assert "on the skinscan server" in page.page.inner_text("#model-info")  # not "on this device"
    assert not page.errors, page.errors
    page.context.close()


def test_the_page_bounds_a_photo_as_the_server_decodes_it(browser, server) -> None:  # noqa: F811
    """The one size arithmetic JavaScript keeps (private.js `boundedSize`): for a JPEG the reduction Pillow's
    draft makes in `load_pixels`, then the bound. Up to DECODE_SIDE_FACTOR x the model's size both sides hand
    the photo on as decoded (no reduction before the one resize); above it the page's size is the server's
    draft size cut to the bound. Sizes around every power-of-two step, and odd ones."""
    size = Predictor(MODEL).spec.size
    limit = DECODE_SIDE_FACTOR * size
    sizes = [
        (w, h)
        for s in (limit, 2 * limit, 4 * limit, 8 * limit)
        for w, h in ((s - 1, s - 1), (s, s + 3), (s + 1, 3 * s // 2))
    ]
    sizes += [(600, 800), (224, 3000), (4000, 3000), (5000, 249), (1791, 4000)]
    page = DevicePage(browser, server)
    got = page.page.evaluate(
        """async ([sizes, size, factor]) => { const m = await import('./web/private.js');
        return sizes.map(([w, h]) => [m.boundedSize(w, h, size, factor, true), m.boundedSize(w, h, size, factor, false)]); }""",
        [sizes, size, DECODE_SIDE_FACTOR],
    )
    page.context.close()

    def bound(w: int, h: int) -> list[int]:
        k = -(-min(w, h) // limit)
        return [w, h] if k <= 1 else [max(1, w // k), max(1, h // k)]

    for (w, h), (jpeg, other) in zip(sizes, got, strict=True):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (120, 60, 30)).save(buf, "JPEG", quality=30)
        drafted = decode_image(buf.getvalue(), min_side=limit).size
        assert jpeg == bound(*drafted), ((w, h), drafted, jpeg)
        assert other == bound(w, h), ((w, h), other)
        if min(w, h) <= limit:
            assert jpeg == [w, h]  # never reduced before the graph's (the server: Pillow's) one resize


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


def _cached(page: DevicePage, timeout: float = 120) -> list[str]:
    """The URLs in the service worker's cache once it controls the page and holds a model and the runtime.
    (Polled from here: Playwright's wait_for_function takes an async predicate's promise as a true value.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys = page.page.evaluate(
            """async () => navigator.serviceWorker.controller === null ? []
                : (await (await caches.open('skinscan')).keys()).map((r) => r.url)"""
        )
        if any(u.endswith("/model.onnx") for u in keys) and any(u.endswith(".wasm") for u in keys):
            return keys
        time.sleep(0.5)
    pytest.fail(f"the service worker did not cache the model and runtime within {timeout} s")


def _model_folders(keys: list[str]) -> set[str]:
    return {u.rsplit("/", 2)[-2] for u in keys if u.endswith(".onnx")}


def test_offline_after_one_visit(browser) -> None:  # noqa: F811
    proc, url = _server()
    try:
        page = DevicePage(browser, url, cores=4)  # on 2 threads: the worker script comes from the cache too
        version = page.page.inner_text("#model-info")
        _cached(page)
    finally:
        stop_serve(proc)
    page.context.set_offline(True)
    page.page.reload()
    page.page.wait_for_selector("html[data-ready='true']")
    attrs = page.check(REPO / "examples" / "isic-malignant-1.jpg")
    assert attrs.get("mode") == "device" and attrs.get("threads") == "2" and float(attrs["probability"]) > 0.5
    assert "version" in version and page.page.inner_text("#model-info").split(" (")[0] == version.split(" (")[0]
    page.context.close()


def test_a_new_model_replaces_the_cached_one(browser) -> None:  # noqa: F811
    """The site's browser model changes between two visits (the int8 build, then the fp32 model): the second
    visit shows the new model, the cache holds its files and no longer the old ones, and offline the page
    checks with the new one."""
    old, new = resolve_model(BROWSER_MODEL), MODEL
    proc, url = start_serve(MODEL, args=("--browser-model", str(old)))
    port = int(url.rsplit(":", 1)[1])
    try:
        page = DevicePage(browser, url)
        before = page.page.inner_text("#model-info")
        old_folders = _model_folders(_cached(page))
    finally:
        stop_serve(proc)
    proc, url = start_serve(MODEL, args=("--browser-model", str(new)), port=port)
    try:
        page.page.reload()
        page.page.wait_for_selector("html[data-ready='true']")
        after = page.page.inner_text("#model-info")
        deadline = time.monotonic() + 60
        while (folders := _model_folders(_cached(page))) & old_folders and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop_serve(proc)
    assert Predictor(old).card.name in before and Predictor(new).card.name in after and before != after
    assert len(folders) == 1 and not folders & old_folders, (old_folders, folders)
    page.context.set_offline(True)
    page.page.reload()
    page.page.wait_for_selector("html[data-ready='true']")
    assert page.page.inner_text("#model-info") == after
    assert page.check(REPO / "examples" / "isic-malignant-1.jpg").get("mode") == "device"
    page.context.close()
