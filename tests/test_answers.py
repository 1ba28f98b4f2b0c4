"""Clinical answers: validation, the answers table, the adjustments in Predictor / CLI / HTTP service, and
the fit (a planted effect is recovered; a planted missingness artifact is not learnt)."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve_process import start_serve, stop_serve
from skinscan.answers import (
    ANSWER_FIELDS,
    BODY_SITES,
    CARD_KEY,
    YES_NO_ANSWERS,
    Answers,
    answer_adjustments,
    apply_answers,
    check_section,
    fit_answer_adjustments,
    match_answers,
    read_answers_csv,
    read_oof_logits,
    store_section,
)
from skinscan.card import resolve_model, write_card
from skinscan.cli import main
from skinscan.data import load_dataset
from skinscan.errors import InvalidAnswers, ModelLoadError
from skinscan.metrics import sigmoid
from skinscan.predict import Predictor
from skinscan.service import Settings, create_app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
OOF = REPO / "benchmarks" / "results" / "ablation-phone.json"

# A hand-made section: every answer present, a few with round adjustments that the tests look for.
BLEED_YES, BLEED_NO = 1.1, -0.25
FACE, AGE_PER_YEAR, AGE_MEAN = 0.4, 0.03, 55.0


def hand_section() -> dict:
    table: dict = {}
    for name in ANSWER_FIELDS:
        if name in ("age", "diameter_mm"):
            continue
        levels = {"sex": ("female", "male"), "body_site": BODY_SITES}.get(name, ("yes", "no"))
        table[name] = {"kind": "levels", "log_odds": dict.fromkeys(levels, 0.0), "n": 100}
    table["bleed"]["log_odds"] = {"yes": BLEED_YES, "no": BLEED_NO}
    table["body_site"]["log_odds"]["face"] = FACE
    table["age"] = {"kind": "per_unit", "unit": "year", "per_unit": AGE_PER_YEAR, "mean": AGE_MEAN, "range": [20, 85]}
    table["age"]["n"] = 100
    table["diameter_mm"] = {"kind": "per_unit", "unit": "mm", "per_unit": 0.05, "mean": 10.0, "range": [3, 30]}
    table["diameter_mm"]["n"] = 60
    return {"format": 1, "adjustments": table}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the default model whose card has no answers section."""
    pytest.importorskip("onnx", reason="writing a model card needs the onnx package (skinscan[train])")
    path = tmp_path_factory.mktemp("plain-model") / "plain.onnx"
    shutil.copy(resolve_model(None), path)
    card = Predictor(path).card.model_dump()
    del card["answers"]
    write_card(path, card)
    assert "answers" not in Predictor(path).card.model_dump()
    return path


@pytest.fixture(scope="session")
def answers_model(plain_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled model with the hand-made answers section in its card."""
    pytest.importorskip("onnx", reason="writing a model card needs the onnx package (skinscan[train])")
    path = tmp_path_factory.mktemp("answers-model") / plain_model.name
    shutil.copy(plain_model, path)
    store_section(path, hand_section())
    return path


@pytest.fixture(scope="session")
def predictor(answers_model: Path) -> Predictor:
    return Predictor(answers_model)


@pytest.fixture(scope="session")
def plain_predictor(plain_model: Path) -> Predictor:
    return Predictor(plain_model)


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model=predictor.model_path), predictor=predictor)) as c:
        yield c


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"age": 300}, "age", "between 0 and 120"),
        ({"age": -1}, "age", "between 0 and 120"),
        ({"age": "old"}, "age", "number"),
        ({"age": True}, "age", "number"),
        ({"age": float("nan")}, "age", "finite"),
        ({"diameter_mm": -2}, "diameter_mm", "more than 0"),
        ({"diameter_mm": 0}, "diameter_mm", "more than 0"),
        ({"diameter_mm": 500}, "diameter_mm", "at most 200"),
        ({"itch": "maybe"}, "itch", "yes, no or unknown"),
        ({"bleed": 1}, "bleed", "yes, no or unknown"),
        ({"sex": "f"}, "sex", "female, male"),
        ({"body_site": "elbow"}, "body_site", "face"),
        ({"bleeding": "yes"}, "bleeding", "did you mean 'bleed'"),
    ],
)
def test_bad_answers_name_the_field(values: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidAnswers) as info:
        Answers(**values)
    assert field in str(info.value) and words in str(info.value)
    assert info.value.fields == (field,)


def test_answers_are_normalised_never_clamped() -> None:
    a = Answers(age="67", sex=" Female", body_site="FACE", diameter_mm="12.5", itch=True, grew=False, hurt="")
    assert a.known() == {
        "age": 67.0,
        "sex": "female",
        "body_site": "face",
        "diameter_mm": 12.5,
        "itch": "yes",
        "grew": "no",
    }
    assert Answers().empty and Answers(itch="UNKNOWN", age=None, sex="").empty
    assert Answers(age=0).known() == {"age": 0.0} and Answers(age=120).known() == {"age": 120.0}
    with pytest.raises(Exception):  # frozen  # noqa: B017
        a.age = 1  # type: ignore[misc]


def test_from_phone_record() -> None:
    meta = {
        "age": "71",
        "gender": "MALE",
        "region": "NOSE",
        "diameter_1": "8.0",
        "diameter_2": "6.0",
        "itch": "True",
        "grew": "UNK",
        "hurt": "False",
        "changed": "",
        "bleed": "True",
        "elevation": "False",
        "skin_cancer_history": "",
        "fitspatrick": "2.0",
    }
    a = Answers.from_phone_record(meta)
    assert a.known() == {
        "age": 71.0,
        "sex": "male",
        "body_site": "nose",
        "diameter_mm": 8.0,
        "itch": "yes",
        "hurt": "no",
        "bleed": "yes",
        "elevated": "no",
    }
    assert Answers.from_phone_record({**meta, "diameter_1": "0.0"}).diameter_mm is None  # 0: not measured


def test_every_phone_record_reads(pad_ufes: Path) -> None:
    records = load_dataset(pad_ufes)
    answers = [Answers.from_phone_record(r.meta) for r in records]
    assert len(answers) == 586
    assert {a.body_site for a in answers} == set(BODY_SITES)
    assert sum(a.sex is not None for a in answers) == 356 and sum(a.grew == "unknown" for a in answers) == 100


# ---------------------------------------------------------------- answers table (CSV) and matching
def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_matching_as_given_resolved_and_bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("a/x.jpg", "a/y.jpg", "b/y.jpg", "b/z.jpg", "b/w.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    inputs = [Path("a/x.jpg"), Path("a/y.jpg"), Path("b/y.jpg"), Path("b/z.jpg"), Path("b/w.jpg")]
    table = write_csv(
        tmp_path / "answers.csv",
        "path,age,sex,body_site,diameter_mm,itch,grew,hurt,changed,bleed,elevated,skin_cancer_history\n"
        "a/x.jpg,70,,,,,,,,yes,,\n"  # as given
        f"{tmp_path / 'a' / 'y.jpg'},,female,,,,,,,,,\n"  # resolved
        "./b/y.jpg,,,FACE,,,,,,,,\n"  # as given, spelt differently
        "z.jpg,,,,,no,,,,,,\n",  # a bare name, unique among the inputs
    )
    got = match_answers(read_answers_csv(table), inputs)
    assert got[0].known() == {"age": 70.0, "bleed": "yes"}
    assert got[1].known() == {"sex": "female"}
    assert got[2].known() == {"body_site": "face"}
    assert got[3].known() == {"itch": "no"}
    assert got[4] is None  # no row: the photo alone


def test_csv_matching_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = [Path("a/y.jpg"), Path("b/y.jpg")]
    ambiguous = write_csv(tmp_path / "t1.csv", "path,bleed\ny.jpg,yes\n")
    with pytest.raises(InvalidAnswers, match=r"t1\.csv:2: 'y\.jpg' is the name of 2 input images .*give its path"):
        match_answers(read_answers_csv(ambiguous), inputs)
    unmatched = write_csv(tmp_path / "t2.csv", "path,bleed\nc/q.jpg,yes\n")
    with pytest.raises(InvalidAnswers, match="matches none of the 2 input"):
        match_answers(read_answers_csv(unmatched), inputs)
    twice = write_csv(tmp_path / "t3.csv", "path,bleed\na/y.jpg,yes\n./a/y.jpg,no\n")
    with pytest.raises(InvalidAnswers, match="already has answers"):
        match_answers(read_answers_csv(twice), inputs)
    with pytest.raises(InvalidAnswers, match=r"unknown column 'bleeding' \(did you mean 'bleed'\?\)"):
        read_answers_csv(write_csv(tmp_path / "t4.csv", "path,bleeding\na/y.jpg,yes\n"))
    with pytest.raises(InvalidAnswers, match="needs a 'path' column"):
        read_answers_csv(write_csv(tmp_path / "t5.csv", "file,bleed\na/y.jpg,yes\n"))
    # a bad value is that row's error, kept for that image alone: the other rows still hold their answers
    rows = read_answers_csv(write_csv(tmp_path / "t6.csv", "path,age\na/y.jpg,40\nb/y.jpg,300\n"))
    got = match_answers(rows, inputs)
    assert got[0].known() == {"age": 40.0}
    assert isinstance(got[1], InvalidAnswers) and re.match(
        r".*t6\.csv:3: invalid answer: age must be between 0 and 120", str(got[1])
    )
    with pytest.raises(InvalidAnswers, match="does not exist"):
        read_answers_csv(tmp_path / "missing.csv")


# ---------------------------------------------------------------- applying the adjustments
def test_apply_answers_arithmetic() -> None:
    section = check_section(hand_section())
    assert apply_answers(0.123, None, section) == (0.123, ())
    assert apply_answers(0.123, Answers(), section) == (0.123, ())
    assert apply_answers(0.123, Answers(bleed="unknown", itch="unknown"), section) == (0.123, ())
    z, (adj,) = apply_answers(0.5, Answers(bleed="yes"), section)
    assert z == 0.5 + BLEED_YES and adj.log_odds == BLEED_YES and adj.odds_ratio == pytest.approx(math.exp(1.1))
    assert adj.label == "bleeding: odds x3" and adj.to_dict()["label"] == adj.label
    (no,) = answer_adjustments(Answers(bleed="no"), section)
    assert no.label == "no bleeding: odds x0.78"
    # numbers: per unit from the mean, held at the ends of the fitted range
    (age,) = answer_adjustments(Answers(age=65), section)
    assert age.log_odds == pytest.approx(AGE_PER_YEAR * 10) and age.held_at is None and age.label.startswith("age 65:")
    (old,) = answer_adjustments(Answers(age=110), section)
    assert old.log_odds == pytest.approx(AGE_PER_YEAR * (85 - AGE_MEAN)) and old.held_at == 85
    assert "counted as 85" in old.label
    # several answers add up, in a fixed order
    z, adjs = apply_answers(0.0, Answers(bleed="yes", body_site="face", age=55), section)
    assert [a.answer for a in adjs] == ["age", "body_site", "bleed"] and z == pytest.approx(BLEED_YES + FACE)


def test_bad_sections_fail_at_load() -> None:
    bad = hand_section()
    del bad["adjustments"]["body_site"]["log_odds"]["face"]
    with pytest.raises(ModelLoadError, match="body_site"):
        check_section(bad)
    with pytest.raises(ModelLoadError, match="newer"):
        check_section({**hand_section(), "format": 99})
    section = hand_section()
    del section["adjustments"]["bleed"]
    with pytest.raises(InvalidAnswers, match="no adjustment for the answer 'bleed'"):
        answer_adjustments(Answers(bleed="yes"), check_section(section))


# ---------------------------------------------------------------- Predictor
def assert_no_answers_is_image_only(predictor: Predictor, plain_predictor: Predictor, images: list[Path]) -> None:
    alone = predictor.predict(images, force=True)
    assert [p.probability for p in plain_predictor.predict(images, force=True)] == [p.probability for p in alone]
    for answers in (None, [None] * len(images), [Answers()] * len(images), [Answers(itch="unknown")] * len(images)):
        got = predictor.predict(images, force=True, answers=answers)
        for a, b in zip(alone, got, strict=True):
            assert b.probability == a.probability and b.decision == a.decision  # bit for bit
            assert b.adjustments == () and b.image_probability is None
    for path, a in zip(images, alone, strict=True):
        assert predictor(path, force=True, answers=Answers()).probability == a.probability


def test_no_answers_is_exactly_the_image_only_path(predictor: Predictor, plain_predictor: Predictor) -> None:
    assert_no_answers_is_image_only(predictor, plain_predictor, list(EXAMPLES))


def test_no_answers_is_exactly_the_image_only_path_on_phone_photos(
    predictor: Predictor, plain_predictor: Predictor, pad_ufes: Path
) -> None:
    images = sorted((pad_ufes / "images").glob("*.jpg"))[::97][:6]
    assert len(images) == 6
    assert_no_answers_is_image_only(predictor, plain_predictor, images)


def test_known_answer_moves_the_logit_by_its_adjustment(predictor: Predictor) -> None:
    for path in EXAMPLES:
        base = predictor(path, force=True)
        t = predictor.temperature_for(base.photo_type)  # the photo's type's temperature
        got = predictor(path, force=True, answers=Answers(bleed="yes"))
        assert got.image_probability == base.probability
        assert got.probability == float(sigmoid(base.logit / t + BLEED_YES))  # exactly the stored adjustment
        assert logit(got.probability) - logit(base.probability) == pytest.approx(BLEED_YES, abs=1e-9)
        assert got.decision == ("refer" if got.probability >= base.threshold else "monitor")
        assert [a.to_dict()["label"] for a in got.adjustments] == ["bleeding: odds x3"]
        both = predictor(path, force=True, answers=Answers(bleed="no", body_site="face", grew="unknown"))
        assert logit(both.probability) - logit(base.probability) == pytest.approx(BLEED_NO + FACE, abs=1e-9)
        assert both.to_dict()["adjustments"][0]["label"] == "spot on the face: odds x1.5"


def test_model_without_answers_refuses_them(plain_predictor: Predictor) -> None:
    with pytest.raises(InvalidAnswers, match=r"no adjustments for answers.*fit-answers"):
        plain_predictor(EXAMPLES[0], answers=Answers(bleed="yes"))
    assert plain_predictor(EXAMPLES[0], answers=Answers()).adjustments == ()  # nothing known: nothing refused
    with pytest.raises(InvalidAnswers, match="2 sets of answers for 1 images"):
        plain_predictor.predict([EXAMPLES[0]], answers=[None, None])


def test_retake_keeps_no_adjustments(predictor: Predictor) -> None:
    from PIL import Image

    flat = Image.new("RGB", (400, 400), (180, 140, 120))  # nothing in focus: the gate asks for a retake
    unforced = predictor(flat, answers=Answers(bleed="yes"))
    assert unforced.quality == "retake"
    assert unforced.probability is None and unforced.adjustments == () and unforced.image_probability is None
    forced = predictor(flat, force=True, answers=Answers(bleed="yes"))
    assert forced.probability is not None and len(forced.adjustments) == 1


# ---------------------------------------------------------------- CLI
def test_cli_answer_flags_and_table(
    predictor: Predictor, plain_predictor: Predictor, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "rows.json"
    image = str(EXAMPLES[0])
    code = main(["predict", image, "--model", str(predictor.model_path), "--bleed", "yes", "-o", str(out), "-q"])
    assert code == 0
    (row,) = json.loads(out.read_text())
    assert [a["label"] for a in row["adjustments"]] == ["bleeding: odds x3"]
    assert row["probability"] == pytest.approx(predictor(image, answers=Answers(bleed="yes")).probability)
    csv_out = tmp_path / "rows.csv"
    assert (
        main(["predict", image, "--model", str(predictor.model_path), "--body-site", "FACE", "-o", str(csv_out), "-q"])
        == 0
    )
    assert "spot on the face: odds x1.5" in csv_out.read_text()

    assert main(["predict", image, "--model", str(predictor.model_path), "--age", "300"]) == 2
    assert "error: invalid answer: age must be between 0 and 120" in capsys.readouterr().err
    assert main(["predict", image, str(EXAMPLES[1]), "--model", str(predictor.model_path), "--itch", "yes"]) == 2
    assert "describe one photo" in capsys.readouterr().err
    if plain_predictor.answers_section is None:  # a model without adjustments refuses answers
        assert main(["predict", image, "--model", str(plain_predictor.model_path), "--itch", "yes"]) == 2
        assert "no adjustments for answers" in capsys.readouterr().err


def test_cli_answers_table(predictor: Predictor, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # the printed table on one line per image
    images = EXAMPLES[:3]
    table = write_csv(tmp_path / "a.csv", f"path,bleed,age\n{images[0].name},yes,\n{images[1]},,65\n")
    out = tmp_path / "rows.json"
    args = ["predict", *map(str, images), "--model", str(predictor.model_path), "--answers", str(table)]
    assert main([*args, "-o", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [[a["answer"] for a in r["adjustments"]] for r in rows] == [["bleed"], ["age"], []]
    assert "bleeding: odds x3" in capsys.readouterr().out  # the printed table shows the adjustments
    assert main([*args, "--age", "40"]) == 2
    assert "not both" in capsys.readouterr().err


# ---------------------------------------------------------------- HTTP service
def test_service_json_multipart_and_batch(client: TestClient, predictor: Predictor) -> None:
    path = EXAMPLES[1]
    expected = predictor(path, answers=Answers(bleed="yes", body_site="face"))
    r = client.post("/v1/predict", json={"image": b64(path), "answers": {"bleed": "yes", "body_site": "FACE"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-9)
    assert [a["label"] for a in body["adjustments"]] == ["spot on the face: odds x1.5", "bleeding: odds x3"]
    assert body["image_probability"] == pytest.approx(predictor(path).probability, abs=1e-9)
    # multipart: one form field per answer, or an `answers` field with the JSON object
    files = {"file": ("p.jpg", path.read_bytes(), "image/jpeg")}
    r = client.post("/v1/predict", files=files, data={"bleed": "yes", "body_site": "face"})
    assert r.status_code == 200 and r.json()["probability"] == pytest.approx(expected.probability, abs=1e-9)
    r = client.post("/v1/predict", files=files, data={"answers": json.dumps({"bleed": "yes"}), "body_site": "face"})
    assert r.status_code == 200 and r.json()["probability"] == pytest.approx(expected.probability, abs=1e-9)
    # no answers: the photo alone, as before
    r = client.post("/v1/predict", json={"image": b64(path)})
    assert r.json()["probability"] == predictor(path).probability and r.json()["adjustments"] == []
    # batch: answers per item (JSON), one `answers` field per file (multipart)
    items = [{"image": b64(path), "answers": {"bleed": "yes", "body_site": "face"}}, {"image": b64(path)}, b64(path)]
    results = client.post("/v1/predict/batch", json={"images": items}).json()["results"]
    assert results[0]["probability"] == pytest.approx(expected.probability, abs=1e-9)
    assert results[1]["probability"] == results[2]["probability"] == predictor(path).probability
    parts = [("file", ("p.jpg", path.read_bytes(), "image/jpeg"))] * 2
    parts += [("answers", (None, '{"bleed": "yes", "body_site": "face"}')), ("answers", (None, ""))]
    results = client.post("/v1/predict/batch", files=parts).json()["results"]
    assert results[0]["probability"] == pytest.approx(expected.probability, abs=1e-9)
    assert results[1]["probability"] == predictor(path).probability


@pytest.mark.parametrize(
    ("answers", "field"),
    [({"age": 300}, "age"), ({"diameter_mm": -2}, "diameter_mm"), ({"itch": "maybe"}, "itch"), ({"size": 3}, "size")],
)
def test_service_rejects_bad_answers(client: TestClient, answers: dict, field: str) -> None:
    image = b64(EXAMPLES[0])
    r = client.post("/v1/predict", json={"image": image, "answers": answers})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_answers", r.text
    assert field in r.json()["error"]["message"]
    form = {k: str(v) for k, v in answers.items()} if field != "size" else {"answers": json.dumps(answers)}
    r = client.post("/v1/predict", files={"file": ("p.jpg", EXAMPLES[0].read_bytes())}, data=form)
    assert r.status_code == 422 and field in r.json()["error"]["message"], r.text
    # in a batch the bad item fails alone
    r = client.post("/v1/predict/batch", json={"images": [{"image": image, "answers": answers}, image]})
    assert r.status_code == 200
    first, second = r.json()["results"]
    assert first["error"]["code"] == "invalid_answers" and "probability" not in first
    assert second["probability"] is not None


def test_service_answer_shape_errors(client: TestClient) -> None:
    image = b64(EXAMPLES[0])
    for payload, status, where in (
        ({"image": image, "answers": ["yes"]}, 422, "must be an object"),
        ({"images": [image], "answers": {"bleed": "yes"}}, 422, "per image"),
    ):
        route = "/v1/predict/batch" if "images" in payload else "/v1/predict"
        r = client.post(route, json=payload)
        assert r.status_code == status and where in r.json()["error"]["message"], r.text
    parts = [("file", ("p.jpg", EXAMPLES[0].read_bytes(), "image/jpeg"))] * 2 + [("answers", (None, "{}"))]
    r = client.post("/v1/predict/batch", files=parts)
    assert r.status_code == 400 and "1 'answers' field(s) for 2 file(s)" in r.json()["error"]["message"]
    r = client.post("/v1/predict", files={"file": ("p.jpg", EXAMPLES[0].read_bytes())}, data={"answers": "not json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_answers"


def test_service_metadata_and_model_without_answers(client: TestClient, plain_predictor: Predictor) -> None:
    assert client.get("/v2/models/skinscan").json()["answers"] == list(ANSWER_FIELDS)
    with TestClient(create_app(Settings(model=plain_predictor.model_path), predictor=plain_predictor)) as plain:
        assert plain.get("/v2/models/skinscan").json()["answers"] is None
        r = plain.post("/v1/predict", json={"image": b64(EXAMPLES[0]), "answers": {"bleed": "yes"}})
        assert r.status_code == 501 and r.json()["error"]["code"] == "answers_unavailable"
        r = plain.post("/v1/predict", json={"image": b64(EXAMPLES[0]), "answers": {"bleed": "unknown"}})
        assert r.status_code == 200  # nothing known: nothing to refuse


# ---------------------------------------------------------------- the fit
def synthetic(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, list[Answers], np.ndarray]:
    """Image logits with a planted bleed effect (log-odds +1.2 for yes vs no) and a planted missingness
    artifact: `grew` is pure noise when known, but unknown mostly for cancers (as in PAD-UFES-20), and
    `sex` is known only for a subset that is mostly malignant (like the biopsied records)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 1.5, n)
    bleed = rng.random(n) < 0.3
    eta = -0.7 + image + 1.2 * (bleed - 0.3)
    y = (rng.random(n) < sigmoid(eta)).astype(int)
    grew_known = rng.random(n) < np.where(y == 1, 0.3, 0.95)
    grew = np.where(rng.random(n) < 0.5, "yes", "no")
    sex_known = rng.random(n) < np.where(y == 1, 0.95, 0.2)
    sex = np.where(rng.random(n) < 0.5, "female", "male")
    answers = [
        Answers(
            bleed="yes" if bleed[i] else "no",
            grew=grew[i] if grew_known[i] else "unknown",
            sex=sex[i] if sex_known[i] else None,
            age=float(rng.integers(20, 90)),
        )
        for i in range(n)
    ]
    return image, answers, y


@pytest.mark.parametrize("joint", [False, True])
def test_fit_recovers_a_planted_effect_and_ignores_missingness(joint: bool) -> None:
    logits, answers, y = synthetic()
    section = fit_answer_adjustments(logits, answers, y, [f"p{i}" for i in range(len(y))], temperature=1.0, joint=joint)
    table = section["adjustments"]
    bleed = table["bleed"]
    contrast = bleed["log_odds"]["yes"] - bleed["log_odds"]["no"]
    assert contrast == pytest.approx(1.2, abs=0.2) and bleed["n"] == len(y)
    # knowing an answer is no evidence: its adjustments average 0 over the records where it is known
    for name in ("bleed", "grew", "sex"):
        entry = table[name]
        mean = sum(entry["counts"][v] * lo for v, lo in entry["log_odds"].items()) / entry["n"]
        assert mean == pytest.approx(0, abs=1e-6)
    # missingness that predicts the label leaves no effect behind
    for name in ("grew", "sex"):
        assert max(abs(v) for v in table[name]["log_odds"].values()) < 0.15, table[name]
    assert abs(table["age"]["per_unit"]) < 0.01 and abs(table["diameter_mm"]["per_unit"]) == 0
    assert table["diameter_mm"]["n"] == 0
    # an unknown answer adjusts nothing, whatever the fit saw
    assert apply_answers(0.7, Answers(grew="unknown", sex=None), check_section(section)) == (0.7, ())
    json.dumps(section)  # plain JSON


def test_fit_shrinks_rare_answers() -> None:
    rng = np.random.default_rng(1)
    n = 600
    y = (rng.random(n) < 0.4).astype(int)
    sites = ["back"] * n
    sites[:3] = ["lip", "lip", "lip"]
    y[:3] = 1  # three cancers on the lip: without the penalty the lip's log-odds would run off to infinity
    section = fit_answer_adjustments(np.zeros(n), [Answers(body_site=s) for s in sites], y, temperature=1.0)
    sites = section["adjustments"]["body_site"]
    assert 0.3 < sites["log_odds"]["lip"] < 3 and sites["counts"]["lip"] == 3
    assert sites["log_odds"]["face"] == 0  # never seen: the average site


def test_fit_input_checks() -> None:
    with pytest.raises(ValueError, match="must match"):
        fit_answer_adjustments([0.0, 1.0], [Answers()], [0, 1])
    with pytest.raises(ValueError, match=r"0 .*or 1"):
        fit_answer_adjustments([0.0], [Answers()], [2], temperature=1.0)


# ---------------------------------------------------------------- fit-answers on the phone set
def test_fit_answers_cli_on_the_phone_set(plain_model: Path, pad_ufes: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnx")
    if not OOF.is_file():
        pytest.skip(f"{OOF} is missing")
    model = tmp_path / plain_model.name
    shutil.copy(plain_model, model)
    args = ["fit-answers", "--model", str(model), "--oof", str(OOF), "--data", str(pad_ufes)]
    assert main([*args, "--recipe", "C"]) == 0
    assert "bleed" in capsys.readouterr().out
    section = Predictor(model).answers_section
    assert section is not None and section["n_records"] == 468 and not section["joint"]
    assert json.loads(model.with_suffix(".card.json").read_text())[CARD_KEY] == section
    table = section["adjustments"]
    assert set(table) == set(ANSWER_FIELDS)
    for name in ("bleed", "changed", "grew"):  # the textbook warning signs raise the odds
        assert table[name]["log_odds"]["yes"] > 0 > table[name]["log_odds"]["no"]
    assert table["sex"]["n"] < table["itch"]["n"]  # each answer counted where known
    assert main([*args, "--recipe", "Z"]) == 2
    assert "no recipe whose name starts with 'Z'" in capsys.readouterr().err


def test_fit_answers_reads_the_oof_csv_of_a_k_fold_run(
    plain_model: Path, pad_ufes: Path, tmp_path: Path, capsys
) -> None:
    """A K-fold run's oof.csv (rows of every source) gives the same fit as the same logits in an ablation file;
    only the rows of --data's source are used, and an oof.csv without uids is refused with a sentence."""
    import csv

    pytest.importorskip("onnx")
    if not OOF.is_file():
        pytest.skip(f"{OOF} is missing")
    recipe = next(r for r in json.loads(OOF.read_text()) if r["recipe"].startswith("C"))
    rows = [
        {"fold": i % 3, "source": "pad-ufes-20-phone", "key": uid.split("/", 1)[1], "uid": uid, "patient": v[1],
         "label": v[0], "logit": v[2]}
        for i, (uid, v) in enumerate(sorted(recipe["oof_phone"].items()))
    ]  # fmt: skip
    other = {"fold": 0, "source": "isic-mvb", "key": "train/benign/1.jpg", "uid": "isic-mvb/train/benign/1.jpg",
             "patient": "", "label": 0, "logit": 9.0}  # fmt: skip
    run = tmp_path / "cv"
    run.mkdir()
    with (run / "oof.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(other))
        writer.writeheader()
        writer.writerows([*rows, other])
    sections = []
    for oof in ([str(OOF), "--recipe", "C"], [str(run)], [str(run / "oof.csv")]):
        model = tmp_path / f"{len(sections)}-{plain_model.name}"
        shutil.copy(plain_model, model)
        assert main(["fit-answers", "--model", str(model), "--data", str(pad_ufes), "--oof", *oof]) == 0
        sections.append(Predictor(model).answers_section)
    assert "3-fold run" in capsys.readouterr().out
    assert sections[0]["n_records"] == sections[1]["n_records"] == 468  # the isic-mvb row is not a phone photo
    assert sections[1]["adjustments"] == sections[2]["adjustments"] == sections[0]["adjustments"]
    assert sections[1]["offset_temperature"] == pytest.approx(sections[0]["offset_temperature"])

    (run / "oof.csv").write_text("fold,source,key,patient,label,logit\n0,pad-ufes-20-phone,x.jpg,P,0,1.0\n")
    model = tmp_path / plain_model.name
    shutil.copy(plain_model, model)
    assert main(["fit-answers", "--model", str(model), "--data", str(pad_ufes), "--oof", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no uid column" in err and "folds=5" in err
    assert main(["fit-answers", "--model", str(model), "--data", str(pad_ufes), "--oof", str(OOF)]) == 2
    assert "needs --recipe" in capsys.readouterr().err

    # an oof.csv without a patient column: each photo counts as its own patient
    (run / "oof.csv").write_text("fold,source,uid,label,logit\n0,pad-ufes-20-phone,pad-ufes-20-phone/x.jpg,1,0.5\n")
    assert read_oof_logits(run)[1] == {"pad-ufes-20-phone/x.jpg": (1, "pad-ufes-20-phone/x.jpg", 0.5)}


def test_bundled_adjustments_are_fitted_on_the_shipped_recipes_own_out_of_fold_logits(
    plain_model: Path, pad_ufes: Path, tmp_path: Path
) -> None:
    """Both bundled builds carry the adjustments that `skinscan fit-answers` fits on the committed out-of-fold
    logits of a patient-grouped 5-fold run of the shipped recipe (every phone photo, each scored by the fold
    model that never trained on its patient), not those of another image model."""
    pytest.importorskip("onnx")
    oof = REPO / "benchmarks" / "results" / "cv-sources" / "oof-phone.csv"
    bundled = [Predictor(resolve_model(name)).answers_section for name in (None, "skinscan-lite0-sources-int8")]
    for section in bundled:
        assert section is not None and section["n_records"] == 586  # every phone photo: no locked box left out
        assert "5-fold run benchmarks/results/cv-sources" in section["fitted_on"]["image_logits"]
    model = tmp_path / plain_model.name
    shutil.copy(plain_model, model)
    assert main(["fit-answers", "--model", str(model), "--data", str(pad_ufes), "--oof", str(oof)]) == 0
    refit = Predictor(model).answers_section
    for section in bundled:
        assert section["adjustments"] == refit["adjustments"]
        assert section["offset_temperature"] == pytest.approx(refit["offset_temperature"])


def test_yes_no_answers_listed() -> None:
    assert set(YES_NO_ANSWERS) <= set(ANSWER_FIELDS) and len(BODY_SITES) == 14


# ---------------------------------------------------------------- the web page's questionnaire (browser)
@pytest.fixture(scope="module")
def answers_server(answers_model: Path) -> Iterator[str]:
    """A real `skinscan serve` with the answers model on a free loopback port."""

    proc, url = start_serve(answers_model)
    yield url
    stop_serve(proc)


@pytest.fixture(scope="module")
def web():
    """The browser helpers of tests/test_web.py (Playwright + Debian's Chromium; skips without them)."""
    return pytest.importorskip("test_web")


@pytest.fixture(scope="module")
def browser(web):
    if not web.CHROMIUM.is_file():
        web._missing(f"{web.CHROMIUM} not found (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(web.CHROMIUM), headless=True, args=web.CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def browser_page(web, browser, answers_server: str):
    pages = []

    def open_page(device: dict):
        pages.append(web.Page(browser, answers_server, device))
        return pages[-1]

    yield open_page
    for p in pages:
        p.context.close()


def _api_with_answers(server: str, path: Path, answers: dict) -> dict:
    import httpx

    files = {"file": ("x.jpg", path.read_bytes(), "image/jpeg")}
    r = httpx.post(f"{server}/v1/predict", files=files, data=answers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_web_questionnaire_sends_answers_and_shows_adjustments(web, browser_page, answers_server: str) -> None:
    p = browser_page(web.DESKTOP)
    page = p.page
    questions = page.locator("#questions")
    questions.wait_for(state="visible")  # the model can use answers: the questions are offered, folded
    assert not page.evaluate("document.getElementById('questions').open")
    page.locator("#questions summary").click()
    assert "Has it grown in the last months?" in p.text("#questions")
    page.get_by_label("Your age (years)").fill("70")
    page.get_by_label("Where on the body is the spot?").select_option("face")
    page.locator("#q-bleed").get_by_label("Yes", exact=True).check()
    path = EXAMPLES[1]
    p.upload(path)
    page.wait_for_selector(".decision")
    expected = _api_with_answers(answers_server, path, {"age": "70", "body_site": "face", "bleed": "yes"})
    shown = page.locator(".adjustments-list li").all_inner_texts()
    assert shown == [a["label"] for a in expected["adjustments"]] and "bleeding: odds x3" in shown
    value = float(page.locator(".gauge-track").get_attribute("aria-valuenow"))
    assert value == pytest.approx(expected["probability"] * 100, abs=0.05)
    assert p.text(".adjustments-lead").startswith("From the photo alone:")
    p.screenshot("desktop-1280x800-answers")
    p.check_clean()

    # changing an answer offers to update the estimate with the same photo
    page.locator("#q-bleed").get_by_label("No", exact=True).check()
    page.get_by_role("button", name="Update the estimate with these answers").click()
    page.wait_for_selector(".adjustments-list li:has-text('no bleeding')")
    # a number out of range is caught on the page, naming the question; nothing is sent
    sent = len(p.requests)
    page.get_by_label("Your age (years)").fill("300")
    page.get_by_role("button", name="Update the estimate with these answers").click()
    assert "age" in p.text("#questions-error").lower()
    assert page.locator("#q-age").get_attribute("aria-invalid") == "true"
    assert page.locator(".error-box .error-title").inner_text() == "The answers could not be used"
    assert len([u for u in p.requests[sent:] if "/v1/predict" in u]) == 0
    assert not p.errors


def test_web_questionnaire_on_a_phone(web, browser_page) -> None:
    p = browser_page(web.PHONE)
    page = p.page
    page.locator("#questions").wait_for(state="visible")
    page.locator("#questions summary").tap()
    page.get_by_label("Where on the body is the spot?").select_option("back")
    page.locator("#q-grew").get_by_label("Yes", exact=True).check()
    p.upload(EXAMPLES[0])
    page.wait_for_selector(".adjustments-list li")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing to scroll sideways
    p.screenshot("phone-390x844-answers")
    p.check_clean()


def test_other_sex_and_unfitted_body_sites_are_accepted_and_adjust_nothing(predictor) -> None:
    """sex "other" (other / prefer not to say) and the sites the phone set never records (leg, knee,
    other) are valid answers that move nothing: there is no data to measure them on."""
    from skinscan.answers import NEUTRAL_ANSWERS

    assert NEUTRAL_ANSWERS == {"sex": ("other",), "body_site": ("leg", "knee", "other")}
    photo = "examples/isic-benign-1.jpg"
    alone = predictor(photo)
    for answers in (
        Answers(sex="Other"),
        Answers(body_site="knee"),
        Answers(body_site="leg"),
        Answers(body_site="other"),
    ):
        result = predictor(photo, answers=answers)
        assert result.probability == alone.probability and result.adjustments == ()
    with_bleed = predictor(photo, answers=Answers(sex="other", body_site="leg", bleed="yes"))
    assert [a.answer for a in with_bleed.adjustments] == ["bleed"]
    with pytest.raises(InvalidAnswers, match="sex must be one of female, male, other"):
        Answers(sex="unknown-value")
