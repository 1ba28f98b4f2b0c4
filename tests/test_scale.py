"""`skinscan batch` (Ray Data) and `skinscan serve --replicas` (Ray Serve): on Ray started in-process, on a
real local cluster (`ray start --head` on free loopback ports), with a worker killed mid-run, and against the
single-process service."""

from __future__ import annotations

import base64
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve_process import free_port, start_serve, stop_serve

pytest.importorskip("ray", reason="the scale extra is not installed: pip install -e '.[scale]'")
pa = pytest.importorskip("pyarrow")

from skinscan.errors import InvalidAnswers, SkinscanError  # noqa: E402
from skinscan.ray_batch import list_inputs, read_image_bytes, read_output, scored_paths  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# A loopback test cluster without token authentication (both sides must agree on the mode).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKINSCAN_", "RAY_ADDRESS"))}
    return {**env, **RAY_ENV}


def batch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skinscan", "batch", *args], capture_output=True, text=True, env=_env(), timeout=timeout
    )


def write_table(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    """The six examples plus a file that is not an image and a truncated JPEG."""
    folder = tmp_path / "in"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("*.md"))
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.jpg").write_text("not an image")
    (folder / "sub" / "cut.jpg").write_bytes((EXAMPLES / "isic-benign-1.jpg").read_bytes()[:2500])
    return folder


# ---------------------------------------------------------------- inputs (no Ray needed)
def test_inputs_from_folder_glob_table_and_uri(messy_folder: Path, tmp_path: Path):
    from_folder = list_inputs(messy_folder).paths
    assert len(from_folder) == 8 and all(Path(p).is_file() for p in from_folder)
    assert sorted(list_inputs(f"{messy_folder}/**/*.jpg").paths) == sorted(from_folder)
    assert list_inputs(f"file://{messy_folder}").paths == [f"file://{p}" for p in from_folder]

    table = write_table(
        messy_folder / "list.csv",
        [
            {"path": "isic-benign-1.jpg", "age": "67", "bleed": "yes", "diagnosis": "x"},
            {"path": "sub/notes.jpg", "age": "", "bleed": "", "diagnosis": "y"},
            {"path": "isic-benign-1.jpg", "age": "67", "bleed": "yes", "diagnosis": "x"},  # a repeat: once
        ],
    )
    got = list_inputs(table)
    assert got.paths == [f"{messy_folder}/isic-benign-1.jpg", f"{messy_folder}/sub/notes.jpg"]
    assert got.answers[0].known() == {"age": 67.0, "bleed": "yes"} and got.answers[1].empty
    pq_path = tmp_path / "list.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(messy_folder / "isic-benign-2.jpg")]}), pq_path)
    assert (
        list_inputs(pq_path).paths == [str(messy_folder / "isic-benign-2.jpg")] and list_inputs(pq_path).answers is None
    )


def test_images_are_read_through_pyarrow_filesystems_for_uris(messy_folder: Path):
    local = messy_folder / "isic-benign-1.jpg"
    assert read_image_bytes(f"file://{local}") == read_image_bytes(str(local)) == local.read_bytes()
    with pytest.raises(FileNotFoundError):
        read_image_bytes(f"file://{messy_folder}/missing.jpg")  # the actor turns this into the row's error
    with pytest.raises(SkinscanError, match="pyarrow filesystems"):
        list_inputs("nosuchscheme://bucket/photos/")


def test_inputs_refuse_with_clear_errors(tmp_path: Path):
    with pytest.raises(SkinscanError, match="no such file, folder or table"):
        list_inputs(tmp_path / "nothing")
    with pytest.raises(SkinscanError, match="needs a 'path' column"):
        list_inputs(write_table(tmp_path / "a.csv", [{"file": "x.jpg"}]))
    bad_answer = list_inputs(
        write_table(tmp_path / "b.csv", [{"path": "x.jpg", "age": "old"}, {"path": "y.jpg", "age": "4"}])
    )
    assert "b.csv:2: invalid answer: age must be a number" in bad_answer.answers[0]  # that row's error, kept
    assert bad_answer.answers[1].known() == {"age": 4.0}
    with pytest.raises(InvalidAnswers, match="twice with different answers"):
        list_inputs(
            write_table(tmp_path / "c.csv", [{"path": "x.jpg", "bleed": "yes"}, {"path": "x.jpg", "bleed": "no"}])
        )
    (tmp_path / "out.parquet").write_text("a file, not a batch output")
    with pytest.raises(SkinscanError, match="not a folder"):
        scored_paths(tmp_path / "out.parquet")


# ---------------------------------------------------------------- Ray started in-process
def test_batch_in_process_matches_predict_and_resumes(messy_folder: Path, tmp_path: Path, predictor):
    out = tmp_path / "scores.parquet"
    first = sorted(list_inputs(messy_folder).paths)[:5]
    write_table(tmp_path / "first.csv", [{"path": p} for p in first])
    run = batch(str(tmp_path / "first.csv"), "-o", str(out), "--batch-size", "4")
    assert run.returncode == 0, run.stderr
    assert "5 image(s) scored" in run.stderr and "Traceback" not in run.stderr
    assert len(read_output(out)) == 5

    (out / ".part-stopped-000009.parquet.tmp").write_bytes(b"half a file")  # a run killed mid-write
    run = batch(str(messy_folder), "-o", str(out), "--batch-size", "4")
    assert run.returncode == 3, run.stderr  # two of them could not be read: their rows are written
    assert "3 image(s) scored" in run.stderr and "5 already there, skipped" in run.stderr
    assert not list(out.glob(".*.tmp"))
    table = read_output(out)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(table) == len(rows) == 8  # every input exactly once

    expected = predictor.predict(list_inputs(messy_folder).paths)
    for want in expected:
        got = rows[want.path]
        assert got["error"] == want.error and got["quality"] == want.quality and got["decision"] == want.decision
        assert got["reasons"] == list(want.reasons)
        assert got["threshold"] == want.threshold if want.error else got["threshold"] == pytest.approx(want.threshold)
        assert got["photo_type"] == want.photo_type
        if want.probability is None:
            assert got["probability"] is None
        else:
            assert abs(got["probability"] - want.probability) < 1e-5
        assert got["model_version"] == predictor.card.version and got["model_sha256"] == predictor.sha256
    assert sum(r["error"] is not None for r in rows.values()) == 2

    again = batch(str(messy_folder), "-o", str(out))
    assert again.returncode == 0 and "0 image(s) scored" in again.stderr and len(read_output(out)) == 8


def test_batch_applies_answers_from_the_table(tmp_path: Path, predictor):
    table = write_table(
        tmp_path / "answers.csv",
        [
            {"path": str(EXAMPLES / "isic-benign-1.jpg"), "age": "67", "bleed": "yes"},
            {"path": str(EXAMPLES / "phone-benign-nevus.jpg"), "age": "", "bleed": ""},
            {"path": str(EXAMPLES / "isic-benign-2.jpg"), "age": "", "bleed": "sometimes"},  # that row's error
        ],
    )
    run = batch(str(table), "-o", str(tmp_path / "out.parquet"), "-q")
    assert run.returncode == 3, run.stderr
    rows = {r["path"]: r for r in read_output(tmp_path / "out.parquet").to_pylist()}
    from skinscan.answers import Answers

    want = predictor(EXAMPLES / "isic-benign-1.jpg", answers=Answers(age=67, bleed="yes"))
    got = rows[str(EXAMPLES / "isic-benign-1.jpg")]
    assert (
        abs(got["probability"] - want.probability) < 1e-5
        and abs(got["image_probability"] - want.image_probability) < 1e-5
    )
    assert [a["answer"] for a in got["adjustments"]] == ["age", "bleed"]
    assert rows[str(EXAMPLES / "phone-benign-nevus.jpg")]["adjustments"] == []
    bad = rows[str(EXAMPLES / "isic-benign-2.jpg")]
    assert "answers.csv:4" in bad["error"] and "bleed must be yes, no or unknown" in bad["error"]
    assert bad["probability"] is None and bad["threshold"] is None and bad["decision"] is None


def test_batch_cli_errors_are_clear(tmp_path: Path):
    missing = batch(str(tmp_path / "none"), "-o", str(tmp_path / "o.parquet"))
    assert missing.returncode == 2 and "error:" in missing.stderr and "Traceback" not in missing.stderr
    nobody = batch(
        str(EXAMPLES), "-o", str(tmp_path / "o.parquet"), "--address", f"127.0.0.1:{free_port()}", timeout=60
    )
    assert (
        nobody.returncode == 2 and "cannot reach the Ray cluster" in nobody.stderr and "Traceback" not in nobody.stderr
    )
    bad_model = batch(str(EXAMPLES), "-o", str(tmp_path / "o.parquet"), "--model", str(EXAMPLES / "SOURCES.md"))
    assert bad_model.returncode == 2 and "cannot load" in bad_model.stderr and "Traceback" not in bad_model.stderr


# ---------------------------------------------------------------- a real local cluster
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head` in its own process group on free loopback ports; its address."""
    port = free_port()
    temp = Path(f"/tmp/skinscan-ray-{os.getpid()}")  # Ray's socket paths must stay short
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"  # the ray beside this Python
    cmd = [
        ray, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
        "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp),
        "--object-store-memory", str(300 * 1024 * 1024),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with log.open("w") as fh:
        head = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while "--block" not in log.read_text() or "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block stops every process it started
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its monitor loop can outlive the processes it watched
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.data
def test_batch_on_a_local_cluster_equals_predict_on_both_datasets(ray_cluster, isic_mvb, pad_ufes, tmp_path, predictor):
    """The bar: over the isic-mvb test split and the phone set, one row per input, corrupt files included,
    with predict's probability (within 1e-5), decision and quality."""
    paths = sorted(str(p) for p in (isic_mvb / "test").rglob("*.jpg")) + sorted(
        str(p) for p in (pad_ufes / "images").glob("*")
    )
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    paths += [str(tmp_path / "corrupt.jpg"), str(tmp_path / "gone.png")]
    write_table(tmp_path / "inputs.csv", [{"path": p} for p in paths])
    out = tmp_path / "out.parquet"
    run = batch(str(tmp_path / "inputs.csv"), "-o", str(out), "--address", ray_cluster, "-q")
    assert run.returncode == 3, run.stderr[-3000:]  # the two bad inputs: rows with their error
    table = read_output(out)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(table) == len(rows) == len(paths) == 660 + 586 + 2

    expected = predictor.predict(paths, batch_size=32)
    worst = 0.0
    for want in expected:
        got = rows[want.path]
        assert (got["decision"], got["quality"], got["error"] is None) == (want.decision, want.quality, want.ok), (
            want.path
        )
        if want.probability is not None:
            worst = max(worst, abs(got["probability"] - want.probability))
    assert worst < 1e-5
    assert rows[str(tmp_path / "gone.png")]["error"].startswith("cannot read")
    assert rows[str(tmp_path / "corrupt.jpg")]["error"] and rows[str(tmp_path / "corrupt.jpg")]["probability"] is None


def _scorer_pids() -> list[int]:
    """Ray worker processes running skinscan's scoring actor (Ray titles them ray::MapWorker(...))."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if title.startswith(b"ray::MapWorker(MapBatches(_Scorer))"):
                pids.append(int(proc.name))
    return pids


@pytest.mark.data
def test_batch_survives_a_killed_worker(ray_cluster, pad_ufes, tmp_path):
    """SIGKILL one scoring actor mid-run: Ray restarts it and retries its block; every input appears once."""
    inputs = sorted(str(p) for p in (pad_ufes / "images").glob("*"))
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "skinscan", "batch", str(pad_ufes / "images"), "-o", str(out)]
    cmd += ["--address", ray_cluster, "--batch-size", "4", "-q"]
    job = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and job.poll() is None and time.monotonic() < deadline:
        if list(out.glob("part-*.parquet")):  # scoring is under way: kill an actor that is working
            pids = _scorer_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.05)
    log = job.communicate(timeout=240)[0]
    assert killed is not None, f"the run ended before an actor could be killed:\n{log[-2000:]}"
    assert job.returncode == 0, log[-3000:]
    paths = read_output(out).column("path").to_pylist()
    assert sorted(paths) == inputs  # each input exactly once: nothing lost, nothing twice
    assert killed not in _scorer_pids()


# ---------------------------------------------------------------- Ray Serve replicas
def _comparable(response: httpx.Response) -> tuple[int, str, object]:
    """Status, content type and body with what may differ between two servers removed: timings, ids."""
    body: object = response.text
    if response.headers.get("content-type", "").startswith("application/json"):
        body = _strip(response.json())
    return response.status_code, response.headers.get("content-type", ""), body


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("timing_ms", "timings_ms", "request_id")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _requests(url: str) -> list[httpx.Response]:
    jpg = (EXAMPLES / "isic-benign-1.jpg").read_bytes()
    phone = (EXAMPLES / "phone-malignant-bcc.jpg").read_bytes()
    b64 = base64.b64encode(jpg).decode()
    with httpx.Client(base_url=url, timeout=60) as c:
        return [
            c.get("/v2/health/live"),
            c.get("/v2/health/ready"),
            c.get("/v2/models/skinscan"),
            c.post("/v1/predict", json={"image": b64}),
            c.post("/v1/predict", json={"input": b64}),  # the prototype's clients
            c.post("/v1/predict", files={"file": ("a.jpg", jpg, "image/jpeg")}),
            c.post("/v1/predict", content=phone, headers={"content-type": "image/jpeg"}),
            c.post("/v1/predict", json={"image": b64, "answers": {"age": 70, "bleed": "yes"}}),
            c.post("/v1/predict/batch", json={"images": [b64, "!!not base64!!", b64]}),
            c.post("/v1/predict/lesion", json={"images": [b64, base64.b64encode(phone).decode()]}),
            c.post("/v1/predict", json={"image": "!!not base64!!"}),
            c.post("/v1/predict", content=b"", headers={"content-type": "image/jpeg"}),
            c.post("/v1/predict", content=b"GIF89a", headers={"content-type": "text/plain"}),
            c.get("/no/such/route"),
        ]


def test_serve_replicas_answers_like_serve(model_path: Path):
    single, single_url = start_serve(model_path)
    try:
        expected = [_comparable(r) for r in _requests(single_url)]
    finally:
        stop_serve(single)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "skinscan",
        "serve",
        "--replicas",
        "2",
        "--port",
        str(port),
        "--model",
        str(model_path),
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve --replicas exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve --replicas did not become ready within 150 s"
            time.sleep(0.5)
        time.sleep(1)  # let the second replica finish its warm-up too
        got = _requests(url)
        assert [_comparable(r) for r in got] == expected
        rid = httpx.get(f"{url}/v2/health/live", headers={"x-request-id": "abc-123"}).headers.get_list("x-request-id")
        assert rid == ["abc-123"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            log = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            log = proc.communicate()[0]
    assert proc.returncode == 0 and "stopping: draining the replicas" in log, log[-3000:]


def test_serve_without_replicas_imports_no_ray_and_no_torch():
    code = (
        "import sys\n"
        "from skinscan.cli import build_parser\n"
        "from skinscan.service import Settings, create_app\n"
        "from skinscan.predict import Predictor\n"
        "create_app(Settings(), predictor=Predictor())\n"
        "print(sorted(m for m in ('ray', 'torch', 'pyarrow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_replicas_need_the_cpus_they_reserve(model_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "skinscan", "serve", "--replicas", str((os.cpu_count() or 1) + 1), "--threads", "1"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "need" in out.stderr and "CPUs" in out.stderr and "Traceback" not in out.stderr
