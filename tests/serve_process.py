"""Start and stop a real `skinscan serve` process on a free loopback port (end-to-end tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(
    model: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (), port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """`skinscan serve --model MODEL` with `env` (default: this environment without SKINSCAN_* settings) on
    `port` (default: a free one); returns the process and its base URL once /v2/health/ready answers 200
    (fails the test otherwise)."""
    port = port or free_port()
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKINSCAN_")}
    cmd = [sys.executable, "-m", "skinscan", "serve", "--model", str(model), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"skinscan serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("skinscan serve did not become ready within 60 s")


def stop_serve(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
