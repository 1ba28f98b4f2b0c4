"""`skinscan` end to end through its console entry point."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CSV_COLUMNS = [
    "path", "probability", "decision", "threshold", "advice", "error", "quality", "reasons",
    "image_probability", "adjustments", "photo_type", "diagnosis",
]  # fmt: skip


def skinscan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skinscan", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_explains_every_command():
    out = skinscan("--help")
    assert out.returncode == 0
    for cmd in ("predict", "train", "evaluate", "export", "serve", "batch"):
        assert cmd in out.stdout
    sub = skinscan("predict", "--help")
    assert "--output" in sub.stdout and "recursively" in sub.stdout


def test_predict_folder_prints_table_and_writes_csv_and_json(tmp_path):
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "notes.jpg").write_text("this is not an image")
    csv_out, json_out = tmp_path / "out.csv", tmp_path / "out.json"
    args = ("predict", str(EXAMPLES), str(tmp_path / "nested" / "notes.jpg"), "-o", str(csv_out))
    out = skinscan(*args, "--format", "table")
    assert out.returncode == 3, out.stderr  # some inputs could not be read
    assert "refer" in out.stdout or "monitor" in out.stdout
    title = " ".join(out.stdout.split())  # rich may wrap the title
    assert "not a diagnosis" in title and "skinscan skinscan" not in title and "model skinscan-lite0-sources" in title
    assert "photo type" in out.stdout
    assert "1 of 7 input(s) could not be read or scored" in out.stderr
    rows = list(csv.DictReader(csv_out.open()))
    assert len(rows) == 7
    assert list(rows[0]) == CSV_COLUMNS  # the contract; photo_type and diagnosis joined last
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("notes.jpg") and bad[0]["probability"] == ""
    good = [r for r in rows if not r["error"]]
    assert all(r["decision"] in ("refer", "monitor") or r["quality"] == "retake" for r in good)
    assert {r["photo_type"] for r in good} == {"dermoscopic", "phone"}
    assert skinscan("predict", str(EXAMPLES), "-q", "-o", str(json_out)).returncode == 0
    data = json.loads(json_out.read_text())
    assert len(data) == 6 and all(0 <= d["probability"] <= 1 for d in data if d["probability"] is not None)


def test_piped_output_is_csv_rows_with_the_files_columns(tmp_path):
    """Not a terminal (as here, under subprocess): stdout holds only the CSV of -o FILE.csv, paths whole."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "photo.jpg"
    deep.parent.mkdir()
    deep.write_bytes((EXAMPLES / "isic-benign-1.jpg").read_bytes())
    out = skinscan("predict", str(deep), "-o", str(tmp_path / "out.csv"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == (tmp_path / "out.csv").read_text()
    (row,) = list(csv.DictReader(out.stdout.splitlines()))
    assert row["path"] == str(deep) and row["photo_type"] == "dermoscopic"
    assert row["decision"] == ("refer" if float(row["probability"]) >= float(row["threshold"]) else "monitor")
    as_json = skinscan("predict", str(deep), "--format", "json")
    assert json.loads(as_json.stdout)[0]["path"] == str(deep)


def test_every_input_is_a_row_missing_paths_and_unsupported_pictures_too(tmp_path):
    """predict ../bad/ x.jpg ../nonexistent.jpg: every input a row, the run is not stopped (exit 3)."""
    from PIL import Image

    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (64, 64), (200, 120, 100)).save(bad / "moving.gif")
    (bad / "cut.jpg").write_bytes((EXAMPLES / "isic-benign-1.jpg").read_bytes()[:2000])
    (bad / "notes.txt").write_text("not a picture")
    (bad / ".hidden.jpg").write_text("ignored")
    good = str(EXAMPLES / "isic-malignant-1.jpg")
    missing = str(tmp_path / "nonexistent.jpg")
    out = skinscan("predict", str(bad) + "/", good, missing, "-o", str(tmp_path / "o.csv"))
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "o.csv").open())}
    assert list(rows) == [f"{bad}/cut.jpg", f"{bad}/moving.gif", good, missing]  # paths as given
    assert rows[missing]["error"] == f"{missing}: no such file"
    assert "GIF images are not accepted" in rows[f"{bad}/moving.gif"]["error"]
    assert rows[f"{bad}/cut.jpg"]["error"] and rows[good]["decision"] == "refer"
    for path in (missing, f"{bad}/moving.gif", f"{bad}/cut.jpg"):  # an error row has no decision fields
        r = rows[path]
        assert r["probability"] == r["decision"] == r["threshold"] == r["quality"] == r["photo_type"] == ""
    assert "3 of 4 input(s) could not be read or scored" in out.stderr
    assert "left out 1 file(s) that are not pictures" in out.stderr and "notes.txt" in out.stderr


def test_a_bad_answer_in_the_table_is_that_rows_error(tmp_path):
    table = tmp_path / "answers.csv"
    table.write_text("path,diameter_mm,bleed\nisic-benign-1.jpg,0,yes\nphone-benign-nevus.jpg,4,no\n")
    photos = [str(EXAMPLES / "isic-benign-1.jpg"), str(EXAMPLES / "phone-benign-nevus.jpg")]
    out = skinscan("predict", *photos, "--answers", str(table))
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    first, second = csv.DictReader(out.stdout.splitlines())
    assert f"{table}:2" in first["error"] and "diameter_mm must be more than 0" in first["error"]
    assert first["probability"] == first["threshold"] == ""
    assert not second["error"] and "diameter 4 mm" in second["adjustments"] and second["decision"] == "monitor"
    typo = tmp_path / "typo.csv"  # a problem with the table itself is still a usage error, before scoring
    typo.write_text("path,bleeding\nisic-benign-1.jpg,yes\n")
    out = skinscan("predict", *photos, "--answers", str(typo))
    assert out.returncode == 2 and "did you mean 'bleed'" in out.stderr and out.stdout == ""


def test_exit_status_is_0_when_every_input_got_a_result_a_retake_included(tmp_path):
    from PIL import Image

    flat = tmp_path / "flat.png"  # a featureless picture: the quality gate asks for a retake
    Image.new("RGB", (400, 400), (180, 140, 120)).save(flat)
    out = skinscan("predict", str(flat), str(EXAMPLES / "isic-benign-1.jpg"))
    rows = list(csv.DictReader(out.stdout.splitlines()))
    assert rows[0]["quality"] == "retake" and rows[0]["probability"] == "" and rows[0]["threshold"]
    assert out.returncode == 0, out.stderr
    assert "exit status: 0 when every input got a result" in " ".join(skinscan("predict", "--help").stdout.split())
    assert "3 when some inputs could not be read" in " ".join(skinscan("batch", "--help").stdout.split())


def test_predict_help_lists_every_bundled_model_and_its_use():
    from skinscan.card import bundled_models

    text = "".join(skinscan("predict", "--help").stdout.split())  # argparse wraps lines at hyphens too
    assert len(bundled_models()) >= 2
    for name in bundled_models():
        assert f"{name}(" in text
    assert "skinscan-lite0-sources-int8(thedefaultmodelquantisedtoint8" in text


def test_predict_reports_clear_errors():
    missing = skinscan("predict", "no/such/file.jpg")
    assert missing.returncode == 3 and "no/such/file.jpg: no such file" in missing.stdout
    assert "Traceback" not in missing.stderr
    bad_model = skinscan("predict", str(EXAMPLES), "--model", str(EXAMPLES / "SOURCES.md"))
    assert bad_model.returncode == 2 and "error:" in bad_model.stderr and "Traceback" not in bad_model.stderr


def _one_line_error(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr and out.returncode == 2, out.stderr
    return lines[-1]


def test_every_subcommand_answers_bad_inputs_with_one_line_before_any_work(tmp_path):
    """Usage errors: exit 2, one `error: ...` line, no traceback, and nothing scored or written first (the
    Predictor is replaced by one that fails the test if it is ever built)."""
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "o.parquet").write_text("a file")
    cases = {
        "predict -o a folder": (["predict", str(EXAMPLES), "-o", str(tmp_path / "dir.csv")], "is a folder"),
        "predict -o .txt": (["predict", str(EXAMPLES), "-o", str(tmp_path / "o.txt")], ".csv or .json"),
        "predict -o under a file": (["predict", str(EXAMPLES), "-o", str(tmp_path / "file" / "o.csv")], "not a folder"),
        "predict --explain a file": (["predict", str(EXAMPLES), "--explain", str(tmp_path / "file")], "a file of"),
        "predict bad answer flag": (["predict", str(EXAMPLES / "isic-benign-1.jpg"), "--age", "300"], "age must be"),
        "batch -o a file": (["batch", str(EXAMPLES), "-o", str(tmp_path / "o.parquet")], "not a folder"),
        "evaluate --bootstrap 0": (["evaluate", "--data", "x", "--out", str(tmp_path / "r"), "--bootstrap", "0"], "at least 1"),
        "evaluate missing data": (["evaluate", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")], "not found"),
        "export not a run": (["export", str(tmp_path), "--out", str(tmp_path / "m")], "not a training run folder"),
        "train bad setting": (["train", "--data", str(EXAMPLES), "--out", str(tmp_path / "t"), "--set", "lr=x"], "lr"),
        "fit-answers no data": (["fit-answers", "--model", "m.onnx", "--oof", "x.json", "--recipe", "C", "--data", str(tmp_path / "none")], "not found"),
        "serve bad port": (["serve", "--port", "99999"], "port"),
    }  # fmt: skip
    code = (
        "import sys, json\n"
        "import skinscan.predict as p\n"
        "def boom(*a, **k): raise SystemExit('the model was loaded before the usage error')\n"
        "p.Predictor.__init__ = boom\n"
        "from skinscan.cli import main\n"
        "sys.exit(main(json.loads(sys.argv[1])))"
    )
    for name, (args, expected) in cases.items():
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        line = _one_line_error(out)
        assert line.startswith("error: ") and expected in line, (name, out.stderr)
        assert out.stdout == "", name
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists() and not (tmp_path / "t").exists()
    bad_flag = skinscan("predict", str(EXAMPLES), "--no-such-flag")
    assert bad_flag.returncode == 2 and "unrecognized arguments" in bad_flag.stderr


def test_train_rejects_unknown_settings_with_a_suggestion(tmp_path):
    out = skinscan("train", "--data", str(EXAMPLES), "--out", str(tmp_path / "r"), "--set", "epoch=3")
    assert out.returncode == 2
    assert "did you mean 'epochs'" in out.stderr


@pytest.mark.data
def test_evaluate_writes_metrics_report_and_plots(tmp_path, isic_mvb):
    out = skinscan("evaluate", "--data", str(isic_mvb), "--out", str(tmp_path / "rep"), "--bootstrap", "50", "-q")
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert set(metrics["subsets"]) == {"all", "deleaked"}
    assert metrics["subsets"]["all"]["n"] == 660 and metrics["subsets"]["deleaked"]["n"] == 646
    assert "by_skin_type" not in metrics  # the archive records no skin types
    for plot in ("roc.png", "pr.png", "confusion.png", "reliability.png"):
        assert (tmp_path / "rep" / plot).stat().st_size > 1000
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "ROC AUC" in report and "![ROC](roc.png)" in report
    assert "bootstrap (50 resamples" in report and "1000" not in report and metrics["bootstrap_resamples"] == 50


@pytest.mark.data
def test_evaluate_scores_a_patient_list_and_records_it_in_the_model_card(tmp_path, pad_ufes, isic_mvb, model_path):
    from skinscan.data import load_dataset, read_patient_list
    from skinscan.predict import Predictor

    model = tmp_path / "m.onnx"  # a copy: --record rewrites the model file
    model.write_bytes(model_path.read_bytes())
    model.with_suffix(".card.json").write_bytes(model_path.with_suffix(".card.json").read_bytes())
    before = Predictor(model).card.metrics
    box = tmp_path / "clinic.txt"  # one id per line, as a clinic would list its patients
    box.write_text("\n".join(sorted({r.patient for r in load_dataset(pad_ufes)})[::10]) + "\n")
    patients = read_patient_list(box)
    photos = [r for r in load_dataset(pad_ufes) if r.patient in patients]
    args = ["evaluate", "--model", str(model), "--data", str(pad_ufes), "--bootstrap", "50", "-q"]
    out = skinscan(*args, "--patients", str(box), "--out", str(tmp_path / "rep"), "--record", "clinic")
    assert out.returncode == 0, out.stderr
    assert "recorded in the model card" in out.stdout and "metrics.clinic" in out.stdout
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["subsets"]["all"]["n"] == len(photos) > 0 and metrics["data"]["patients"] == len(patients)
    assert metrics["subsets"]["all"]["n_malignant"] == sum(r.label for r in photos)
    assert f"those of the {len(patients)} patients listed in {box}" in (tmp_path / "rep" / "report.md").read_text()
    scored = {row["key"] for row in csv.DictReader((tmp_path / "rep" / "predictions.csv").open())}
    assert scored == {r.key for r in photos}  # those patients' photos and no other
    card = Predictor(model).card  # the card inside the model file
    entry = card.metrics["clinic"]
    assert entry["subsets"] == metrics["subsets"] and entry["patients"] == len(patients)
    assert entry["dataset"] == pad_ufes.name and entry["patients_from"] == str(box)
    assert entry["split"] is None  # no split folders: every photo of those patients
    skin = metrics["by_skin_type"]  # the phone set records skin types
    assert sum(e["n"] for e in skin.values()) == len(photos) and entry["by_skin_type"] == skin
    others = {k: v for k, v in card.metrics.items() if k != "clinic"}
    assert others == {k: v for k, v in before.items() if k != "clinic"} and "test" in others  # kept as is
    assert json.loads(model.with_suffix(".card.json").read_text())["metrics"]["clinic"] == entry

    no_ids = skinscan("evaluate", "--model", str(model), "--data", str(isic_mvb), "--patients", str(box), "--out",
                      str(tmp_path / "x"))  # fmt: skip
    assert no_ids.returncode == 2 and "records no patient ids" in no_ids.stderr and "Traceback" not in no_ids.stderr
    bad_key = skinscan(*args, "--out", str(tmp_path / "y"), "--record", "Locked Box")
    assert bad_key.returncode == 2 and "--record" in bad_key.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any work


def test_writing_a_model_card_without_onnx_says_how_to_get_it(tmp_path):
    """As if the onnx package (skinscan[train]) were not installed: `evaluate --record` says so before it
    scores anything, and every card writer (fit-answers, export's sections) through `write_card`."""
    no_onnx = "import sys; sys.modules['onnx'] = None; "
    args = ["evaluate", "--data", str(EXAMPLES), "--out", str(tmp_path / "r"), "--record", "mine"]
    code = no_onnx + f"from skinscan.cli import main; sys.exit(main({args!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "writing the model card needs the 'train' extra" in out.stderr
    assert "pip install 'skinscan[train]'" in out.stderr and not (tmp_path / "r").exists()

    code = no_onnx + (
        "from skinscan.card import write_card; from skinscan.errors import MissingExtra\n"
        f"try:\n    write_card({str(tmp_path / 'm.onnx')!r}, {{}})\n"
        "except MissingExtra as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "writing the model card needs the 'train' extra" in out.stdout, out.stderr


def test_batch_and_replicas_without_the_scale_extra_say_how_to_get_it(tmp_path):
    """As if Ray or pyarrow were not installed (`sys.modules["ray"] = None` makes `import ray` fail)."""
    batch = ["batch", str(EXAMPLES), "-o", str(tmp_path / "o.parquet")]
    table = tmp_path / "list.csv"
    table.write_text("path\nx.jpg\n")
    for missing, args in (
        ("ray", batch),
        ("pyarrow", batch),
        ("pyarrow", ["batch", str(table), "-o", str(tmp_path / "o.parquet")]),
        ("ray", ["serve", "--replicas", "1"]),
    ):
        code = f"import sys; sys.modules[{missing!r}] = None; from skinscan.cli import main; sys.exit(main({args!r}))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert "pip install 'skinscan[scale]'" in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
