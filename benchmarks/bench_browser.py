"""Private mode's size and speed in headless Chromium on this machine, beside the server in the same run.

    python benchmarks/bench_browser.py [--browser-model skinscan-lite0-sources-int8] [--photos 10]

Starts `skinscan serve` (the server's model: the same file as the page's), opens the page in a fresh
browser profile and measures: bytes on the wire for the first visit (compressed bodies, every request
until the first result), time to the first result (cold: runtime and model fetched from the local server),
time per further check on the device, and the server's time for the same photos (POST /v1/predict).
Then the same photos in a second fresh profile whose browser reports twice this machine's cores, so that
ONNX Runtime Web (half the cores, at most 4) runs on `--threads` WebAssembly threads instead of one: the
further checks of both, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def visit(browser, url: str, photos: list[Path], cores: int | None = None) -> tuple[int, list[float], int]:
    """A first visit in a fresh profile (its browser reporting `cores` cores, if given), checking every photo on
    the device: bytes on the wire until the first result, each check's seconds (the first: from opening the
    page), and the WebAssembly threads the checks ran on."""
    context = browser.new_context()
    if cores:
        context.add_init_script(f"Object.defineProperty(navigator, 'hardwareConcurrency', {{get: () => {cores}}})")
    page = context.new_page()
    responses = []
    page.on("requestfinished", lambda r: responses.append(r))
    t = time.perf_counter()
    page.goto(url + "/")
    page.wait_for_selector("html[data-ready='true']")
    times, wire, threads = [], 0, 1
    for i, photo in enumerate(photos):
        if i:
            page.click("#restart-button")
        start = time.perf_counter()
        page.set_input_files("#file-input", str(photo))
        el = page.wait_for_selector(".outcome[data-mode='device'], .error-box", timeout=180_000)
        times.append(time.perf_counter() - (t if i == 0 else start))
        threads = int(el.get_attribute("data-threads") or threads)
        if i == 0:
            wire = sum(max(0, r.sizes()["responseBodySize"]) + r.sizes()["responseHeadersSize"] for r in responses)
    context.close()
    return wire, times, threads


def main() -> None:
    from playwright.sync_api import sync_playwright

    from serve_process import start_serve, stop_serve
    from skinscan.card import BROWSER_MODEL, resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--browser-model", default=BROWSER_MODEL)
    ap.add_argument("--photos", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="WebAssembly threads of the second profile (default 2)")
    ap.add_argument("--out", default="benchmarks/results/browser.json")
    args = ap.parse_args()
    model = resolve_model(args.browser_model)
    photos = sorted((REPO.parent / "shared" / "datasets" / "pad-ufes-20-phone" / "images").glob("*.jpg"))[::40][
        : args.photos
    ] or sorted((REPO / "examples").glob("*.jpg"))
    proc, url = start_serve(model, args=("--browser-model", str(model)))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
            wire, times, threads = visit(browser, url, photos)
            _, times_mt, threads_mt = visit(browser, url, photos, cores=2 * args.threads)
            browser.close()
        server = []
        for photo in photos:
            data = photo.read_bytes()
            start = time.perf_counter()
            httpx.post(f"{url}/v1/predict", files={"file": data}, timeout=60).raise_for_status()
            server.append(time.perf_counter() - start)
    finally:
        stop_serve(proc)
    result = {
        "model": model.name,
        "photos": len(photos),
        "first_visit_bytes_on_wire": wire,
        "cold_first_result_s": round(times[0], 2),
        "warm_check_s_median": round(statistics.median(times[1:]), 3),
        "warm_check_s_max": round(max(times[1:]), 3),
        "threads": threads,
        f"warm_check_s_median_{threads_mt}_threads": round(statistics.median(times_mt[1:]), 3),
        f"warm_check_s_max_{threads_mt}_threads": round(max(times_mt[1:]), 3),
        "server_check_s_median": round(statistics.median(server[1:]), 3),
        "machine": f"{os.cpu_count()} shared CPU cores, headless Chromium",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
