"""The optional clinical answers: validation and their log-odds adjustments.

A photo cannot show whether a spot has grown, bleeds or itches, how old the person is or where the spot
is. Each answer that is known adjusts the image's calibrated log-odds additively, like a clinician's
likelihood ratio:

    log-odds = image logit / temperature + sum of the known answers' adjustments

An unknown answer adjusts nothing, and with no answers the estimate is exactly the image's. Each adjustment
is a contrast between the answer's known values, centred so that *knowing* an answer is no evidence by
itself: a yes/no answer (and sex) against the share of each value among the records where it is known, a
body site against the average site, age and diameter per unit from their mean. The adjustments are fitted
(`fit_answer_adjustments`) on the image model's out-of-fold logits as an offset, each answer on the records
where it is known, with a free intercept for that subset that is thrown away: in PAD-UFES-20 whether an
answer is missing predicts the label (records of lesions that were not biopsied lack sex, diameter and
history), and that bookkeeping must never count as evidence. The numbers live in the model card under the
key `answers`; applying them needs only the standard library.
"""

from __future__ import annotations

import csv
import difflib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import InvalidAnswers, ModelLoadError

CARD_KEY = "answers"  # the model card's key for the fitted adjustments
SECTION_FORMAT = 1

YesNo = Literal["yes", "no", "unknown"]
# "other" is "other / prefer not to say"; like the body sites the phone set never records (leg below the
# thigh, knee, elsewhere), it is accepted and shown but adjusts nothing: there is nothing to measure it on.
Sex = Literal["female", "male", "other"]
BodySite = Literal[
    "abdomen", "arm", "back", "chest", "ear", "face", "foot", "forearm", "hand", "lip", "neck", "nose", "scalp", "thigh",
    "leg", "knee", "other",
]  # fmt: skip
BODY_SITES: tuple[str, ...] = BodySite.__args__[:14]  # the 14 regions of the phone set (PAD-UFES-20): fitted
SEXES: tuple[str, ...] = Sex.__args__[:2]  # fitted
NEUTRAL_ANSWERS: dict[str, tuple[str, ...]] = {"sex": Sex.__args__[2:], "body_site": BodySite.__args__[14:]}
YES_NO_ANSWERS = ("itch", "grew", "hurt", "changed", "bleed", "elevated", "skin_cancer_history")
ANSWER_FIELDS = ("age", "sex", "body_site", "diameter_mm", *YES_NO_ANSWERS)
AGE_YEARS = (0.0, 120.0)  # accepted range, both ends included
DIAMETER_MM = (0.0, 200.0)  # more than 0, at most 200

# The questions in plain words (the web page asks the same ones).
QUESTIONS = {
    "age": "How old is the person, in years?",
    "sex": "Sex (female, male, or other / prefer not to say)?",
    "body_site": "Where on the body is the spot?",
    "diameter_mm": "How wide is the spot at its widest, in millimetres?",
    "itch": "Does it itch?",
    "grew": "Has it grown in the last months?",
    "hurt": "Does it hurt?",
    "changed": "Has it changed (shape, colour) in the last months?",
    "bleed": "Does it bleed (without being scratched or injured)?",
    "elevated": "Is it raised above the skin?",
    "skin_cancer_history": "Has the person had skin cancer before?",
}
# How an answer reads beside its odds ("bleeding: odds x3.1"): (yes, no) for the yes/no answers.
_YES_NO_LABELS = {
    "itch": ("itching", "no itching"),
    "grew": ("grown recently", "not grown recently"),
    "hurt": ("painful", "not painful"),
    "changed": ("changed recently", "not changed recently"),
    "bleed": ("bleeding", "no bleeding"),
    "elevated": ("raised", "flat"),
    "skin_cancer_history": ("skin cancer before", "no skin cancer before"),
}
_LEVELS: dict[str, tuple[str, ...]] = {
    "sex": SEXES,
    "body_site": BODY_SITES,
    **{name: ("yes", "no") for name in YES_NO_ANSWERS},
}
_UNITS = {"age": "year", "diameter_mm": "mm"}  # the answers adjusted per unit from their mean


# ---------------------------------------------------------------- the answers
class Answers(BaseModel):
    """What the person can tell about the spot; every answer is optional (None / "unknown": not known).

    Text is read case-insensitively ("FACE" is "face"); yes/no answers also take JSON booleans; an empty
    value means unknown. A value out of range or not among the choices raises `InvalidAnswers` naming the
    answer: nothing is clamped or guessed.

    >>> Answers(age=67, body_site="FACE", bleed="yes").known()
    {'age': 67.0, 'body_site': 'face', 'bleed': 'yes'}
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    age: float | None = None
    sex: Sex | None = None
    body_site: BodySite | None = None
    diameter_mm: float | None = None
    itch: YesNo = "unknown"
    grew: YesNo = "unknown"
    hurt: YesNo = "unknown"
    changed: YesNo = "unknown"
    bleed: YesNo = "unknown"
    elevated: YesNo = "unknown"
    skin_cancer_history: YesNo = "unknown"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _invalid(exc) from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "") -> Answers:
        """Answers from a mapping of field -> value (a JSON object, form fields, a CSV row); `where` prefixes
        error messages (e.g. "answers.csv:3")."""
        if not isinstance(values, Mapping):
            raise InvalidAnswers(f"{where + ': ' if where else ''}answers must be an object of answer: value pairs")
        try:
            return cls(**{str(k): v for k, v in values.items()})
        except InvalidAnswers as exc:
            if not where:
                raise
            raise InvalidAnswers(f"{where}: {exc}", exc.fields) from None

    @classmethod
    def from_phone_record(cls, meta: Mapping[str, str]) -> Answers:
        """The answers recorded with a photo of the phone set (`Record.meta` of pad-ufes-20-phone):
        gender -> sex, region -> body_site, diameter_1 -> diameter_mm, elevation -> elevated,
        True/False/UNK/empty -> yes/no/unknown. A diameter of 0 means "not measured" there: unknown."""

        def yes_no(column: str) -> str:
            return {"true": "yes", "false": "no"}.get((meta.get(column) or "").strip().lower(), "unknown")

        diameter = _number_or_none(meta.get("diameter_1"))
        return cls(
            age=_number_or_none(meta.get("age")),
            sex=(meta.get("gender") or "").strip().lower() or None,
            body_site=(meta.get("region") or "").strip().lower() or None,
            diameter_mm=diameter if diameter else None,
            elevated=yes_no("elevation"),
            **{name: yes_no(name) for name in YES_NO_ANSWERS if name != "elevated"},
        )

    def known(self) -> dict[str, float | str]:
        """The answers that are known, in the order of ANSWER_FIELDS."""
        values = {name: getattr(self, name) for name in ANSWER_FIELDS}
        return {k: v for k, v in values.items() if v is not None and v != "unknown"}

    @property
    def empty(self) -> bool:
        return not self.known()

    @field_validator("age", "diameter_mm", mode="before")
    @classmethod
    def _number(cls, value: Any, info: Any) -> float | None:
        if _blank(value):
            return None
        name = info.field_name
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{name} must be a number, not {type(value).__name__}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number (got {value!r})") from None
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number (got {value!r})")
        if name == "age" and not AGE_YEARS[0] <= number <= AGE_YEARS[1]:
            raise ValueError(f"age must be between {AGE_YEARS[0]:g} and {AGE_YEARS[1]:g} years (got {value!r})")
        if name == "diameter_mm" and not DIAMETER_MM[0] < number <= DIAMETER_MM[1]:
            raise ValueError(
                f"diameter_mm must be more than {DIAMETER_MM[0]:g} and at most {DIAMETER_MM[1]:g} mm "
                f"(got {value!r}); give the widest extent of the spot in millimetres"
            )
        return number

    @field_validator("sex", "body_site", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: Any) -> str | None:
        if _blank(value):
            return None
        choices = (*_LEVELS[info.field_name], *NEUTRAL_ANSWERS[info.field_name])
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            hint = difflib.get_close_matches(str(text), choices, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"{info.field_name} must be one of {', '.join(choices)}; got {value!r}{suggestion}")
        return text

    @field_validator(*YES_NO_ANSWERS, mode="before")
    @classmethod
    def _yes_no(cls, value: Any, info: Any) -> str:
        if _blank(value):
            return "unknown"
        if isinstance(value, bool):
            return "yes" if value else "no"
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in ("yes", "no", "unknown"):
            raise ValueError(f"{info.field_name} must be yes, no or unknown (got {value!r})")
        return text


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text and text.strip() else None
    except ValueError:
        return None


def _invalid(exc: ValidationError) -> InvalidAnswers:
    """One sentence per bad answer, each naming it; unknown names get a suggestion."""
    messages, fields = [], []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "answers"
        fields.append(name)
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(name, ANSWER_FIELDS, n=1)
            suggestion = f"did you mean {hint[0]!r}? " if hint else ""
            messages.append(f"unknown answer {name!r} ({suggestion}the answers are {', '.join(ANSWER_FIELDS)})")
        elif err["type"] == "value_error":
            messages.append(str(err["ctx"]["error"]))
        else:
            messages.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
    return InvalidAnswers("invalid answer: " + "; ".join(messages), tuple(fields))


# ---------------------------------------------------------------- answers for several images (CSV)
@dataclass(frozen=True)
class AnswerRow:
    """One row of an answers table: the image it names, its answers (or, for a row with a bad value, the
    `InvalidAnswers` naming it: that image's error, not the table's), and where it came from."""

    path: str
    answers: Answers | InvalidAnswers
    where: str


def read_answers_csv(path: str | Path) -> list[AnswerRow]:
    """An answers table: a `path` column and any of ANSWER_FIELDS (an empty cell is unknown).

    A problem with the table itself (no such file, an unknown column, a row without a path) raises
    `InvalidAnswers`; a bad value in one row (e.g. `diameter_mm` 0) is kept as that row's error, so that
    the other images are still scored and only that one gets an error row."""
    path = Path(path)
    if not path.is_file():
        raise InvalidAnswers(f"answers table {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise InvalidAnswers(
                f"{path}: the answers table needs a 'path' column (then any of {', '.join(ANSWER_FIELDS)})"
            )
        for col in columns:
            if col != "path" and col not in ANSWER_FIELDS:
                hint = difflib.get_close_matches(col, ANSWER_FIELDS, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise InvalidAnswers(
                    f"{path}: unknown column {col!r}{suggestion}; the columns are path, {', '.join(ANSWER_FIELDS)}"
                )
        rows = []
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in raw.items()}
            if None in raw:
                raise InvalidAnswers(f"{path}:{line}: more cells than columns")
            image = (row.pop("path") or "").strip()
            if not image:
                raise InvalidAnswers(f"{path}:{line}: the path cell is empty")
            try:
                answers: Answers | InvalidAnswers = Answers.from_mapping(row, f"{path}:{line}")
            except InvalidAnswers as exc:
                answers = exc
            rows.append(AnswerRow(image, answers, f"{path}:{line}"))
    return rows


def match_answers(rows: Sequence[AnswerRow], inputs: Sequence[str | Path]) -> list[Answers | InvalidAnswers | None]:
    """The answers of each input image (None where no row names it; an `InvalidAnswers` where its row has a
    bad value).

    A row's path matches an input as given or resolved (relative to the working directory); a bare file
    name matches the one input of that name, and is an error where several inputs share it. A row that
    matches no input, or two rows for one input, are errors too: a mix-up must not go unnoticed.
    """
    paths = [Path(p) for p in inputs]
    resolved = [p.resolve() for p in paths]
    matched: dict[int, AnswerRow] = {}
    for row in rows:
        given = Path(row.path)
        hits = [i for i, p in enumerate(paths) if p == given] or [
            i for i, r in enumerate(resolved) if r == given.resolve()
        ]
        if not hits and "/" not in row.path and "\\" not in row.path:
            hits = [i for i, p in enumerate(paths) if p.name == row.path]
            if len(hits) > 1:
                shown = ", ".join(str(paths[i]) for i in hits[:4])
                raise InvalidAnswers(
                    f"{row.where}: {row.path!r} is the name of {len(hits)} input images ({shown}); "
                    "give its path instead of the bare file name"
                )
        if not hits:
            raise InvalidAnswers(
                f"{row.where}: {row.path!r} matches none of the {len(paths)} input image(s); give the path "
                "as on the command line (or the bare file name where it is unique)"
            )
        i = hits[0]
        if i in matched:
            raise InvalidAnswers(f"{row.where}: {paths[i]} already has answers ({matched[i].where})")
        matched[i] = row
    return [matched[i].answers if i in matched else None for i in range(len(paths))]


# ---------------------------------------------------------------- applying the adjustments
@dataclass(frozen=True)
class Adjustment:
    """How one known answer moved the estimate: `log_odds` is added to the image's calibrated log-odds,
    so the odds are multiplied by `odds_ratio`. `held_at` is set when a number lies outside the range the
    adjustment holds over (the central 95% of the values it was fitted on): the adjustment is that of the
    nearest end of the range."""

    answer: str
    value: float | str
    log_odds: float
    odds_ratio: float
    held_at: float | None = None

    @property
    def label(self) -> str:
        """E.g. "bleeding: odds x3.1", "age 67: odds x1.4"."""
        return f"{_describe(self.answer, self.value, self.held_at)}: odds x{_odds_text(self.odds_ratio)}"

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "value": self.value,
            "log_odds": self.log_odds,
            "odds_ratio": self.odds_ratio,
            "label": self.label,
        }


def _describe(answer: str, value: float | str, held_at: float | None) -> str:
    if answer in _YES_NO_LABELS:
        yes, no = _YES_NO_LABELS[answer]
        return yes if value == "yes" else no
    if answer == "body_site":
        return f"spot on the {value}"
    if answer == "sex":
        return str(value)
    number = f"{float(value):g}"
    held = f" (counted as {held_at:g}, the end of the fitted range)" if held_at is not None else ""
    return f"age {number}{held}" if answer == "age" else f"diameter {number} mm{held}"


def _odds_text(ratio: float) -> str:
    return f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2g}"


def check_section(section: Any, where: str = "model card") -> dict:
    """The card's `answers` section, checked enough that applying it cannot fail half-way."""
    try:
        if section.get("format", SECTION_FORMAT) > SECTION_FORMAT:
            raise ValueError(f"format {section['format']} is newer than this skinscan; upgrade it")
        table = section["adjustments"]
        for name, entry in table.items():
            if name not in ANSWER_FIELDS:
                raise ValueError(f"unknown answer {name!r}")
            if entry["kind"] == "levels":
                if set(entry["log_odds"]) != set(_LEVELS[name]):
                    raise ValueError(f"{name}: expected log-odds for {', '.join(_LEVELS[name])}")
                if not all(math.isfinite(float(v)) for v in entry["log_odds"].values()):
                    raise ValueError(f"{name}: log-odds must be finite numbers")
            elif entry["kind"] == "per_unit":
                lo, hi = (float(x) for x in entry["range"])
                if not all(math.isfinite(float(entry[k])) for k in ("per_unit", "mean")) or not lo <= hi:
                    raise ValueError(f"{name}: per_unit, mean and range must be finite numbers (range low <= high)")
            else:
                raise ValueError(f"{name}: unknown kind {entry['kind']!r}")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"{where}: the answers section is invalid ({exc}); refit it with `skinscan fit-answers`"
        ) from None
    return section


def answer_adjustments(answers: Answers | None, section: Mapping[str, Any]) -> tuple[Adjustment, ...]:
    """The adjustment of each known answer (unknown answers have none), in the order of ANSWER_FIELDS."""
    if answers is None:
        return ()
    table = section["adjustments"]
    out = []
    for name, value in answers.known().items():
        if value in NEUTRAL_ANSWERS.get(name, ()):
            continue  # no data to measure it on: it adjusts nothing (see NEUTRAL_ANSWERS)
        entry = table.get(name)
        if entry is None:
            raise InvalidAnswers(f"this model has no adjustment for the answer {name!r}; leave it out", (name,))
        held = None
        if entry["kind"] == "levels":
            log_odds = float(entry["log_odds"][value])
        else:
            lo, hi = (float(x) for x in entry["range"])
            x = min(max(float(value), lo), hi)
            held = x if x != float(value) else None
            log_odds = float(entry["per_unit"]) * (x - float(entry["mean"]))
        out.append(Adjustment(name, value, log_odds, math.exp(log_odds), held))
    return tuple(out)


def apply_answers(
    calibrated_logit: float, answers: Answers | None, section: Mapping[str, Any]
) -> tuple[float, tuple[Adjustment, ...]]:
    """(The log-odds with the answers, their adjustments). No known answer: the logit unchanged, ()."""
    adjustments = answer_adjustments(answers, section)
    if not adjustments:
        return calibrated_logit, ()
    return calibrated_logit + math.fsum(a.log_odds for a in adjustments), adjustments


# ---------------------------------------------------------------- fitting the adjustments
def fit_answer_adjustments(
    logits: Sequence[float],
    answers_list: Sequence[Answers],
    labels: Sequence[int],
    groups: Sequence[str] | None = None,
    *,
    temperature: float | None = None,
    l2: float = 1.0,
    joint: bool = False,
    fitted_on: Mapping[str, Any] | None = None,
) -> dict:
    """Fit each answer's log-odds adjustment; returns the model card's `answers` section (plain JSON).

    `logits` are the image model's out-of-fold logits for the records, divided by `temperature` (fitted
    on them when None) to form the offset. Each answer is fitted on the records where it is known: its
    values' contrast (one-hot levels, or the standardised number) plus a free intercept for that subset,
    which is thrown away, with the offset. The adjustments are centred on those records (their mean there
    is 0), so knowing an answer is never evidence by itself. `l2` is the ridge penalty on the contrasts
    (log-odds per level, or per standard deviation): it keeps rare answers (a body site seen 4 times)
    from exploding. With `joint` each answer's offset also holds the other known answers' adjustments
    (fitted in turn until they settle), so that correlated answers (grew, changed) are not counted twice;
    cross-validated on the phone set it ranked worse than separate fits, most with answers missing
    (benchmarks/bench_answers.py), so it is off by default. `groups` (patient ids) only count the
    patients behind each answer.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if not len(z) == len(y) == len(answers_list):
        raise ValueError(f"{len(z)} logits, {len(y)} labels and {len(answers_list)} answers: they must match")
    if not set(np.unique(y)) <= {0.0, 1.0}:
        raise ValueError("labels must be 0 (benign) or 1 (malignant)")
    if temperature is None:
        from .metrics import fit_temperature

        temperature = fit_temperature(z, y)
    offset = z / temperature
    groups_arr = np.asarray(groups) if groups is not None else None
    terms = [_Term.build(name, answers_list) for name in ANSWER_FIELDS]
    current = np.zeros((len(terms), len(z)))  # each term's adjustment per record (0 where unknown)
    sweeps, change = (200 if joint else 1), math.inf
    for _sweep in range(sweeps):
        change = 0.0
        for t, term in enumerate(terms):
            rows = term.known
            others = current[:, rows].sum(axis=0) - current[t, rows] if joint else 0.0
            new = term.fit(offset[rows] + others, y[rows], l2)
            change = max(change, float(np.abs(new - current[t, rows]).max(initial=0.0)))
            current[t, rows] = new
        if change < 1e-9:
            break
    table = {term.name: term.entry(y, groups_arr) for term in terms}
    return {
        "format": SECTION_FORMAT,
        "method": (
            "additive log-odds adjustments on the calibrated image logit (logit / temperature); each answer "
            "fitted on the records where it is known, with a free intercept for that subset (thrown away) "
            f"and an L2 penalty {l2:g} on its contrast; centred on those records"
            + ("; each fitted beside the other known answers' adjustments" if joint else "")
        ),
        "l2": l2,
        "joint": joint,
        "offset_temperature": float(temperature),
        "n_records": len(z),
        "n_patients": len(np.unique(groups_arr)) if groups_arr is not None else None,
        "converged": bool(change < 1e-6) if joint else True,
        "fitted_on": dict(fitted_on or {}),
        "adjustments": table,
    }


@dataclass
class _Term:
    """One answer's columns on the records where it is known: one-hot levels or a standardised number."""

    name: str
    known: np.ndarray  # bool mask over all records
    columns: np.ndarray  # (n_known, k), centred on the known records
    levels: tuple[str, ...] = ()
    values: np.ndarray | None = None  # the raw values on known records
    mean: float = 0.0
    scale: float = 1.0
    coef: np.ndarray | None = None  # [intercept, contrast...]

    @classmethod
    def build(cls, name: str, answers_list: Sequence[Answers]) -> _Term:
        raw = [a.known().get(name) for a in answers_list]
        known = np.array([v is not None for v in raw])
        values = [v for v in raw if v is not None]
        if name in _LEVELS:
            levels = _LEVELS[name]
            onehot = np.array([[v == lv for lv in levels] for v in values], dtype=np.float64).reshape(-1, len(levels))
            centred = onehot - onehot.mean(axis=0) if len(values) else onehot
            return cls(name, known, centred, levels=levels, values=np.array(values, dtype=object))
        x = np.array(values, dtype=np.float64)
        mean = float(x.mean()) if len(x) else 0.0
        scale = float(x.std()) if len(x) > 1 and x.std() > 0 else 1.0
        return cls(name, known, ((x - mean) / scale).reshape(-1, 1), values=x, mean=mean, scale=scale)

    def fit(self, offset: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
        """Fit on the known records; return the contrast's adjustment per known record (intercept dropped)."""
        if len(y) == 0 or y.min() == y.max():  # no contrast can be learnt from one class
            self.coef = np.zeros(1 + self.columns.shape[1])
            return np.zeros(len(y))
        design = np.column_stack([np.ones(len(y)), self.columns])
        penalty = np.full(design.shape[1], float(l2))
        penalty[0] = 1e-8  # the subset's intercept is free (a whisker keeps Newton defined)
        self.coef = _penalised_logistic(design, y, offset, penalty, self.coef)
        return self.columns @ self.coef[1:]

    def entry(self, y: np.ndarray, groups: np.ndarray | None) -> dict:
        coef = self.coef if self.coef is not None else np.zeros(1 + self.columns.shape[1])
        n = int(self.known.sum())
        base: dict[str, Any] = {"n": n}
        if groups is not None:
            base["n_patients"] = len(np.unique(groups[self.known]))
        base["n_malignant"] = int(y[self.known].sum())
        if self.levels:
            counts = {lv: int(np.sum(self.values == lv)) for lv in self.levels}
            shares = np.array([counts[lv] / n if n else 0.0 for lv in self.levels])
            beta = coef[1:]
            log_odds = beta - float(shares @ beta)  # the adjustment of each level, centred on the known records
            log_odds[shares == 0] = 0.0  # a value never seen in the fit: no evidence either way
            entry = {"kind": "levels", "log_odds": {lv: _num(v) for lv, v in zip(self.levels, log_odds, strict=True)}}
            entry["odds_ratio"] = {lv: _num(math.exp(v)) for lv, v in entry["log_odds"].items()}
            if self.levels == ("yes", "no"):
                entry["odds_ratio_yes_vs_no"] = _num(math.exp(beta[0] - beta[1]))
            return {**entry, **base, "counts": counts}
        per_unit = float(coef[1]) / self.scale
        # the adjustment is held beyond the central 95% of the fitted values: a straight line is not
        # trusted where few records lie (a 90 mm lesion would otherwise count x22)
        lo, hi = (float(v) for v in np.percentile(self.values, [2.5, 97.5])) if n else (0.0, 0.0)
        return {
            "kind": "per_unit",
            "unit": _UNITS[self.name],
            "per_unit": _num(per_unit),
            "odds_ratio_per_unit": _num(math.exp(per_unit)),
            "mean": _num(self.mean),
            "range": [_num(lo), _num(hi)],
            **base,
        }


def _num(x: float) -> float:
    return float(round(float(x), 6))


def _penalised_logistic(
    design: np.ndarray, y: np.ndarray, offset: np.ndarray, penalty: np.ndarray, start: np.ndarray | None
) -> np.ndarray:
    """Newton's method for logistic regression with an offset and a per-coefficient ridge penalty."""
    from .metrics import sigmoid

    coef = start.copy() if start is not None and start.shape == (design.shape[1],) else np.zeros(design.shape[1])

    def objective(c: np.ndarray) -> float:
        eta = offset + design @ c
        return float(np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * np.sum(penalty * c * c))

    value = objective(coef)
    for _ in range(100):
        p = sigmoid(offset + design @ coef)
        grad = design.T @ (p - y) + penalty * coef
        hess = design.T @ (design * (p * (1 - p))[:, None]) + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # backtracking: a Newton step on a nearly separable subset can overshoot
            new_value = objective(coef - t * step)
            if new_value <= value:
                break
            t /= 2
        else:
            break  # no step lowers the objective: at the minimum, to rounding
        coef, value = coef - t * step, new_value
        if np.abs(t * step).max() < 1e-10:
            break
    return coef


def section_from_card(card: Any) -> dict | None:
    """The checked `answers` section of a model card, or None when the model has none."""
    extra = getattr(card, "model_extra", None) or {}
    section = extra.get(CARD_KEY)
    return None if section is None else check_section(section, f"model {getattr(card, 'name', '?')}")


# ---------------------------------------------------------------- inputs and outputs of the fit
def read_oof_logits(
    path: str | Path, recipe: str | None = None, sources: Collection[str] | None = None
) -> tuple[str, dict[str, tuple[int, str, float]]]:
    """Out-of-fold image logits: (what made them, {"<dataset>/<relative path>": (label, patient id, logit)}).

    `path` is either the `oof.csv` of a K-fold training run (`skinscan train ... --set folds=5`, or the run
    folder holding it), whose rows of `sources` are kept (every row when None), or an ablation results file
    of benchmarks/ablation_phone.py, whose recipe named by `recipe` (the start of its name, e.g. "C") gives
    its out-of-fold phone logits."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".csv":
        return _read_oof_csv(path / "oof.csv" if path.is_dir() else path, sources)
    import json

    if not recipe:
        raise InvalidAnswers(f"--oof {path}: an ablation results file needs --recipe (the recipe whose logits to use)")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAnswers(f"--oof {path}: cannot read it as JSON ({exc})") from None
    found = [r for r in results if isinstance(r, dict) and str(r.get("recipe", "")).startswith(recipe)]
    names = [str(r.get("recipe")) for r in results if isinstance(r, dict)]
    if len(found) != 1:
        what = "no recipe" if not found else f"{len(found)} recipes"
        raise InvalidAnswers(f"{path}: {what} whose name starts with {recipe!r} (recipes: {'; '.join(names)})")
    oof = found[0].get("oof_phone")
    if not isinstance(oof, dict) or not oof:
        raise InvalidAnswers(f"{path}: recipe {found[0]['recipe']!r} has no out-of-fold phone logits (oof_phone)")
    # each value: [label, patient_id, logit, logit with flip TTA, logit on a full frame]: the plain logit
    return str(found[0]["recipe"]), {k: (int(v[0]), str(v[1]), float(v[2])) for k, v in oof.items()}


def _read_oof_csv(path: Path, sources: Collection[str] | None) -> tuple[str, dict[str, tuple[int, str, float]]]:
    """The rows of a K-fold run's oof.csv (see read_oof_logits)."""
    need = {"fold", "source", "uid", "label", "logit"}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise InvalidAnswers(f"--oof {path}: cannot read it ({exc.strerror or exc})") from None
    missing = need - set(rows[0] if rows else ())
    if missing:
        raise InvalidAnswers(
            f"--oof {path}: no {', '.join(sorted(missing))} column(s); give the oof.csv of a K-fold training run "
            "(skinscan train ... --set folds=5) or an ablation results file"
        )
    kept = [r for r in rows if sources is None or r["source"] in sources]
    if not kept:
        raise InvalidAnswers(f"--oof {path}: no out-of-fold row of {', '.join(sorted(sources or ()))}")
    folds = len({r["fold"] for r in rows})
    made_by = f"{folds}-fold run {path.parent.as_posix()}"
    return made_by, {r["uid"]: (int(r["label"]), r.get("patient") or r["uid"], float(r["logit"])) for r in kept}


def store_section(onnx_path: str | Path, section: dict) -> Path:
    """Write `section` into the model's card (key `answers`), inside the ONNX file and beside it."""
    from .card import ModelCard, write_card
    from .predict import Predictor

    onnx_path = Path(onnx_path)
    check_section(section, "the fitted section")
    predictor = Predictor(onnx_path)
    card = predictor.card.model_dump()
    card[CARD_KEY] = section
    del predictor  # release the file before rewriting it
    return write_card(onnx_path, ModelCard(**card).model_dump())


def section_rows(section: Mapping[str, Any]) -> list[tuple[str, str, float, int, int]]:
    """(answer, value, odds ratio, records where the answer is known, records with this value) per fitted
    value: a readable summary of a section. Numbers are given per unit (per year, per mm) from the mean."""
    rows = []
    for name, entry in section["adjustments"].items():
        n = int(entry["n"])
        if entry["kind"] == "levels":
            counts = entry.get("counts", {})
            for level, log_odds in entry["log_odds"].items():
                rows.append((name, level, math.exp(log_odds), n, int(counts.get(level, 0))))
        else:
            rows.append((name, f"per {entry['unit']} from {entry['mean']:.3g}", math.exp(entry["per_unit"]), n, n))
    return rows
