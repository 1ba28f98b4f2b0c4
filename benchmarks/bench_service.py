"""Load test of `skinscan serve` against two baselines measured in the same run, on loopback.

Systems (each a separate server process, started and stopped here):
  serve     `skinscan serve`: ONNX Runtime, model loaded once, dynamic batching (one process).
  serve-workers  the same with `--workers <cores> --threads 1`: one process per core (each its own GIL
            and batcher, one ONNX Runtime thread each; /metrics adds up the workers).
  torch     the same network in PyTorch eager (inference_mode, channels_last, glibc malloc tuning) in a
            plain FastAPI handler, one image per call, no batching; needs a training run folder (--run).
  reload    the prototype's pattern: the ONNX model loaded from disk on every request.

For each system and concurrency level (default 1, 8, 32) a bounded load generator sends a fixed number
of 224x224 JPEGs (examples/isic-*.jpg, raw image/jpeg bodies) with a time limit, then reports throughput,
p50/p99 latency and the server's peak RSS (VmHWM). A generated 12-megapixel phone JPEG (4000x3000) is
timed at concurrency 1. The load generator (raw keep-alive sockets, ~0.1 ms CPU per request) shares the
CPU with the server: run on a quiet machine. `--repeat N` runs the systems N times, interleaved, and
reports medians and serve's throughput over each baseline's, paired within a repeat.

    python benchmarks/bench_service.py --repeat 3 --out benchmarks/results/service.json
    python benchmarks/bench_service.py --requests 20 --concurrency 1 8 --systems serve reload  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SMALL_IMAGES = sorted((REPO / "examples").glob("isic-*.jpg"))
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "10000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}
GOALS = "goals: serve >= 3x torch throughput at c=8; p99 at c=8 < 150 ms; 12 MP photo < 150 ms; RSS < 400 MB"


# ---------------------------------------------------------------- the two baseline servers
def _torch_app(runs: list[Path], model: Path):
    """PyTorch eager, one image per request, no batching: the naive way to serve the trained network (the
    mean logit of several, for an ensemble model); temperature and threshold from the served model's card."""
    import torch

    from skinscan.errors import InvalidImage
    from skinscan.export import load_run_model
    from skinscan.predict import Predictor
    from skinscan.preprocess import preprocess

    loaded = [load_run_model(run) for run in runs]
    nets = [net.to(memory_format=torch.channels_last) for net, _ in loaded]
    spec = loaded[0][1].preprocess_spec()
    card = Predictor(model).card
    temperature, threshold = card.temperature, card.threshold

    def infer(body: bytes) -> dict:
        x = torch.from_numpy(preprocess(body, spec)[None]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logit = float(sum(net(x)[0] for net in nets)) / len(nets)
        p = 1.0 / (1.0 + math.exp(-logit / temperature))
        return {"probability": p, "decision": "refer" if p >= threshold else "monitor"}

    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(infer, await request.body()))
        except InvalidImage as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


def _reload_app(model: Path):
    """The prototype's pattern: every request loads the model from disk before predicting."""
    from skinscan.predict import Predictor

    def infer(body: bytes) -> dict:
        return Predictor(model)(body).to_dict()

    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        result = await run_in_threadpool(infer, await request.body())
        return JSONResponse(result, status_code=200 if result["error"] is None else 422)

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


def _serve_baseline(kind: str, port: int, runs: list[Path], model: Path) -> None:
    import uvicorn

    app = _torch_app(runs, model) if kind == "torch" else _reload_app(model)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(system: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ)
    if system.startswith("serve"):
        cmd = [sys.executable, "-m", "skinscan", "serve", "--port", str(port)]
        if system == "serve-workers":  # one process per core, one ONNX Runtime thread each
            cmd += ["--workers", str(os.cpu_count() or 1), "--threads", "1"]
        elif system == "serve-replicas":  # Ray Serve (benchmarks/bench_scale.py)
            cmd += ["--replicas", "2"]
            env["RAY_USAGE_STATS_ENABLED"] = "0"
        cmd += ["--model", str(args.model)] if args.model else []
        env.pop("SKINSCAN_API_KEY", None)
    else:
        cmd = [sys.executable, __file__, "--serve-baseline", system, "--port", str(port), "--run", *map(str, args.run)]
        cmd += ["--model", str(args.model)] if args.model else []
        if system == "torch":
            env.update(MALLOC_ENV)
    # The server logs a line per request: a file, not a pipe, which would fill up and stall the server.
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (it lives as long as the server)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{system} server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                if system == "serve-replicas":
                    time.sleep(3)  # every replica warmed up, not only the first that answered
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{system} server not ready within 180 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _peak_rss_mb(pid: int) -> float | None:
    """The largest peak RSS (VmHWM) of the server process and its worker processes, in MB."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    peaks = []
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
    return max(peaks) if peaks else None


# ---------------------------------------------------------------- load generator
class _Connection:
    """One keep-alive HTTP/1.1 connection sending pre-encoded requests. The generator shares the 2 cores
    with the server, so it must cost little per request: a raw socket reading the status line and
    Content-Length costs ~10x less CPU than an httpx client, and it is the same for every system."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def _request(host: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _load(url: str, bodies: list[bytes], concurrency: int, n: int, time_limit: float) -> dict:
    """`n` requests from `concurrency` workers (one connection each), or fewer if `time_limit` passes first."""
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    sent = 0
    host, port = url.removeprefix("http://").split(":")
    requests = [_request(host, int(port), b) for b in bodies]
    connections = [_Connection(host, int(port)) for _ in range(concurrency)]
    for i, conn in enumerate(connections):  # open and warm every connection
        await conn.post(requests[i % len(requests)])
    started = time.perf_counter()
    stop_at = started + time_limit

    async def worker(conn: _Connection) -> None:
        nonlocal sent, errors, first_error
        while sent < n and time.perf_counter() < stop_at:
            request = requests[sent % len(requests)]
            sent += 1
            t = time.perf_counter()
            status, body = await conn.post(request)
            if status == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1
                first_error = first_error or f"{status} {body[:200]!r}"

    await asyncio.gather(*(worker(c) for c in connections))
    seconds = time.perf_counter() - started
    for conn in connections:
        await conn.close()
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, math.ceil(q * len(latencies)) - 1)], 1)

    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(seconds, 3),
        "throughput_rps": round(len(latencies) / seconds, 2) if seconds > 0 else None,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
        "time_limited": len(latencies) + errors < n,
        "first_error": first_error,
    }


def _phone_photo() -> bytes:
    """A 4000x3000 JPEG with texture (a flat image would decode unrealistically fast)."""
    base = Image.effect_noise((1000, 750), 40).convert("RGB").resize((4000, 3000), Image.BILINEAR)
    tint = Image.new("RGB", (4000, 3000), (205, 160, 140))
    buf = io.BytesIO()
    Image.blend(base, tint, 0.6).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _bench_system(system: str, args: argparse.Namespace, small: list[bytes], phone: bytes) -> dict:
    proc, url = _start(system, args)
    out: dict = {"system": system, "levels": []}
    try:
        for c in args.concurrency:
            n = args.requests if system != "reload" else min(args.requests, args.reload_requests)
            level = asyncio.run(_load(url, small, c, n, args.time_limit))
            out["levels"].append(level)
            print(f"  {system:>6} c={c:<3} {level}", file=sys.stderr)
        if system in args.phone_systems:
            out["phone_12mp"] = asyncio.run(_load(url, [phone], 1, args.phone_requests, args.time_limit))
            print(f"  {system:>6} 12 MP {out['phone_12mp']}", file=sys.stderr)
        out["peak_rss_mb"] = _peak_rss_mb(proc.pid)
    finally:
        _stop(proc)
    return out


def _markdown(results: list[dict]) -> str:
    rows = [
        "| system | concurrency | requests | throughput (req/s) | p50 (ms) | p99 (ms) | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        rss = f"{res['peak_rss_mb']:.0f}" if res.get("peak_rss_mb") else "-"
        levels = [*res["levels"], *([dict(res["phone_12mp"], concurrency="1 (12 MP)")] if "phone_12mp" in res else [])]
        for lv in levels:
            rows.append(
                f"| {res['system']} | {lv['concurrency']} | {lv['requests']}{'*' if lv['time_limited'] else ''} | "
                f"{lv['throughput_rps']} | {lv['p50_ms']} | {lv['p99_ms']} | {rss} |"
            )
    rows.append("\n`*`: stopped by the time limit before the request count. " + GOALS)
    return "\n".join(rows)


def _summary(results: list[dict], args: argparse.Namespace) -> str:
    """Medians over the repeats, and serve's throughput over each baseline's, paired run by run."""
    lines = [
        "| system | concurrency | median throughput (req/s) | median p99 (ms) | runs |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    by: dict[tuple[str, int], list[dict]] = {}
    for res in results:
        for lv in res["levels"]:
            by.setdefault((res["system"], lv["concurrency"]), []).append({**lv, "repeat": res["repeat"]})
    for (system, c), levels in by.items():
        tput = statistics.median(lv["throughput_rps"] for lv in levels)
        p99 = statistics.median(lv["p99_ms"] for lv in levels)
        lines.append(f"| {system} | {c} | {tput:.1f} | {p99:.1f} | {len(levels)} |")
    for serve, base in [(s, b) for s in ("serve", "serve-workers") for b in ("torch", "reload")]:
        for c in args.concurrency:
            pairs = [
                (a["throughput_rps"], b["throughput_rps"])
                for a in by.get((serve, c), [])
                for b in by.get((base, c), [])
                if a["repeat"] == b["repeat"]
            ]
            if pairs:
                ratios = [a / b for a, b in pairs]
                shown = ", ".join(f"{x:.2f}" for x in ratios)
                lines.append(f"\n{serve} / {base} at c={c}: median {statistics.median(ratios):.2f}x (runs: {shown})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="ONNX model (default: the bundled model)")
    p.add_argument(
        "--run",
        type=Path,
        nargs="+",
        help="training run(s) of the served model, for the torch baseline (default: the runs its model card names "
        "for an ensemble, else runs/skinscan-phone: the default model)",
    )
    p.add_argument(
        "--systems",
        nargs="+",
        default=["serve", "serve-workers", "torch", "reload"],
        choices=["serve", "serve-workers", "torch", "reload"],
        help="serve-workers: skinscan serve --workers <cores> --threads 1",
    )
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=400, help="requests per level (default 400)")
    p.add_argument("--reload-requests", type=int, default=100, help="cap for the slow reload baseline (default 100)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most (default 60)")
    p.add_argument("--phone-requests", type=int, default=20, help="12 MP requests at concurrency 1 (default 20)")
    p.add_argument(
        "--phone-systems",
        nargs="*",
        default=["serve", "serve-workers", "torch"],
        help="systems timed on the 12 MP photo",
    )
    p.add_argument("--repeat", type=int, default=1, help="run every system this many times, interleaved (medians)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--serve-baseline", choices=["torch", "reload"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.run = args.run or _card_runs(args.model or _bundled_model())
    if args.serve_baseline:
        model = args.model or _bundled_model()
        _serve_baseline(args.serve_baseline, args.port, args.run, model)
        return 0
    missing = [str(r) for r in args.run if not (r / "best.pt").is_file()]
    if "torch" in args.systems and missing:
        p.error(f"--run {' '.join(missing)}: no best.pt there; train first or pass --run, or leave out --systems torch")
    small = [f.read_bytes() for f in SMALL_IMAGES]
    phone = _phone_photo()
    results = []
    for r in range(args.repeat):  # systems interleaved, so that a slow spell of the machine hits them all
        for system in args.systems:
            results.append({**_bench_system(system, args, small, phone), "repeat": r})
    table = _markdown(results) + "\n\n" + _summary(results, args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
        payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "host": meta, "results": results}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _card_runs(model: Path) -> list[Path]:
    """The training runs an ensemble model's card names (`skinscan export RUN RUN ...`), else the default's."""
    from skinscan.predict import Predictor

    members = (Predictor(model).card.model_extra.get("training") or {}).get("members") or []
    return [REPO / m["run"] for m in members] or [REPO / "runs/skinscan-phone"]


def _bundled_model() -> Path:
    from skinscan.card import default_model_path

    return default_model_path()


if __name__ == "__main__":
    sys.exit(main())
