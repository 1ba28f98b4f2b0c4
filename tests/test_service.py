"""The HTTP service: every route, every bad-input class, batching, auth, CORS, timeouts; a real
`skinscan serve` process over loopback; and a hypothesis fuzz that must never see a 5xx."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serve_process import start_serve
from skinscan.predict import Prediction, Predictor
from skinscan.service import Batcher, Settings, _Metrics, create_app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
# Until the bundled model is trained, a barely trained stand-in with the same format (see the report).


# ---------------------------------------------------------------- fixtures and helpers
def make_client(predictor: Predictor, **overrides) -> TestClient:
    return TestClient(create_app(Settings(model=predictor.model_path, **overrides), predictor=predictor))


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[TestClient]:
    with make_client(predictor, max_body_bytes=2_000_000, max_batch_items=4) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def lesion(size: tuple[int, int] = (256, 192)) -> Image.Image:
    """A brown blob on skin tone: enough structure for a real decode and inference."""
    img = Image.new("RGB", size, (225, 180, 160))
    w, h = size
    img.paste((110, 70, 50), (w // 3, h // 3, 2 * w // 3, 2 * h // 3))
    return img


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (CRC fixed): a decompression bomb in a few bytes."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def multipart(parts: list[tuple[str, bytes]], boundary: str = "skinscanboundary") -> tuple[bytes, str]:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in parts
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return EXAMPLES[0].read_bytes()


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]


# ---------------------------------------------------------------- /v1/predict: accepted shapes
def test_examples_match_the_predictor(client: TestClient, predictor: Predictor) -> None:
    assert len(EXAMPLES) == 6
    for path in EXAMPLES:
        r = client.post("/v1/predict", json={"image": b64(path.read_bytes())})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = predictor(path)
        assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)
        assert body["decision"] == expected.decision
        assert body["threshold"] == expected.threshold and body["photo_type"] == expected.photo_type
        assert body["model"] == predictor.info() and len(body["model"]["sha256"]) == 64
        assert "not a diagnosis" in body["advice"]
        assert {"decode", "infer", "total"} <= set(body["timing_ms"])
        assert "path" not in body and "error" not in body
        assert r.headers["x-request-id"]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda d: {"image": b64(d)}, id="image"),
        pytest.param(lambda d: {"input": b64(d)}, id="input-prototype"),
        pytest.param(lambda d: {"image": "data:image/jpeg;base64," + b64(d)}, id="data-url"),
        pytest.param(lambda d: {"image": b64(d).rstrip("=")}, id="no-padding"),
        pytest.param(lambda d: {"image": base64.encodebytes(d).decode()}, id="line-breaks"),
        pytest.param(lambda d: {"image": base64.urlsafe_b64encode(d).decode()}, id="url-safe"),
    ],
)
def test_json_variants(client: TestClient, payload, predictor: Predictor) -> None:
    data = EXAMPLES[1].read_bytes()
    # pick an odd length so that dropping the padding really drops characters
    data = data + b"\0" if len(data) % 3 == 0 else data
    r = client.post("/v1/predict", json=payload(data))
    assert r.status_code == 200, r.text
    assert r.json()["probability"] == pytest.approx(predictor(data).probability, abs=1e-6)


def test_multipart_and_raw(client: TestClient, jpeg: bytes, predictor: Predictor) -> None:
    expected = predictor(jpeg).probability
    r = client.post("/v1/predict", files={"file": ("patient-jane-doe.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200 and r.json()["probability"] == pytest.approx(expected, abs=1e-6)
    assert "jane" not in r.text  # file names are never echoed
    for ctype in ("image/jpeg", "image/png", "application/octet-stream"):  # the declared image type is a hint
        r = client.post("/v1/predict", content=jpeg, headers={"content-type": ctype})
        assert r.status_code == 200 and r.json()["probability"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB")]
)
def test_generated_formats(client: TestClient, fmt: str, mode: str) -> None:
    # a synthetic blob is no lesion photo for a gated model: force it past the gate, the format is under test
    body = encode(lesion().convert(mode), fmt)
    r = client.post("/v1/predict?force=true", content=body, headers={"content-type": "image/x"})
    assert r.status_code == 200, r.text
    assert 0.0 <= r.json()["probability"] <= 1.0 and r.json()["quality"] in ("ok", "retake")


def test_phone_photo_12_megapixels(predictor: Predictor) -> None:
    photo = encode(lesion((4000, 3000)), "JPEG", quality=90)
    with make_client(predictor, max_body_bytes=32_000_000) as c:
        r = c.post("/v1/predict", content=photo, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text


def test_new_prediction_fields_flow_through(client: TestClient, jpeg: bytes, monkeypatch) -> None:
    original = Prediction.to_dict
    monkeypatch.setattr(Prediction, "to_dict", lambda self: {**original(self), "quality": {"ok": True}})
    assert client.post("/v1/predict", json={"image": b64(jpeg)}).json()["quality"] == {"ok": True}
    r = client.post("/v1/predict/batch", json={"images": [b64(jpeg)]})
    assert r.json()["results"][0]["quality"] == {"ok": True}


# ---------------------------------------------------------------- /v1/predict/batch
def test_batch_json_and_multipart(client: TestClient, predictor: Predictor) -> None:
    datas = [p.read_bytes() for p in EXAMPLES[:3]]
    expected = [p.probability for p in predictor.predict(datas)]
    for payload in (
        {"images": [b64(d) for d in datas]},
        [b64(d) for d in datas],
        {"images": [{"image": b64(d)} for d in datas]},
    ):
        r = client.post("/v1/predict/batch", json=payload)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == predictor.info() and "total" in body["timing_ms"]
        assert [x["index"] for x in body["results"]] == [0, 1, 2]
        assert [x["probability"] for x in body["results"]] == pytest.approx(expected, abs=1e-6)
    r = client.post("/v1/predict/batch", files=[("file", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(datas)])
    assert [x["probability"] for x in r.json()["results"]] == pytest.approx(expected, abs=1e-6)


def test_batch_bad_items_fail_alone(client: TestClient, jpeg: bytes) -> None:
    images = [b64(jpeg), "not base64 !!", b64(b"plain text"), b64(jpeg[: len(jpeg) // 2])]
    r = client.post("/v1/predict/batch", json={"images": images})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["decision"] in ("refer", "monitor") and "error" not in results[0]
    assert [x.get("error", {}).get("code") for x in results[1:]] == ["invalid_base64", "invalid_image", "invalid_image"]
    assert all("probability" not in x for x in results[1:])
    body, ctype = multipart([("file", jpeg), ("file", b"")])
    results = client.post("/v1/predict/batch", content=body, headers={"content-type": ctype}).json()["results"]
    assert "probability" in results[0] and results[1]["error"]["code"] == "empty_image"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"images": ["x"] * 5}, 400, "too_many_images"),  # the client fixture allows 4
        ({"images": []}, 400, "missing_image"),
        ({"pictures": []}, 422, "unknown_field"),
        ("just a string", 400, "missing_image"),
    ],
)
def test_batch_request_errors(client: TestClient, payload, status: int, code: str) -> None:
    assert_error(client.post("/v1/predict/batch", json=payload), status, code)


def test_batch_too_many_files(client: TestClient, jpeg: bytes) -> None:
    body, ctype = multipart([("file", jpeg[:100])] * 5)
    assert_error(
        client.post("/v1/predict/batch", content=body, headers={"content-type": ctype}), 400, "too_many_images"
    )


# ---------------------------------------------------------------- every bad-input class -> 4xx JSON
def _bad_inputs(jpeg: bytes) -> list:
    gif = encode(lesion(), "GIF")
    truncated_mp = multipart([("file", jpeg)])[0][:-30]
    return [
        ("invalid-base64", {"json": {"image": "@@@not*base64@@@"}}, 400, "invalid_base64"),
        ("impossible-base64-length", {"json": {"image": "abcde"}}, 400, "invalid_base64"),
        ("base64-not-a-string", {"json": {"image": 12}}, 400, "invalid_base64"),
        ("data-url-not-base64", {"json": {"image": "data:image/png,%89PNG"}}, 400, "invalid_base64"),
        ("data-url-not-image", {"json": {"image": "data:text/plain;base64,aGk="}}, 415, "unsupported_media_type"),
        ("empty-body", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty_body"),
        ("empty-json-image", {"json": {"image": ""}}, 400, "empty_image"),
        ("empty-multipart-file", {"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 400, "empty_image"),
        ("invalid-json", {"content": b"{image:", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ("json-not-object", {"json": [b64(jpeg)]}, 400, "missing_image"),
        ("json-missing-key", {"json": {"picture": b64(jpeg)}}, 422, "unknown_field"),
        ("not-an-image", {"content": b"hello world" * 10, "headers": {"content-type": "image/jpeg"}}, 422, "invalid_image"),
        ("not-an-image-b64", {"json": {"image": b64(b"%PDF-1.4 not a photo")}}, 422, "invalid_image"),
        ("truncated-image", {"content": jpeg[: len(jpeg) // 3], "headers": {"content-type": "image/jpeg"}}, 422, "invalid_image"),
        ("unsupported-format-gif", {"content": gif, "headers": {"content-type": "image/gif"}}, 422, "invalid_image"),
        ("decompression-bomb", {"content": png_claiming(30_000, 30_000), "headers": {"content-type": "image/png"}}, 422, "too_many_pixels"),
        ("huge-bomb", {"content": png_claiming(60_000, 60_000), "headers": {"content-type": "image/png"}}, 422, "too_many_pixels"),
        ("wrong-content-type", {"content": jpeg, "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ("form-urlencoded", {"data": {"image": b64(jpeg)}}, 415, "unsupported_media_type"),
        ("no-content-type", {"content": jpeg, "headers": {"content-type": ""}}, 415, "unsupported_media_type"),
        ("multipart-no-file", {"files": {"photo": ("a.jpg", jpeg, "image/jpeg")}}, 422, "unknown_field"),
        ("multipart-two-files", {"files": [("file", ("a.jpg", jpeg, "image/jpeg"))] * 2}, 400, "too_many_images"),
        ("multipart-no-boundary", {"content": jpeg, "headers": {"content-type": "multipart/form-data"}}, 400, "invalid_multipart"),
        ("multipart-truncated", {"content": truncated_mp, "headers": {"content-type": "multipart/form-data; boundary=skinscanboundary"}}, 400, "invalid_multipart"),
        ("body-too-large", {"content": b"\xff" * 2_000_001, "headers": {"content-type": "image/jpeg"}}, 413, "body_too_large"),
        ("body-too-large-json", {"json": {"image": "A" * 2_100_000}}, 413, "body_too_large"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(26))
def test_bad_inputs(client: TestClient, jpeg: bytes, case: int) -> None:
    _, kwargs, status, code = _bad_inputs(jpeg)[case]
    assert_error(client.post("/v1/predict", **kwargs), status, code)


def test_bad_input_list_is_fully_parametrised(jpeg: bytes) -> None:
    assert len(_bad_inputs(jpeg)) == 26


def test_pixel_limit_setting(predictor: Predictor) -> None:
    with make_client(predictor, max_pixels=100_000) as c:
        small = c.post("/v1/predict", content=encode(lesion((300, 300)), "PNG"), headers={"content-type": "image/png"})
        big = c.post("/v1/predict", content=encode(lesion((400, 300)), "PNG"), headers={"content-type": "image/png"})
    assert small.status_code == 200
    assert_error(big, 422, "too_many_pixels")
    assert "120,000" in big.json()["error"]["message"]


def test_body_limit_is_enforced_while_streaming(predictor: Predictor) -> None:
    """No Content-Length (chunked upload): the limit still applies as the bytes arrive."""

    async def scenario() -> httpx.Response:
        app = create_app(Settings(model=predictor.model_path, max_body_bytes=10_000), predictor=predictor)

        async def chunks():
            for _ in range(100):
                yield b"\xff" * 1000

        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.post("/v1/predict", content=chunks(), headers={"content-type": "image/jpeg"})

    assert_error(asyncio.run(scenario()), 413, "body_too_large")


def test_declared_length_over_limit_refused_before_reading(client: TestClient) -> None:
    r = client.post("/v1/predict", content=b"x", headers={"content-type": "image/jpeg", "content-length": "9999999"})
    assert_error(r, 413, "body_too_large")


def test_unknown_routes_and_methods_are_json(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


# ---------------------------------------------------------------- KServe v2, metrics
def test_health_ready_and_metadata(client: TestClient, predictor: Predictor) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/skinscan/ready").status_code == 200
    meta = client.get("/v2/models/skinscan").json()
    assert meta["name"] == "skinscan" and meta["versions"] == [predictor.card.version]
    assert meta["inputs"][0]["name"] == "image" and {o["name"] for o in meta["outputs"]} == {"probability", "decision"}
    assert meta["model"]["sha256"] == predictor.sha256
    phone = meta["photo_types"]["phone"]
    assert phone == {"temperature": predictor.temperature_for("phone"), "threshold": predictor.threshold_for("phone")}
    assert client.get("/v2").json()["name"] == "skinscan"
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_not_ready_before_start_up(predictor: Predictor, jpeg: bytes) -> None:
    c = make_client(predictor)  # no `with`: the lifespan (load + warm-up) has not run
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 503
    assert_error(c.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"}), 503, "not_ready")


def test_metrics(client: TestClient, jpeg: bytes) -> None:
    client.post("/v1/predict", json={"image": b64(jpeg)})
    client.post("/v1/predict", json={"image": "@@"})
    client.get("/random/path/for/cardinality")
    text = client.get("/metrics").text
    assert 'skinscan_requests_total{route="/v1/predict",status="200"}' in text
    assert 'skinscan_errors_total{code="invalid_base64"}' in text
    assert "skinscan_request_seconds_bucket" in text and "skinscan_batch_size_bucket" in text
    assert 'skinscan_images_total{outcome="ok"}' in text and "skinscan_ready 1.0" in text
    assert "/random/path" not in text  # unknown paths are counted as route="other"


# ---------------------------------------------------------------- batching, timeouts, shutdown
def test_concurrent_requests_are_batched(predictor: Predictor) -> None:
    datas = [p.read_bytes() for p in EXAMPLES] * 2
    expected = [p.probability for p in predictor.predict(datas)]

    async def scenario() -> tuple[list[httpx.Response], str]:
        settings_ = Settings(model=predictor.model_path, batch_window_ms=200, max_batch_size=16)
        app = create_app(settings_, predictor=predictor)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                rs = await asyncio.gather(*(c.post("/v1/predict", json={"image": b64(d)}) for d in datas))
                return list(rs), (await c.get("/metrics")).text

    responses, text = asyncio.run(scenario())
    assert [r.json()["probability"] for r in responses] == pytest.approx(expected, abs=1e-5)
    runs = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("skinscan_batch_size_count")))
    assert runs < len(datas), f"{len(datas)} concurrent requests ran as {runs} batches: no batching"


def test_batcher_drains_on_close(predictor: Predictor, jpeg: bytes) -> None:
    async def scenario() -> list[Prediction]:
        batcher = Batcher(predictor, max_batch_size=2, window_s=0.0, metrics=_Metrics())
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(predictor.decode(jpeg))) for _ in range(5)]
        await asyncio.sleep(0)  # let the submissions queue up
        await batcher.close()
        return [p.result() for p in pending]

    results = asyncio.run(scenario())
    assert len(results) == 5 and all(r.ok for r in results)


def test_request_timeout(predictor: Predictor, jpeg: bytes, monkeypatch) -> None:
    slow = Predictor(predictor.model_path)
    real = slow.predict_decoded
    with make_client(slow, request_timeout_s=0.3) as c:
        monkeypatch.setattr(slow, "predict_decoded", lambda *a, **k: (time.sleep(0.6), real(*a, **k))[1])
        assert_error(c.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"}), 503, "timeout")
        monkeypatch.setattr(slow, "predict_decoded", real)
        time.sleep(0.4)  # the abandoned slow batch finishes; the server answers again
        assert c.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 200


def test_slow_body_times_out(predictor: Predictor) -> None:
    async def scenario() -> httpx.Response:
        app = create_app(Settings(model=predictor.model_path, request_timeout_s=0.2), predictor=predictor)

        async def dribble():
            yield b"\xff\xd8"
            await asyncio.sleep(1.0)
            yield b"\xff\xd9"

        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/predict", content=dribble(), headers={"content-type": "image/jpeg"})

    assert_error(asyncio.run(scenario()), 408, "request_timeout")


def test_images_stay_in_memory_and_out_of_logs(client: TestClient, jpeg: bytes, monkeypatch, caplog) -> None:
    import starlette.formparsers

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", no_disk)
    noise = Image.frombytes("RGB", (800, 600), os.urandom(800 * 600 * 3))
    big = encode(noise, "PNG")  # > 1 MB: Starlette would spool this one to disk
    assert len(big) > 1_100_000
    caplog.set_level("DEBUG")
    with make_client(client.app.state.service.predictor, max_body_bytes=8_000_000) as c:
        r = c.post("/v1/predict", files={"file": ("patient-john-smith.png", big, "image/png")})
        assert r.status_code == 200, r.text
        encoded = b64(jpeg)
        assert c.post("/v1/predict", json={"image": encoded}).status_code == 200
    logs = caplog.text
    assert "john-smith" not in logs and encoded[:40] not in logs and encoded[-40:] not in logs
    assert r.headers["x-request-id"] in logs  # the request is logged, by id


def test_decoder_crash_is_a_422_and_spares_the_batch(client: TestClient, jpeg: bytes, monkeypatch) -> None:
    """Pillow plugins can raise other errors than InvalidImage (a damaged HEIC raised EOFError)."""
    import skinscan.predict

    real = skinscan.predict.load_pixels

    def flaky(source, spec):
        if bytes(source[:4]) == b"BOOM":
            raise EOFError("Decoder plugin generated an error")
        return real(source, spec)

    monkeypatch.setattr(skinscan.predict, "load_pixels", flaky)
    r = client.post("/v1/predict/batch", json={"images": [b64(jpeg), b64(b"BOOM image"), b64(jpeg)]})
    results = r.json()["results"]
    assert r.status_code == 200 and "probability" in results[0] and "probability" in results[2]
    assert results[1]["error"]["code"] == "invalid_image" and "EOFError" in results[1]["error"]["message"]
    assert_error(client.post("/v1/predict", json={"image": b64(b"BOOM image")}), 422, "invalid_image")


def test_inference_failure_is_a_500_not_blamed_on_the_image(predictor: Predictor, jpeg: bytes, monkeypatch) -> None:
    broken = Predictor(predictor.model_path)
    app = create_app(Settings(model=broken.model_path), predictor=broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(broken, "run", lambda batch: (_ for _ in ()).throw(RuntimeError("onnx runtime failed")))
        r = c.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"})
    assert_error(r, 500, "internal")
    assert "onnx" not in r.text  # internals stay in the log


# ---------------------------------------------------------------- auth and CORS
def test_api_key(predictor: Predictor, jpeg: bytes) -> None:
    with make_client(predictor, api_key="s3cret-key") as c:
        post = lambda **h: c.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg", **h})  # noqa: E731
        assert_error(post(), 401, "unauthorized")
        assert_error(post(authorization="Bearer wrong"), 401, "unauthorized")
        assert_error(post(**{"x-api-key": "s3cret-ke"}), 401, "unauthorized")
        assert post().headers["www-authenticate"] == "Bearer"
        assert post(authorization="Bearer s3cret-key").status_code == 200
        assert post(**{"x-api-key": "s3cret-key"}).status_code == 200
        assert_error(c.get("/metrics"), 401, "unauthorized")
        assert_error(c.get("/v2/models/skinscan"), 401, "unauthorized")
        assert c.get("/v2/health/ready").status_code == 200  # probes need no key


def test_cors(predictor: Predictor) -> None:
    with make_client(predictor, cors_origins=["https://app.example"]) as c:
        ok = c.options(
            "/v1/predict",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/v2/health/live", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_settings_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("SKINSCAN_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("SKINSCAN_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("SKINSCAN_API_KEY", "zq-secret-77")
    monkeypatch.setenv("SKINSCAN_DATA", "/somewhere")  # the CLI's data root: not a service setting, ignored
    s = Settings()
    assert s.max_batch_size == 4 and s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "zq-secret-77"
    assert "zq-secret-77" not in repr(s)
    assert Settings(max_batch_size=8).max_batch_size == 8  # explicit values (CLI flags) win


def test_serve_rejects_bad_settings(capsys) -> None:
    from skinscan.cli import main

    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


# ---------------------------------------------------------------- fuzz: never a 5xx
def _seed_bodies() -> list[tuple[bytes, str]]:
    jpeg = EXAMPLES[3].read_bytes()
    mp, mp_type = multipart([("file", jpeg)])
    return [
        (jpeg, "image/jpeg"),
        (encode(lesion((64, 48)), "PNG"), "image/png"),
        (json.dumps({"image": b64(jpeg)}).encode(), "application/json"),
        (json.dumps({"images": [b64(jpeg), b64(jpeg[:900])]}).encode(), "application/json"),
        (mp, mp_type),
    ]


@st.composite
def payloads(draw) -> tuple[str, bytes, str]:
    route = draw(st.sampled_from(["/v1/predict", "/v1/predict/batch"]))
    if draw(st.booleans()):
        body = draw(st.binary(max_size=600))
        ctype = draw(
            st.sampled_from(["image/jpeg", "application/json", "multipart/form-data; boundary=b", "text/plain", ""])
        )
        return route, body, ctype
    body, ctype = draw(st.sampled_from(_seed_bodies()))
    body = bytearray(body)
    for _ in range(draw(st.integers(1, 6))):
        if not body:
            break
        pos = draw(st.integers(0, len(body) - 1))
        action = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if action == "flip":
            body[pos] ^= draw(st.integers(1, 255))
        elif action == "truncate":
            del body[pos:]
        elif action == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del body[pos : pos + draw(st.integers(1, 64))]
    return route, bytes(body), ctype


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads())
def test_fuzz_never_5xx(client: TestClient, payload: tuple[str, bytes, str]) -> None:
    route, body, ctype = payload
    r = client.post(route, content=body, headers={"content-type": ctype})
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert set(r.json()) == {"error"}


def test_server_still_answers_after_fuzzing(client: TestClient, jpeg: bytes) -> None:
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 200


# ---------------------------------------------------------------- end to end: a real `skinscan serve`


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    env = {**os.environ, "SKINSCAN_API_KEY": "e2e-key", "SKINSCAN_MAX_BATCH_SIZE": "8"}
    proc, url = start_serve(model_path, env)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_real_server(server: tuple[subprocess.Popen, str], predictor: Predictor) -> None:
    _, url = server
    jpeg = EXAMPLES[2].read_bytes()
    expected = predictor(jpeg).probability
    with httpx.Client(base_url=url, headers={"authorization": "Bearer e2e-key"}, timeout=30) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert_error(httpx.post(f"{url}/v1/predict", json={"image": b64(jpeg)}), 401, "unauthorized")
        for kwargs in (
            {"json": {"image": b64(jpeg)}},
            {"json": {"input": "data:image/jpeg;base64," + b64(jpeg)}},
            {"files": {"file": ("a.jpg", jpeg, "image/jpeg")}},
            {"content": jpeg, "headers": {"content-type": "image/jpeg"}},
        ):
            r = c.post("/v1/predict", **kwargs)
            assert r.status_code == 200, r.text
            assert r.json()["probability"] == pytest.approx(expected, abs=1e-6)
        r = c.post("/v1/predict/batch", json={"images": [b64(p.read_bytes()) for p in EXAMPLES] + ["@@"]})
        results = r.json()["results"]
        assert len(results) == 7 and results[-1]["error"]["code"] == "invalid_base64"
        assert_error(
            c.post("/v1/predict", content=b"nope", headers={"content-type": "image/png"}), 422, "invalid_image"
        )
        assert c.get("/v2/models/skinscan").json()["model"]["sha256"] == predictor.sha256
        assert 'skinscan_requests_total{route="/v1/predict",status="200"} 4.0' in c.get("/metrics").text


def test_real_server_finishes_in_flight_request_on_sigterm(server: tuple[subprocess.Popen, str]) -> None:
    proc, url = server
    port = int(url.rsplit(":", 1)[1])
    jpeg = EXAMPLES[0].read_bytes()
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer e2e-key\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + jpeg[:1000])  # the request is in flight: headers in, body still arriving
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sock.sendall(jpeg[1000:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert b'"probability"' in response
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so -15 is a clean exit too
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert "ready" in log and "stopped" in log  # the lifespan shut down: the batcher drained
    assert b64(jpeg)[:40] not in log


def test_several_workers_share_one_metrics_view(model_path: Path) -> None:
    """`--workers 2`: whichever worker answers /metrics, it counts every worker's requests."""
    from serve_process import stop_serve

    proc, url = start_serve(model_path, args=("--workers", "2", "--threads", "1"))
    try:
        jpeg = EXAMPLES[0].read_bytes()
        with httpx.Client(base_url=url, timeout=30) as c:  # one connection per request: both workers answer
            for _ in range(12):
                r = httpx.post(f"{url}/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30)
                assert r.status_code == 200
            views = {c.get("/metrics").text for _ in range(4)}
        for text in views:
            assert 'skinscan_requests_total{route="/v1/predict",status="200"} 12.0' in text
            assert "skinscan_ready 1.0" in text
        metrics_dirs = [p for p in Path("/dev/shm").glob("skinscan-metrics-*")] if Path("/dev/shm").is_dir() else []
        assert metrics_dirs  # the workers' shared folder exists while serving...
    finally:
        stop_serve(proc)
    assert not [p for p in metrics_dirs if p.exists()]  # ...and is removed on shutdown


# ---------------------------------------------------------------- nothing a client sends is ignored silently
def test_answers_in_the_wrong_place_are_a_422_naming_the_field(client: TestClient, jpeg: bytes) -> None:
    """Answers count only inside "answers" (or as form fields): at the top of a JSON body or in the query
    they used to be ignored with a 200; now the field is named in a 422."""
    for kwargs, name in (
        ({"json": {"image": b64(jpeg), "bleed": "yes"}}, "'bleed'"),
        ({"json": {"image": b64(jpeg)}, "params": {"bleed": "yes"}}, "'bleed'"),
        ({"json": {"image": b64(jpeg), "answer": {"bleed": "yes"}}}, "'answer'"),
        ({"files": {"file": ("a.jpg", jpeg, "image/jpeg"), "bleeding": (None, "yes")}}, "'bleeding'"),
    ):
        r = client.post("/v1/predict", **kwargs)
        assert_error(r, 422, "unknown_field")
        assert name in r.json()["error"]["message"]
    r = client.post("/v1/predict", json={"image": b64(jpeg), "bleed": "yes"})
    assert 'inside "answers"' in r.json()["error"]["message"]
    for route, payload in (
        ("/v1/predict/batch", {"images": [b64(jpeg)], "force": True, "age": 70}),
        ("/v1/predict/lesion", {"images": [{"image": b64(jpeg), "answers": {"age": 70}}]}),
    ):
        assert_error(client.post(route, json=payload), 422, "unknown_field")
    # the documented form works, and the answers move the estimate
    alone = client.post("/v1/predict", json={"image": b64(jpeg)}).json()
    nested = client.post("/v1/predict", json={"image": b64(jpeg), "answers": {"bleed": "yes"}}).json()
    assert nested["adjustments"][0]["answer"] == "bleed" and nested["probability"] > alone["probability"]


def test_a_lesion_takes_one_set_of_answers(client: TestClient, predictor: Predictor) -> None:
    from skinscan.answers import Answers
    from skinscan.lesion import predict_lesion

    photos = [EXAMPLES[4], EXAMPLES[5]]
    images = [b64(p.read_bytes()) for p in photos]
    r = client.post("/v1/predict/lesion", json={"images": images, "answers": {"bleed": "yes", "age": 70}})
    assert r.status_code == 200, r.text
    combined = r.json()["combined"]
    want = predict_lesion(predictor, photos, answers=Answers(bleed="yes", age=70)).combined
    assert combined["probability"] == pytest.approx(want.probability, abs=1e-6)
    assert [a["answer"] for a in combined["adjustments"]] == ["age", "bleed"]
    form = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos] + [("bleed", (None, "yes"))]
    multi = client.post("/v1/predict/lesion", files=form)
    assert multi.status_code == 200, multi.text
    assert [a["answer"] for a in multi.json()["combined"]["adjustments"]] == ["bleed"]


def test_query_type_errors_have_the_same_shape_as_every_other_4xx(client: TestClient, jpeg: bytes) -> None:
    r = client.post("/v1/predict?explain=maybe", json={"image": b64(jpeg)})
    assert_error(r, 422, "invalid_request")
    message = r.json()["error"]["message"]
    assert message.startswith("query parameter 'explain': ") and "'maybe'" in message and "[{" not in message


def test_openapi_documents_answers_and_force_and_docs_work_offline(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    props = body["application/json"]["schema"]["properties"]
    assert {"image", "answers", "force"} <= set(props)
    assert set(props["answers"]["properties"]) >= {"age", "sex", "body_site", "bleed"}
    assert {"bleed", "answers"} <= set(body["multipart/form-data"]["schema"]["properties"])
    lesion_props = schema["paths"]["/v1/predict/lesion"]["post"]["requestBody"]["content"]["application/json"]
    assert {"images", "answers", "force"} <= set(lesion_props["schema"]["properties"])
    batch_items = schema["paths"]["/v1/predict/batch"]["post"]["requestBody"]["content"]["application/json"]
    assert "answers" in batch_items["schema"]["properties"]["images"]["items"]["anyOf"][1]["properties"]

    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text and "http://" not in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:  # every file the page loads comes from this server
        got = client.get(asset)
        assert asset.startswith("/") and got.status_code == 200 and len(got.content) > 100, asset


def test_metrics_name_the_lesion_route(predictor: Predictor, jpeg: bytes) -> None:
    with make_client(predictor) as c:
        assert c.post("/v1/predict/lesion", json={"images": [b64(jpeg)]}).status_code == 200
        text = c.get("/metrics").text
    assert 'skinscan_requests_total{route="/v1/predict/lesion",status="200"} 1.0' in text
    assert 'route="other"' not in text
