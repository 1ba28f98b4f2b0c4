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
    out = skinscan("predict", str(EXAMPLES), str(tmp_path / "nested" / "notes.jpg"), "-o", str(csv_out))
    assert out.returncode == 0, out.stderr
    assert "refer" in out.stdout or "monitor" in out.stdout
    assert "not a diagnosis" in " ".join(out.stdout.split())  # rich may wrap the title
    assert "1 of 7 file(s) could not be read" in out.stderr
    rows = list(csv.DictReader(csv_out.open()))
    assert len(rows) == 7
    assert {"path", "probability", "decision", "threshold"} <= set(rows[0])
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("notes.jpg") and bad[0]["probability"] == ""
    good = [r for r in rows if not r["error"]]
    assert all(r["decision"] in ("refer", "monitor") or r["quality"] == "retake" for r in good)
    assert skinscan("predict", str(EXAMPLES), "-q", "-o", str(json_out)).returncode == 0
    data = json.loads(json_out.read_text())
    assert len(data) == 6 and all(0 <= d["probability"] <= 1 for d in data if d["probability"] is not None)


def test_predict_reports_clear_errors():
    missing = skinscan("predict", "no/such/file.jpg")
    assert missing.returncode == 2 and "error: no/such/file.jpg: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_model = skinscan("predict", str(EXAMPLES), "--model", str(EXAMPLES / "SOURCES.md"))
    assert bad_model.returncode == 2 and "error:" in bad_model.stderr and "Traceback" not in bad_model.stderr


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


@pytest.mark.data
def test_evaluate_scores_a_patient_list_and_records_it_in_the_model_card(tmp_path, pad_ufes, isic_mvb, model_path):
    from skinscan.data import load_dataset, read_patient_list
    from skinscan.predict import Predictor

    model = tmp_path / "m.onnx"  # a copy: --record rewrites the model file
    model.write_bytes(model_path.read_bytes())
    model.with_suffix(".card.json").write_bytes(model_path.with_suffix(".card.json").read_bytes())
    before = Predictor(model).card.metrics
    box = REPO / "splits" / "pad-ufes-20-phone-lockbox.txt"
    patients = read_patient_list(box)
    photos = [r for r in load_dataset(pad_ufes) if r.patient in patients]
    args = ["evaluate", "--model", str(model), "--data", str(pad_ufes), "--bootstrap", "50", "-q"]
    out = skinscan(*args, "--patients", str(box), "--out", str(tmp_path / "rep"), "--record", "locked_box")
    assert out.returncode == 0, out.stderr
    assert "recorded in the model card" in out.stdout and "metrics.locked_box" in out.stdout
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["subsets"]["all"]["n"] == len(photos) > 0 and metrics["data"]["patients"] == len(patients)
    assert metrics["subsets"]["all"]["n_malignant"] == sum(r.label for r in photos)
    assert f"those of the {len(patients)} patients listed in {box}" in (tmp_path / "rep" / "report.md").read_text()
    scored = {row["key"] for row in csv.DictReader((tmp_path / "rep" / "predictions.csv").open())}
    assert scored == {r.key for r in photos}  # those patients' photos and no other
    card = Predictor(model).card  # the card inside the model file
    entry = card.metrics["locked_box"]
    assert entry["subsets"] == metrics["subsets"] and entry["patients"] == len(patients)
    assert entry["dataset"] == pad_ufes.name and entry["patients_from"] == str(box)
    assert entry["split"] is None  # no split folders: every photo of those patients
    skin = metrics["by_skin_type"]  # the phone set records skin types
    assert sum(e["n"] for e in skin.values()) == len(photos) and entry["by_skin_type"] == skin
    others = {k: v for k, v in card.metrics.items() if k != "locked_box"}
    assert others == {k: v for k, v in before.items() if k != "locked_box"} and "test" in others  # kept as is
    assert json.loads(model.with_suffix(".card.json").read_text())["metrics"]["locked_box"] == entry

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
    """As if Ray were not installed (`sys.modules["ray"] = None` makes `import ray` fail)."""
    for args in (["batch", str(EXAMPLES), "-o", str(tmp_path / "o.parquet")], ["serve", "--replicas", "1"]):
        code = f"import sys; sys.modules['ray'] = None; from skinscan.cli import main; sys.exit(main({args!r}))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert "pip install 'skinscan[scale]'" in out.stderr and "Traceback" not in out.stderr
