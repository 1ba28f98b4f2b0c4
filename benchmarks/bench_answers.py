"""Clinical answers (skinscan.answers), measured: image only, answers only, image + answers.

Cross-validated figures (always): the phone photos that out-of-fold image logits cover: those of an
ablation recipe (benchmarks/ablation_phone.py; recipe C by default: archive + phone photos + phone
augmentation, 3-fold patient-grouped CV on the 468 photos outside the retired locked box), or with
`--oof RUN/oof.csv` those of a K-fold run of any recipe (`skinscan train --config
configs/skinscan-sources.yaml --set folds=5`: every phone photo, each scored by the fold model that did
not train on its patient). The adjustments are
cross-fitted by patient: 5 patient-grouped folds; each fold's answers are adjusted by adjustments fitted
on the other four folds (the temperature of the image logits too). Settings:
- image only: the calibrated out-of-fold image logit;
- answers only: the same fit with no image (offset 0): a logistic regression on the answers under the same
  rule (each answer fitted where it is known, with a free intercept for that subset that is thrown away, so
  that whether an answer is missing is never evidence);
- image + answers: the image logit plus the adjustments, as `Predictor.predict(..., answers=...)` does.
On (a) all photos, (b) the complete records (the six yes/no answers itch, grew, hurt, changed, bleed,
elevated, plus age and body site known), (c) all photos with every known answer hidden at random with
probability 0.5 (fixed seed; the fit keeps every answer, as a shipped model does). ROC AUC with a
patient-grouped bootstrap 95% interval; ECE (15 bins), and sensitivity / specificity at the model's
threshold.

The model's own validation phone photos (only with `--model-validation`): the phone photos `--model`'s
card names as validation photos (its network never trained on them), scored by it, with adjustments fitted
on the out-of-fold logits of every other patient's photos: the shipped network with adjustments that saw
neither its photos nor their answers.

The locked box (only with `--lockbox`, and only the shipped model's figures count): the locked-box
patients' phone photos (splits/pad-ufes-20-phone-lockbox.txt) scored by `--model` through
`Predictor.predict(force=True)`, with the answers of the labels file and the adjustments in the model's
card (`skinscan fit-answers`); answers only from a fit on the 468 photos. Adds the paired patient-grouped
bootstrap interval of the AUC difference (image + answers minus image only) on the complete records.

    python benchmarks/bench_answers.py --out benchmarks/results/answers
    python benchmarks/bench_answers.py --oof benchmarks/results/cv-sources/oof-phone.csv --model-validation \
        --out benchmarks/results/answers-sources    # the shipped recipe's own 5-fold logits (docs/sources.md)
    python benchmarks/bench_answers.py --lockbox --out benchmarks/results/answers    # the shipped model
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from skinscan.answers import (
    ANSWER_FIELDS,
    Answers,
    apply_answers,
    fit_answer_adjustments,
    read_oof_logits,
    section_rows,
)
from skinscan.card import default_model_path
from skinscan.data import load_dataset, read_patient_list
from skinscan.metrics import bootstrap_auc_ci, expected_calibration_error, roc_auc, sigmoid

REPO = Path(__file__).resolve().parents[1]
COMPLETE = ("itch", "grew", "hurt", "changed", "bleed", "elevated")  # + age and body site
SETTINGS = ("image only", "answers only", "image + answers")
SUBSETS = ("all", "complete", "hidden")
SUBSET_TITLES = {
    "all": "(a) all phone photos",
    "complete": "(b) complete records",
    "hidden": "(c) answers hidden at random (p=0.5)",
}
BARS = {"lockbox_gain": 0.04, "lockbox_auc": 0.90}


# ---------------------------------------------------------------- helpers
def is_complete(a: Answers) -> bool:
    return all(getattr(a, f) != "unknown" for f in COMPLETE) and a.age is not None and a.body_site is not None


def hide(answers: Sequence[Answers], p: float, seed: int) -> list[Answers]:
    """Each known answer dropped independently with probability p."""
    rng = np.random.default_rng(seed)
    out = []
    for a in answers:
        known = a.known()
        keep = rng.random(len(known)) >= p
        out.append(Answers(**{k: v for (k, v), kept in zip(known.items(), keep, strict=True) if kept}))
    return out


def group_members(groups: Sequence[str]) -> list[np.ndarray]:
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inv, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inv))[:-1])


def paired_auc_difference(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> dict:
    """AUC(b) - AUC(a) on the same records, with a paired bootstrap 95% interval resampling patients."""
    members = group_members(groups)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if len(np.unique(y[idx])) == 2:
            diffs.append(roc_auc(y[idx], b[idx]) - roc_auc(y[idx], a[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {
        "difference": roc_auc(y, b) - roc_auc(y, a),
        "ci": [float(lo), float(hi)],
        "share_of_resamples_above_0": float(np.mean(np.array(diffs) > 0)),
        "n_boot": len(diffs),
    }


def summary(y: np.ndarray, logit: np.ndarray, groups: Sequence[str], threshold: float | None, n_boot: int) -> dict:
    out = {
        "n": len(y),
        "n_malignant": int(y.sum()),
        "n_patients": len(set(groups)),
        "auc": roc_auc(y, logit),
        "auc_ci": list(bootstrap_auc_ci(y, logit, groups, n_boot=n_boot)),
    }
    if threshold is not None:  # only where the score is a calibrated probability
        p = sigmoid(logit)
        pred = p >= threshold
        out["ece"] = expected_calibration_error(y, p)
        out["sensitivity"] = float(pred[y == 1].mean())
        out["specificity"] = float((~pred[y == 0]).mean())
    return out


def score(section: dict, offset: np.ndarray, answers: Sequence[Answers]) -> np.ndarray:
    return np.array([apply_answers(float(z), a, section)[0] for z, a in zip(offset, answers, strict=True)])


# ---------------------------------------------------------------- data
def phone_records(data: Path, oof_path: Path, recipe: str, lockbox: Path | None) -> tuple[dict, str, list, set]:
    records = {r.uid: r for r in load_dataset(data)}
    name, oof = read_oof_logits(oof_path, recipe, sources={r.source for r in records.values()})
    locked = read_patient_list(lockbox) if lockbox else set()
    if any(records[k].patient in locked for k in oof):
        raise SystemExit("the out-of-fold logits include locked-box patients: refusing to fit on them")
    return oof, name, list(records.values()), locked


# ---------------------------------------------------------------- cross-validation on the 80%
def cross_validated(
    keys: list[str], oof: dict, records: dict, threshold: float, args: argparse.Namespace
) -> tuple[dict, dict]:
    z = np.array([oof[k][2] for k in keys])
    y = np.array([records[k].label for k in keys])
    g = np.array([records[k].patient for k in keys])
    answers = [Answers.from_phone_record(records[k].meta) for k in keys]
    hidden = hide(answers, 0.5, args.seed)
    complete = np.array([is_complete(a) for a in answers])

    def crossfit(fold_seed: int) -> dict[str, dict[str, np.ndarray]]:
        scores = {s: {v: np.zeros(len(z)) for v in ("full", "hidden")} for s in SETTINGS}
        folds = StratifiedGroupKFold(args.folds, shuffle=True, random_state=fold_seed).split(z, y, g)
        for train, test in folds:
            tr = [answers[i] for i in train]
            with_image = fit_answer_adjustments(z[train], tr, y[train], g[train], l2=args.l2)
            alone = fit_answer_adjustments(np.zeros(len(train)), tr, y[train], g[train], temperature=1.0, l2=args.l2)
            offset = z[test] / with_image["offset_temperature"]
            for variant, given in (("full", answers), ("hidden", hidden)):
                te = [given[i] for i in test]
                scores["image only"][variant][test] = offset
                scores["answers only"][variant][test] = score(alone, np.zeros(len(test)), te)
                scores["image + answers"][variant][test] = score(with_image, offset, te)
        return scores

    scores = crossfit(args.seed)
    masks = {"all": np.ones(len(z), bool), "complete": complete, "hidden": np.ones(len(z), bool)}
    table: dict = {}
    for subset, mask in masks.items():
        variant = "hidden" if subset == "hidden" else "full"
        for setting in SETTINGS:
            s = scores[setting][variant][mask]
            thr = None if setting == "answers only" else threshold
            table.setdefault(subset, {})[setting] = summary(y[mask], s, list(g[mask]), thr, args.bootstrap)
    table["complete"]["paired_difference"] = paired_auc_difference(
        y[complete],
        scores["image only"]["full"][complete],
        scores["image + answers"]["full"][complete],
        list(g[complete]),
        n_boot=args.bootstrap,
    )
    # how much the figures move with the fold split alone (point estimates over other fold seeds)
    repeats: dict = {}
    for fold_seed in range(args.seed + 1, args.seed + 1 + args.repeats):
        rep = crossfit(fold_seed)
        for subset, mask in masks.items():
            variant = "hidden" if subset == "hidden" else "full"
            for setting in SETTINGS:
                repeats.setdefault(subset, {}).setdefault(setting, []).append(
                    roc_auc(y[mask], rep[setting][variant][mask])
                )
    for subset in repeats:
        for setting, values in repeats[subset].items():
            table[subset][setting]["auc_over_fold_seeds"] = {
                "mean": float(np.mean(values)),
                "min": float(np.min(values)),
                "max": float(np.max(values)),
                "n": len(values),
            }
    # the adjustments fitted on all 468 photos: what `skinscan fit-answers` stores
    full = fit_answer_adjustments(z, answers, y, g, l2=args.l2)
    return table, full


# ---------------------------------------------------------------- photos the model never trained on
def scored_by_model(
    model: Path, photos: list, fit_keys: list[str], records: dict, args, section: dict | None = None
) -> dict:
    """`photos` scored by `model` (its image logit on its photo type's calibrated scale), with the answers'
    adjustments of `section` (None: the model's own card section), and answers alone fitted on `fit_keys`."""
    from skinscan.predict import Predictor

    predictor = Predictor(model)
    if section is None:
        section = predictor.answers_section
    if section is None:
        raise SystemExit(
            f"{model}: its card has no answers section; run `skinscan fit-answers --model {model} ...` first"
        )
    answers = [Answers.from_phone_record(r.meta) for r in photos]
    y = np.array([r.label for r in photos])
    g = [r.patient for r in photos]
    t = time.perf_counter()
    image = predictor.predict([r.path for r in photos], force=True)
    seconds = time.perf_counter() - t
    if any(p.probability is None for p in image):
        raise SystemExit("some photos could not be scored: " + "; ".join(p.error or "" for p in image))
    z_image = np.array([p.logit / predictor.temperature_for(p.photo_type) for p in image])  # its type's
    z_both = score(section, z_image, answers)
    if section is predictor.answers_section:
        both = predictor.predict([r.path for r in photos], force=True, answers=answers)
        # the Predictor's own probabilities are these, to rounding (the scores are kept as log-odds: no ties at 1.0)
        assert np.allclose(sigmoid(z_both), [p.probability for p in both], rtol=0, atol=1e-12)
    # answers only: fitted on the photos of fit_keys (no image)
    tr = [Answers.from_phone_record(records[k].meta) for k in fit_keys]
    ytr = np.array([records[k].label for k in fit_keys])
    alone = fit_answer_adjustments(np.zeros(len(tr)), tr, ytr, temperature=1.0, l2=args.l2)
    z_answers = score(alone, np.zeros(len(photos)), answers)
    hidden = hide(answers, 0.5, args.seed)
    z_hidden_both = score(section, z_image, hidden)
    z_hidden_answers = score(alone, np.zeros(len(photos)), hidden)
    complete = np.array([is_complete(a) for a in answers])
    thr = np.array([p.threshold for p in image])  # each photo's (its detected type's, where the model has types)
    out: dict = {
        "model": {**predictor.info(), "path": str(model)},
        "photos": len(photos),
        "patients": len(set(g)),
        "seconds_to_score": seconds,
        "retakes_scored_anyway": sum(p.quality == "retake" for p in image),
    }
    streams = {
        "all": (np.ones(len(photos), bool), z_image, z_answers, z_both),
        "complete": (complete, z_image, z_answers, z_both),
        "hidden": (np.ones(len(photos), bool), z_image, z_hidden_answers, z_hidden_both),
    }
    for subset, (mask, zi, za, zb) in streams.items():
        gm = [g[i] for i in np.flatnonzero(mask)]
        out[subset] = {
            "image only": summary(y[mask], zi[mask], gm, thr[mask], args.bootstrap),
            "answers only": summary(y[mask], za[mask], gm, None, args.bootstrap),
            "image + answers": summary(y[mask], zb[mask], gm, thr[mask], args.bootstrap),
        }
    for subset, mask in (("all", np.ones(len(photos), bool)), ("complete", complete)):
        gm = [g[i] for i in np.flatnonzero(mask)]
        out[subset]["paired_difference"] = paired_auc_difference(
            y[mask], z_image[mask], z_both[mask], gm, n_boot=args.bootstrap
        )
    return out


def locked_box(model: Path, data_records: list, locked: set, oof_keys: list[str], records: dict, args) -> dict:
    """The retired locked box's photos scored by `model` with its own adjustments, and the box's bars."""
    out = scored_by_model(model, [r for r in data_records if r.patient in locked], oof_keys, records, args)
    diff = out["complete"]["paired_difference"]
    out["bars"] = {
        "gain_at_least_0.04": diff["difference"] >= BARS["lockbox_gain"],
        "difference_ci_above_0": diff["ci"][0] > 0,
        "image_plus_answers_at_least_0.90": out["complete"]["image + answers"]["auc"] >= BARS["lockbox_auc"],
        "hidden_image_plus_answers_at_least_image_only": out["hidden"]["image + answers"]["auc"]
        >= out["hidden"]["image only"]["auc"],
    }
    return out


def model_validation(model: Path, oof: dict, keys: list[str], records: dict, args) -> dict:
    """The model's own validation phone photos (its card's val_keys: never trained on), scored by it with
    adjustments fitted on the out-of-fold logits of every other patient's photos, so that neither the
    network nor the adjustments saw them."""
    from skinscan.predict import Predictor

    val = Predictor(model).card.validation_keys
    photos = [records[k] for k in keys if k in val]
    if not photos:
        raise SystemExit(f"{model}: its card names none of these phone photos as validation photos")
    held = {r.patient for r in photos}
    fit_keys = [k for k in keys if records[k].patient not in held]
    section = fit_answer_adjustments(
        [oof[k][2] for k in fit_keys],
        [Answers.from_phone_record(records[k].meta) for k in fit_keys],
        [records[k].label for k in fit_keys],
        [records[k].patient for k in fit_keys],
        l2=args.l2,
    )
    return scored_by_model(model, photos, fit_keys, records, args, section) | {"fitted_on_photos": len(fit_keys)}


# ---------------------------------------------------------------- report
def _cell(m: dict) -> str:
    lo, hi = m["auc_ci"]
    return f"{m['auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(result: dict) -> str:
    cv = result["cross_validated"]
    n = {s: cv[s]["image only"]["n"] for s in SUBSETS}
    lines = [
        f"Clinical answers: ROC AUC [patient-grouped bootstrap 95% CI]. Cross-validated: the {n['all']} phone photos "
        f"of the out-of-fold image logits of {result['recipe']!r}, adjustments cross-fitted "
        f"over {result['folds']} patient-grouped folds (seed {result['seed']}).",
        "",
        f"| setting | {SUBSET_TITLES['all']} (n={n['all']}) | {SUBSET_TITLES['complete']} (n={n['complete']}) "
        f"| {SUBSET_TITLES['hidden']} (n={n['hidden']}) |",
        "|---|---|---|---|",
    ]
    for setting in SETTINGS:
        lines.append(f"| {setting} | " + " | ".join(_cell(cv[s][setting]) for s in SUBSETS) + " |")
    d = cv["complete"]["paired_difference"]
    lines += [
        "",
        f"Complete records, image + answers minus image only: {d['difference']:+.3f} "
        f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (paired patient-grouped bootstrap).",
        "",
        f"At the model's threshold {result['threshold']:.3f} (all photos): image only sensitivity "
        f"{cv['all']['image only']['sensitivity']:.3f}, specificity {cv['all']['image only']['specificity']:.3f}, "
        f"ECE {cv['all']['image only']['ece']:.3f}; image + answers sensitivity "
        f"{cv['all']['image + answers']['sensitivity']:.3f}, specificity "
        f"{cv['all']['image + answers']['specificity']:.3f}, ECE {cv['all']['image + answers']['ece']:.3f}.",
    ]
    box = result.get("lockbox")
    if box:
        nb = {s: box[s]["image only"]["n"] for s in SUBSETS}
        model = box["model"]
        lines += [
            "",
            f"Locked box ({box['photos']} photos of {box['patients']} patients), scored by {model['name']} "
            f"{model['version']} (sha256 {model['sha256'][:12]}):",
            "",
            f"| setting | {SUBSET_TITLES['all']} (n={nb['all']}) | {SUBSET_TITLES['complete']} (n={nb['complete']}) "
            f"| {SUBSET_TITLES['hidden']} (n={nb['hidden']}) |",
            "|---|---|---|---|",
        ]
        for setting in SETTINGS:
            lines.append(f"| {setting} | " + " | ".join(_cell(box[s][setting]) for s in SUBSETS) + " |")
        d = box["complete"]["paired_difference"]
        lines += [
            "",
            f"Locked box, complete records, image + answers minus image only: {d['difference']:+.3f} "
            f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]; bars: "
            + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in box["bars"].items()),
        ]
    val = result.get("model_validation")
    if val:
        nv = {s: val[s]["image only"]["n"] for s in SUBSETS}
        model = val["model"]
        lines += [
            "",
            f"The model's own validation phone photos ({val['photos']} photos of {val['patients']} patients, never "
            f"trained on), scored by {model['name']} {model['version']} (sha256 {model['sha256'][:12]}), with "
            f"adjustments fitted on the out-of-fold logits of the other {val['fitted_on_photos']} photos' patients:",
            "",
            f"| setting | {SUBSET_TITLES['all']} (n={nv['all']}) | {SUBSET_TITLES['complete']} (n={nv['complete']}) "
            f"| {SUBSET_TITLES['hidden']} (n={nv['hidden']}) |",
            "|---|---|---|---|",
        ]
        for setting in SETTINGS:
            lines.append(f"| {setting} | " + " | ".join(_cell(val[s][setting]) for s in SUBSETS) + " |")
        lines += [""] + [
            f"{SUBSET_TITLES[s]}: image + answers minus image only {val[s]['paired_difference']['difference']:+.3f} "
            f"[{val[s]['paired_difference']['ci'][0]:+.3f}, {val[s]['paired_difference']['ci'][1]:+.3f}]; at the "
            f"model's thresholds image only sensitivity {val[s]['image only']['sensitivity']:.3f}, specificity "
            f"{val[s]['image only']['specificity']:.3f}; image + answers {val[s]['image + answers']['sensitivity']:.3f}"
            f" / {val[s]['image + answers']['specificity']:.3f}."
            for s in ("all", "complete")
        ]
    lines += [
        "",
        f"Adjustments fitted on all {n['all']} photos (what `skinscan fit-answers` stores from the same logits):",
        "",
    ]
    lines += ["| answer | value | odds ratio | records with this value / where known |", "|---|---|---|---|"]
    lines += [f"| {a} | {v} | {r:.2f} | {c} / {n_} |" for a, v, r, n_, c in section_rows(result["adjustments"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "pad-ufes-20-phone"))
    parser.add_argument(
        "--oof",
        default=str(REPO / "benchmarks" / "results" / "ablation-phone.json"),
        help="out-of-fold image logits: an ablation results JSON (default, with --recipe) or the oof.csv of a "
        "K-fold training run (skinscan train ... --set folds=5; its phone rows)",
    )
    parser.add_argument("--recipe", default="C", help="the ablation recipe whose logits to use (default C)")
    parser.add_argument(
        "--lockbox-list",
        help="the retired locked box's patients (git show 7cc9730:splits/pad-ufes-20-phone-lockbox.txt), to "
        "reproduce the phone-first model's figures",
    )
    parser.add_argument(
        "--lockbox",
        action="store_true",
        help="also score the locked box with --model (do this once, with the shipped model)",
    )
    parser.add_argument(
        "--model-validation",
        action="store_true",
        help="also score --model's own validation phone photos (never trained on), with adjustments fitted on "
        "the out-of-fold logits of every other patient (for a model trained on all phone photos but those)",
    )
    parser.add_argument("--model", default=str(default_model_path()), help="model (default: the bundled one)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9, help="extra fold seeds for the split-to-split spread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--out", required=True, help="path stem: writes STEM.json and STEM.md")
    args = parser.parse_args()

    if args.lockbox and not args.lockbox_list:
        parser.error("--lockbox needs --lockbox-list (the box is retired: see --help)")
    data, lockbox = Path(args.data), Path(args.lockbox_list) if args.lockbox_list else None
    oof, recipe, data_records, locked = phone_records(data, Path(args.oof), args.recipe, lockbox)
    records = {r.uid: r for r in data_records}
    keys = sorted(oof)
    from skinscan.predict import Predictor

    threshold = Predictor(args.model).threshold_for("phone")  # all phone photos: the phone type's, where typed
    t = time.perf_counter()
    table, full = cross_validated(keys, oof, records, threshold, args)
    result: dict = {
        "recipe": recipe,
        "oof": args.oof,
        "folds": args.folds,
        "seed": args.seed,
        "l2": args.l2,
        "threshold": threshold,
        "threshold_from": args.model,
        "answers": list(ANSWER_FIELDS),
        "cross_validated": table,
        "adjustments": full,
        "seconds_cross_validation": time.perf_counter() - t,
    }
    if args.lockbox:
        result["lockbox"] = locked_box(Path(args.model), data_records, locked, keys, records, args)
    if args.model_validation:
        result["model_validation"] = model_validation(Path(args.model), oof, keys, records, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
