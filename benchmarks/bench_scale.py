"""`skinscan batch` (Ray Data) against `skinscan predict`, and `skinscan serve --replicas 2` (Ray Serve)
against `skinscan serve`, measured in the same run on this machine.

1. Throughput: both CLIs score the same images (isic-mvb test + pad-ufes-20-phone, 1246 photos) into a
   file, timed end to end, `--repeat` times, interleaved. Steady-state img/s, without start-up: for
   predict (N - n) / (T_N - T_n) with a short run of the first `--small` images; for batch, from its
   Parquet parts (written as blocks finish): rows after the first part / time from first to last part.
   start-up = T_N - N / steady.
2. CPU cost per image: a one-thread Predictor (what one Ray actor runs) over each kind of photo, CPU
   seconds per image (process_time): 224 px archive images, the phone set's photos, a 12 MP phone JPEG.
   From it, on paper: the cores (and 16-core nodes) for one million images per hour.
3. Serving: `skinscan serve --replicas 2` vs `skinscan serve` at concurrency 8 with bench_service's load
   generator (224 px JPEGs), interleaved `--repeat` times.

    python benchmarks/bench_scale.py --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import SMALL_IMAGES, _load, _peak_rss_mb, _phone_photo, _start, _stop

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def _images(data_root: Path) -> list[str]:
    data_root = data_root.resolve()  # absolute: a table's relative paths are read relative to the table
    isic = sorted(str(p) for p in (data_root / "isic-mvb" / "test").rglob("*.jpg"))
    phone = sorted(str(p) for p in (data_root / "pad-ufes-20-phone" / "images").glob("*"))
    if not isic or not phone:
        raise SystemExit(f"{data_root}: isic-mvb/test or pad-ufes-20-phone/images not found (--data-root)")
    return isic + phone


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])}... failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t


def _run_cli(tool: str, paths: list[str], work: Path, tag: str) -> tuple[float, float | None]:
    table = work / f"{tag}.csv"
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path"])
        w.writerows([p] for p in paths)
    if tool == "predict":  # predict takes the files themselves
        cmd = [sys.executable, "-m", "skinscan", "predict", *paths, "-q", "-o", str(work / f"{tag}.out.csv")]
    else:
        cmd = [sys.executable, "-m", "skinscan", "batch", str(table), "-q", "-o", str(work / f"{tag}.parquet")]
    seconds = _timed(cmd)
    if tool == "predict":
        return seconds, None
    import pyarrow.parquet as pq

    # every image scored, none an error: a wrong path must not look fast
    errors = pq.read_table(work / f"{tag}.parquet").column("error").drop_null()
    if len(errors):
        raise SystemExit(f"skinscan batch: {len(errors)} rows with errors, e.g. {errors[0]}")
    # steady state inside the run: the parts are written as blocks finish, so the rows after the first
    # part over the time from the first part to the last exclude Ray's and the actors' start-up
    parts = sorted((work / f"{tag}.parquet").glob("part-*.parquet"), key=lambda f: f.stat().st_mtime)
    if len(parts) < 3:
        return seconds, None
    rows = sum(pq.read_metadata(f).num_rows for f in parts[1:])
    return seconds, rows / (parts[-1].stat().st_mtime - parts[0].stat().st_mtime)


def throughput(paths: list[str], small: int, repeat: int) -> dict:
    runs: dict[str, list[dict]] = {"predict": [], "batch": []}
    for r in range(repeat):
        for tool in ("predict", "batch"):
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                t_small, _ = _run_cli(tool, paths[:small], work, "small")
                t_all, in_run = _run_cli(tool, paths, work, "all")
            # predict: steady rate from the difference of a short and a full run (its start-up is ~0.3 s
            # and steady); batch: from its part files (Ray's start-up varies by seconds between runs)
            steady = in_run if in_run is not None else (len(paths) - small) / (t_all - t_small)
            run = {
                "repeat": r,
                "seconds_all": round(t_all, 2),
                "seconds_small": round(t_small, 2),
                "end_to_end_img_s": round(len(paths) / t_all, 1),
                "steady_img_s": round(steady, 1),
                "startup_s": round(t_all - len(paths) / steady, 2),
            }
            runs[tool].append(run)
            print(f"  {tool:>7} {run}", file=sys.stderr)
    summary = {}
    for tool, rs in runs.items():
        summary[tool] = {k: statistics.median(x[k] for x in rs) for k in rs[0] if k != "repeat"}
    ratios = [b["steady_img_s"] / p["steady_img_s"] for p, b in zip(runs["predict"], runs["batch"], strict=True)]
    e2e = [b["end_to_end_img_s"] / p["end_to_end_img_s"] for p, b in zip(runs["predict"], runs["batch"], strict=True)]
    return {
        "images": len(paths),
        "small": small,
        "runs": runs,
        "median": summary,
        "batch_over_predict_steady": [round(x, 2) for x in ratios],
        "batch_over_predict_end_to_end": [round(x, 2) for x in e2e],
    }


def cpu_per_image(paths: list[str], n_isic: int) -> dict:
    from skinscan.predict import Predictor

    predictor = Predictor(threads=1)  # what one actor of `skinscan batch` runs
    big = _phone_photo()
    kinds = {"isic-mvb 224 px": paths[:n_isic], "phone set photos": paths[n_isic:], "12 MP phone JPEG": [big] * 10}
    out = {}
    for kind, items in kinds.items():
        predictor.predict(items[:4], batch_size=4)  # warm
        t = time.process_time()
        predictor.predict(items, batch_size=32)
        out[kind] = round((time.process_time() - t) / len(items) * 1000, 2)
        print(f"  cpu {kind}: {out[kind]} ms/image", file=sys.stderr)
    return out


def sizing(cpu_ms: dict, efficiency: float) -> dict:
    """Cores for 1e6 images/hour = 1e6 * CPU s per image / 3600 / efficiency."""
    return {
        kind: {
            "cores": round(1e6 * ms / 1000 / 3600 / efficiency, 1),
            "nodes_16_cores": int(-(-1e6 * ms / 1000 / 3600 / efficiency // 16)),
        }
        for kind, ms in cpu_ms.items()
    }


def _ray_rss_mb() -> float:
    """Total RSS of the Ray processes (raylet, GCS, proxy, controller, replicas) now, in MB."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            if b"ray" in cmd.split(b"\0")[0] or cmd.startswith(b"ray::"):
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def serving(repeat: int, requests: int) -> dict:
    bodies = [f.read_bytes() for f in SMALL_IMAGES]
    runs: dict[str, list[dict]] = {"serve": [], "serve --replicas 2": []}
    server_args = argparse.Namespace(model=None, run=None)  # the bundled default model
    for r in range(repeat):
        for name, system in (("serve", "serve"), ("serve --replicas 2", "serve-replicas")):
            proc, url = _start(system, server_args)
            try:
                level = asyncio.run(_load(url, bodies, 8, requests, 60))
                level["peak_rss_mb"] = _peak_rss_mb(proc.pid)
                if system == "serve-replicas":
                    level["ray_processes_rss_mb"] = round(_ray_rss_mb())
                level["repeat"] = r
                runs[name].append(level)
                print(f"  {name}: {level}", file=sys.stderr)
            finally:
                _stop(proc)
    ratios = [
        b["throughput_rps"] / a["throughput_rps"]
        for a, b in zip(runs["serve"], runs["serve --replicas 2"], strict=True)
    ]
    return {
        "runs": runs,
        "median_rps": {k: statistics.median(x["throughput_rps"] for x in v) for k, v in runs.items()},
        "median_p99_ms": {k: statistics.median(x["p99_ms"] for x in v) for k, v in runs.items()},
        "replicas_over_single": [round(x, 2) for x in ratios],
    }


def _markdown(res: dict) -> str:
    t = res["throughput"]
    m = t["median"]
    lines = [
        f"### `skinscan batch` vs `skinscan predict`: {t['images']} images, medians of {len(t['runs']['batch'])} runs",
        "",
        "| command | end to end (s) | end to end img/s | start-up (s) | steady img/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for tool in ("predict", "batch"):
        x = m[tool]
        lines.append(
            f"| skinscan {tool} | {x['seconds_all']} | {x['end_to_end_img_s']} | {x['startup_s']} | {x['steady_img_s']} |"
        )
    lines += [
        "",
        f"batch / predict, steady: median {statistics.median(t['batch_over_predict_steady']):.2f}x "
        f"(runs {t['batch_over_predict_steady']}); end to end: median "
        f"{statistics.median(t['batch_over_predict_end_to_end']):.2f}x (runs {t['batch_over_predict_end_to_end']})",
        "",
        "### CPU per image (one-thread Predictor, as in one actor) and cores for 1,000,000 images per hour",
        "",
        "| photos | CPU ms / image | cores | 16-core nodes |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, ms in res["cpu_ms_per_image"].items():
        s = res["sizing"][kind]
        lines.append(f"| {kind} | {ms} | {s['cores']} | {s['nodes_16_cores']} |")
    lines.append(f"\n(cores = 1e6 x CPU s per image / 3600 / {res['efficiency']:.2f}, the measured actor efficiency)")
    s = res["serving"]
    lines += [
        "",
        f"### Ray Serve, 2 replicas, vs one `skinscan serve` process (c=8, medians of {len(s['replicas_over_single'])})",
        "",
        "| server | req/s | p99 (ms) |",
        "| --- | ---: | ---: |",
    ]
    for k in s["median_rps"]:
        lines.append(f"| skinscan {k} | {s['median_rps'][k]} | {s['median_p99_ms'][k]} |")
    lines.append(f"\nreplicas / single: runs {s['replicas_over_single']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("SKINSCAN_DATA", "../shared/datasets")))
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement, interleaved (default 3)")
    p.add_argument("--small", type=int, default=64, help="images of the short run that measures start-up")
    p.add_argument("--requests", type=int, default=1000, help="requests per serving run (default 1000)")
    p.add_argument("--out", type=Path, help="write the results as JSON (and .md beside it) here")
    args = p.parse_args(argv)
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        raise SystemExit("needs the scale extra: pip install -e '.[scale]'")
    paths = _images(args.data_root)
    n_isic = sum("isic-mvb" in x for x in paths)
    print("throughput", file=sys.stderr)
    res: dict = {"throughput": throughput(paths, args.small, args.repeat)}
    print("cpu per image", file=sys.stderr)
    res["cpu_ms_per_image"] = cpu_per_image(paths, n_isic)
    # how much of the machine's cores the batch job turns into images, steady state (1.0: every core busy)
    cores = os.cpu_count() or 1
    mean_ms = statistics.fmean(
        [res["cpu_ms_per_image"]["isic-mvb 224 px"]] * n_isic
        + [res["cpu_ms_per_image"]["phone set photos"]] * (len(paths) - n_isic)
    )
    ideal = cores * 1000 / mean_ms
    res["efficiency"] = round(min(1.0, res["throughput"]["median"]["batch"]["steady_img_s"] / ideal), 2)
    res["sizing"] = sizing(res["cpu_ms_per_image"], res["efficiency"])
    print("serving", file=sys.stderr)
    res["serving"] = serving(args.repeat, args.requests)
    res["host"] = {"cpu_count": cores, "machine": platform.machine(), "python": platform.python_version()}
    table = _markdown(res)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
