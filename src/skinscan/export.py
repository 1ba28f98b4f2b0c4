"""export(run) -> ONNX model with its model card inside, checked against torch on real images."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import platform
import re
import warnings
from collections.abc import Mapping, Sequence
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .card import CARD_FORMAT, INTENDED_USE, KNOWN_LIMITS, write_card
from .config import TrainConfig, load_config
from .data import DIAGNOSES, Record, prior_shift
from .errors import ModelLoadError, SkinscanError
from .phototype import DERMOSCOPIC_MIN_PROBABILITY

try:
    import torch
except ImportError as exc:  # pragma: no cover
    from .errors import MissingExtra

    raise MissingExtra("train", "export", exc) from exc

import contextlib

from .model import WEIGHTS_LICENCE, LesionNet
from .preprocess import load_pixels, normalise

PARITY_TOLERANCE = 1e-4
DATA_LICENCES = {
    "isic-mvb": "ISIC Archive terms of use (CC BY-NC and CC-0 images); research and non-commercial use",
    "pad-ufes-20-phone": "PAD-UFES-20, CC BY 4.0 (Pacheco et al. 2020)",
}


class _ExportWrapper(torch.nn.Module):
    """Three outputs: the raw logit, the class activation map (heatmaps without torch) and the pooled
    feature vector (the quality gate's out-of-distribution check); a fourth, `diagnosis`, where the networks
    have a diagnosis head: log-probabilities of the classes with the training prior divided out
    (`prior`, one share per class), so that every class counts alike (what balanced accuracy asks).

    Several networks (an ensemble of runs that share preprocessing and validation split) give the mean of
    their logits and of their maps (the map's spatial mean stays the logit); the embedding is the first
    member's, so the quality gate and the photo-type probe read one network's feature space."""

    def __init__(self, nets: LesionNet | Sequence[LesionNet], prior: Sequence[float] | None = None) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList([nets] if isinstance(nets, LesionNet) else list(nets))
        self.diagnose = prior is not None
        if self.diagnose:
            self.register_buffer("prior_shift", torch.from_numpy(prior_shift(prior)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = [net.features(image) for net in self.nets]
        logit = torch.stack([net.head(f) for net, f in zip(self.nets, feats, strict=True)]).mean(dim=0)
        cam = torch.stack([net.cam(f) for net, f in zip(self.nets, feats, strict=True)]).mean(dim=0)
        out = (logit, cam, feats[0].mean(dim=(2, 3)))
        if not self.diagnose:
            return out
        raw = torch.stack([net.diagnosis_head(f) for net, f in zip(self.nets, feats, strict=True)]).mean(dim=0)
        return (*out, torch.log_softmax(raw + self.prior_shift, dim=1))


def _diagnosis_prior(nets: Sequence[LesionNet], runs: Sequence[Path]) -> list[float] | None:
    """The training prior of the networks' diagnosis head (None where they have none); every member of an
    ensemble must have the head."""
    heads = [net.diagnosis_fc is not None for net in nets]
    if not any(heads):
        return None
    if not all(heads):
        raise SkinscanError("an ensemble's networks must all have a diagnosis head, or none")
    priors = [json.loads((r / "calibration.json").read_text()).get("diagnosis_prior") for r in runs]
    if any(p is None for p in priors):
        raise SkinscanError(f"{runs[0]}/calibration.json has no diagnosis_prior: finish the run with this skinscan")
    return list(np.mean([[p[c] for c in DIAGNOSES] for p in priors], axis=0))


def load_run_model(run: Path) -> tuple[LesionNet, TrainConfig]:
    run = Path(run)
    if not (run / "best.pt").is_file() or not (run / "config.yaml").is_file():
        raise ModelLoadError(f"{run} is not a finished training run (needs best.pt and config.yaml)")
    cfg = load_config(run / "config.yaml")  # defaults fill keys added after the run was made
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    net = LesionNet(
        cfg.arch, cfg.dropout, pretrained=False, image_size=cfg.image_size, n_diagnoses=state.get("n_diagnoses", 0)
    )
    net.load_state_dict(state["model"])
    return net.eval(), cfg


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "skinscan",
        "torch",
        "onnx",
        "onnxruntime",
        "numpy",
        "pillow",
        "albumentations",
        "efficientnet-lite-pytorch",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def represented(cfg: TrainConfig) -> dict:
    """Who and what the training images show, per source, where the dataset records it (the phone set):
    skin types (Fitzpatrick), body sites and diagnoses, with counts. Empty without the datasets."""
    from collections import Counter

    from .data import META_FIELDS, meta_level
    from .errors import DatasetError
    from .train import load_training_records

    try:
        records, _ = load_training_records(cfg)
    except (DatasetError, OSError):
        return {}
    out: dict = {}
    for source in sorted({r.source for r in records}):
        metas = [r.meta for r in records if r.source == source and r.meta]
        if metas:
            out[source] = {
                name: dict(Counter(meta_level(m.get(col)) for m in metas).most_common())
                for name, col in META_FIELDS.items()
            }
    return out


def ensemble_calibration(runs: Sequence[Path]) -> dict:
    """Temperature and threshold of several runs' mean logit, fitted on their shared validation split the
    way training fits one run's (`train.operating_point`); needs the datasets (for patient groups)."""
    from .train import load_training_records, operating_point

    infos = [json.loads((r / "data.json").read_text()) for r in runs]
    configs = [load_config(r / "config.yaml") for r in runs]
    ignore = {"seed", "split_seed", "workers", "threads", "device"}  # the split: val_keys below
    if any(c.model_dump(exclude=ignore) != configs[0].model_dump(exclude=ignore) for c in configs[1:]):
        raise SkinscanError("an ensemble's runs must share every setting but the seed (see their config.yaml)")
    if any(i.get("val_keys") != infos[0].get("val_keys") or not i.get("val_keys") for i in infos):
        raise SkinscanError("an ensemble's runs must share one validation split: train them with the same split_seed")
    preds = [np.load(r / "val_predictions.npz") for r in runs]
    keys = [str(k) for k in preds[0]["keys"]]
    if any([str(k) for k in p["keys"]] != keys for p in preds[1:]):
        raise SkinscanError("the runs' validation predictions are not of the same images")
    logits = np.mean([p["logits"] for p in preds], axis=0)
    labels = preds[0]["labels"].astype(int)
    records, _ = load_training_records(configs[0])
    by_key = {r.uid: r for r in records}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise SkinscanError(f"{len(missing)} validation images are not in the datasets (e.g. {missing[0]})")
    val = [by_key[k] for k in keys]
    calibration = operating_point(
        logits,
        labels,
        [r.source for r in val],
        [f"{r.source}/{r.patient or r.group}" for r in val],
        configs[0].target_sensitivity,
    )
    calibration["best_epoch"] = [json.loads((r / "calibration.json").read_text())["best_epoch"] for r in runs]
    return calibration


def validation_image_paths(run: Path, limit: int = 32) -> list[Path]:
    """Paths of (up to `limit`) validation images of a run, for the export parity check."""
    info = json.loads((Path(run) / "data.json").read_text())
    cfg = load_config(Path(run) / "config.yaml")
    roots = {}
    for d in cfg.data or []:
        p = Path(d)
        roots[(p.parent if p.suffix.lower() == ".csv" else p).name] = p.parent if p.suffix.lower() == ".csv" else p
    paths = []
    for key in info.get("val_keys", []):
        source, _, rel = key.partition("/")
        if source in roots and (roots[source] / rel).is_file():
            paths.append(roots[source] / rel)
        elif "dataset" in info and (Path(info["dataset"]) / key).is_file():  # runs made before multi-source
            paths.append(Path(info["dataset"]) / key)
        if len(paths) >= limit:
            break
    return paths


def parity_check(
    onnx_path: Path, net: LesionNet | Sequence[LesionNet], batch: np.ndarray, prior: Sequence[float] | None = None
) -> float:
    """Largest |difference| between ONNX Runtime and torch on `batch`, over the logit (the mean logit of
    several networks) and the diagnosis log-probabilities where there are any; raises above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = ["logit"] if prior is None else ["logit", "diagnosis"]
    onnx_out = session.run(names, {"image": batch})
    with torch.inference_mode():
        torch_out = _ExportWrapper(net, prior).eval()(torch.from_numpy(batch))
    diff = max(
        float(np.abs(a - b.numpy()).max()) for a, b in zip(onnx_out, (torch_out[0], *torch_out[3:]), strict=True)
    )
    if diff > PARITY_TOLERANCE:
        raise SkinscanError(f"ONNX and torch disagree by {diff:.2e} (> {PARITY_TOLERANCE}): export is broken")
    return diff


def export(
    run: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    name: str = "skinscan-lite0",
    version_tag: str | None = None,
    check_images: list[Path] | None = None,
) -> Path:
    """Write `<out_dir>/<name>.onnx` (card inside) and `<name>.card.json`; returns the ONNX path.

    Several runs make one ensemble model (mean logit; see `_ExportWrapper`): they must share preprocessing
    and validation split (train them with the same `split_seed`); its temperature and threshold are fitted
    again on the mean of their validation logits, as training does for one run (`ensemble_calibration`)."""
    runs = [Path(run)] if isinstance(run, (str, Path)) else [Path(r) for r in run]
    out_dir = Path(out_dir)
    loaded = [load_run_model(r) for r in runs]
    nets = [net for net, _ in loaded]
    cfg = loaded[0][1]
    spec = cfg.preprocess_spec()
    run = runs[0]
    data_info = json.loads((run / "data.json").read_text()) if (run / "data.json").is_file() else {}
    one = len(runs) == 1
    calibration = json.loads((run / "calibration.json").read_text()) if one else ensemble_calibration(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{name}.onnx"
    prior = _diagnosis_prior(nets, runs)
    outputs = ["logit", "cam", "embedding"] + ([] if prior is None else ["diagnosis"])

    dummy = torch.zeros(2, 3, spec.size, spec.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ExportWrapper(nets, prior).eval(),
            (dummy,),
            str(onnx_path),
            input_names=["image"],
            output_names=outputs,
            dynamic_shapes={"image": {0: torch.export.Dim("batch", max=4096)}},
            opset_version=18,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    # Parity on real images from the run's validation split (or random inputs if none are given).
    if check_images:
        batch = normalise(np.stack([load_pixels(p, spec) for p in check_images]), spec)
    else:
        batch = np.random.default_rng(0).standard_normal((4, 3, spec.size, spec.size)).astype(np.float32)
    diff = parity_check(onnx_path, nets, batch, prior)

    histories = []
    for r in runs:
        history = []
        if (r / "history.csv").is_file():
            with (r / "history.csv").open() as fh:
                history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
        histories.append(history)
    sources = sorted(data_info.get("per_source", {})) or [Path(d).name for d in cfg.data or []]
    card = {
        "format": CARD_FORMAT,
        "name": name,
        "version": version_tag or f"{date.today().isoformat()}",
        "architecture": f"{cfg.arch} (ImageNet-pretrained) -> global average pool -> linear, 1 logit"
        + (
            f"; mean logit of {len(nets)} such networks (seeds {', '.join(str(c.seed) for _, c in loaded)})"
            if len(nets) > 1
            else ""
        ),
        "input_name": "image",
        "outputs": outputs,
        **(
            {}
            if prior is None
            else {
                "diagnosis": {
                    "classes": list(DIAGNOSES),
                    "prior": dict(zip(DIAGNOSES, prior, strict=True)),
                    "output": "log-probabilities with the training prior divided out: every class counts alike",
                }
            }
        ),
        "preprocessing": spec.to_dict(),
        "temperature": calibration["temperature"],
        "threshold": calibration["threshold"],
        "threshold_rule": (
            f"highest threshold on the calibrated validation probability that keeps validation "
            f"sensitivity >= {calibration['target_sensitivity']}"
        ),
        "intended_use": INTENDED_USE,
        "limits": list(KNOWN_LIMITS),
        "metrics": {
            "validation": calibration["validation"],
            "validation_per_source": calibration.get("validation_per_source", {}),
        },
        "threshold_per_source": calibration.get("threshold_per_source", {}),
        "training": {
            "config": cfg.model_dump(),
            "best_epoch": calibration["best_epoch"],
            "history": histories[0],
            # val_keys: the photos the networks never trained on (tests and benchmarks find held-out photos there)
            "data": {**data_info, "represented": represented(cfg)},
            **(
                {
                    "members": [
                        {"run": r.as_posix(), "seed": c.seed, "history": h}
                        for r, (_, c), h in zip(runs, loaded, histories, strict=True)
                    ]
                }
                if len(runs) > 1
                else {}
            ),
        },
        "parity_max_abs_logit_diff": diff,
        "licences": {
            "code": "Apache-2.0",
            "weights": WEIGHTS_LICENCE,
            "data": {s: DATA_LICENCES.get(s, "see the dataset's own terms") for s in sources},
        },
        "packages": _versions(),
    }
    write_card(onnx_path, card)
    return onnx_path


def record_test_metrics(onnx_path: Path, data: Path, report_dir: Path) -> dict:
    """Score `data`'s test split with the exported model and store the metrics in its card (`metrics.test`)."""
    from .evaluate import evaluate, record_in_card

    report = evaluate(onnx_path, data, report_dir, split="auto", progress=False)
    return record_in_card(report, onnx_path, "test")


if TYPE_CHECKING:
    from .predict import Predictor


def add_quality_gate(
    onnx_path: str | Path,
    train_image_paths: Sequence[str | Path],
    nonlesion_dir: str | Path,
    *,
    sources: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """Fit the quality gate's out-of-distribution check and store it in the model card (`quality_gate`).

    Embeds the training photos and the non-lesion tuning pictures (`nonlesion_dir`, e.g.
    tests/assets/nonlesion/tune) with the exported model itself, through the Predictor's preprocessing,
    then `skinscan.quality.fit_quality_gate`. `sources` (one per training path, e.g. the records' source)
    keeps every source's rejection under the budget; `groups` (e.g. the records' patient group) keeps
    near-copies in one cross-fitting fold. Returns the card section.
    """
    from .card import ModelCard
    from .data import IMAGE_SUFFIXES
    from .predict import Predictor
    from .quality import CARD_SECTION, fit_quality_gate

    onnx_path, nonlesion_dir = Path(onnx_path), Path(nonlesion_dir)
    nonlesion = sorted(p for p in nonlesion_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not nonlesion:
        raise SkinscanError(
            f"{nonlesion_dir}: no non-lesion images; use the tuning half made by benchmarks/make_nonlesion_set.py "
            "(tests/assets/nonlesion/tune)"
        )
    for what, values in (("sources", sources), ("groups", groups)):
        if values is not None and len(values) != len(train_image_paths):
            raise SkinscanError(f"{len(train_image_paths)} training images but {len(values)} {what}")
    predictor = Predictor(onnx_path)
    if "embedding" not in [o.name for o in predictor.session.get_outputs()]:
        raise SkinscanError(f"{onnx_path} has no `embedding` output: re-export it with this skinscan")

    train, kept = _infer(predictor, list(train_image_paths), "training", batch_size, progress)
    nonlesion_out, _ = _infer(predictor, nonlesion, "non-lesion", batch_size, progress)
    section = fit_quality_gate(
        train["embedding"],
        nonlesion_out["embedding"],
        train_sources=None if sources is None else [sources[i] for i in kept],
        train_groups=None if groups is None else [groups[i] for i in kept],
        nonlesion_groups=[_picture(p) for p in nonlesion],
    )
    section["fit"]["nonlesion_dir"] = nonlesion_dir.as_posix()
    section["fit"]["unreadable_train_images"] = len(train_image_paths) - len(kept)
    card = predictor.card.model_dump()
    card[CARD_SECTION] = section
    del predictor  # release the file before rewriting it
    write_card(onnx_path, ModelCard(**card).model_dump())
    return section


def _picture(path: Path) -> str:
    """The source picture of a non-lesion image: benchmarks/make_nonlesion_set.py names crops NAME-cropN."""
    return re.sub(r"-(full|crop\d+)$", "", path.stem)


_INFERRED: dict[tuple[str, tuple[str, ...]], tuple[dict[str, np.ndarray], list[int]]] = {}


def _weights_digest(onnx_path: Path) -> str:
    """A digest of the graph and its weights, not of the card: rewriting the card keeps the outputs. Parsing
    the file takes about a second, so it is done once per file version (path, size, modification time)."""
    stat = Path(onnx_path).stat()
    return _graph_digest(str(Path(onnx_path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _graph_digest(path: str, size: int, mtime_ns: int) -> str:
    import onnx

    return hashlib.sha256(onnx.load(path).graph.SerializeToString()).hexdigest()


def _infer(
    predictor: Predictor, paths: Sequence[str | Path], what: str, batch_size: int, progress: bool
) -> tuple[dict[str, np.ndarray], list[int]]:
    """The model's `logit` and `embedding` outputs (and `diagnosis`, where it has one) for `paths` (through
    the Predictor's preprocessing), and the indices of the images that could be read. Kept for the process
    by weights and paths: an export embeds its training photos for the photo types and again for the gate."""
    key = (_weights_digest(predictor.model_path), tuple(str(p) for p in paths))
    if key not in _INFERRED:
        while len(_INFERRED) >= 2:  # a run's training and validation photos; the former take tens of MB
            del _INFERRED[next(iter(_INFERRED))]
        _INFERRED[key] = _infer_now(predictor, paths, what, batch_size, progress)
    return _INFERRED[key]


def _infer_now(
    predictor: Predictor, paths: Sequence[str | Path], what: str, batch_size: int, progress: bool
) -> tuple[dict[str, np.ndarray], list[int]]:
    from tqdm.auto import tqdm

    from .errors import InvalidImage

    names = [n for n in ("logit", "embedding", "diagnosis") if n in [o.name for o in predictor.session.get_outputs()]]
    chunks, kept = [], []
    with tqdm(total=len(paths), desc=f"gate: embed {what}", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            pixels = []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    pixels.append(load_pixels(paths[i], predictor.spec))
                    kept.append(i)
                except InvalidImage:
                    pass  # counted by the caller: the card says how many were used
            if pixels:
                out = predictor.run(normalise(np.stack(pixels), predictor.spec))
                chunks.append({k: out[k] for k in names})
            bar.update(min(batch_size, len(paths) - start))
    if not chunks:
        raise SkinscanError(f"none of the {len(paths)} {what} images could be read")
    return {k: np.concatenate([c[k] for c in chunks]) for k in names}, kept


def add_diagnosis_figures(onnx_path: str | Path, val_records: Sequence, *, progress: bool = False) -> dict:
    """The diagnosis head's balanced accuracy per source on the run's validation photos (never trained on;
    `loso.diagnosis_figures`), stored in the card under `diagnosis.balanced_accuracy`. Returns it."""
    from .card import ModelCard
    from .loso import diagnosis_figures
    from .predict import Predictor

    onnx_path = Path(onnx_path)
    predictor = Predictor(onnx_path)
    card = predictor.card.model_dump()
    if not card.get("diagnosis"):
        raise SkinscanError(f"{onnx_path} has no diagnosis head (train with diagnosis_weight > 0)")
    out, kept = _infer(predictor, [r.path for r in val_records], "validation", 32, progress)
    recs = [val_records[i] for i in kept]
    figures = {}
    for source in sorted({r.source for r in recs}):
        idx = [i for i, r in enumerate(recs) if r.source == source]
        f = diagnosis_figures([recs[i] for i in idx], out["diagnosis"][idx])
        if f:
            figures[source] = {**f, "n": sum(1 for i in idx if recs[i].diagnosis)}
    card["diagnosis"] = {
        **card["diagnosis"],
        "balanced_accuracy": figures,
        "balanced_accuracy_on": "the run's validation photos (never trained on; they chose the epoch), per source, "
        "over the diagnoses with >= 5 photos there",
    }
    del predictor  # release the file before rewriting it
    write_card(onnx_path, ModelCard(**card).model_dump())
    return figures


def add_photo_types(
    onnx_path: str | Path,
    train_image_paths: Sequence[str | Path],
    train_types: Sequence[str],
    train_groups: Sequence[str],
    val_image_paths: Sequence[str | Path],
    val_labels: Sequence[int],
    val_types: Sequence[str],
    *,
    cv: Mapping[str, Any] | None = None,
    dermoscopic_min_probability: float = DERMOSCOPIC_MIN_PROBABILITY,
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """Fit the calibration per detected photo type (`skinscan.phototype`) and store it in the model card
    (`photo_types`): the type probe on the training photos' embeddings, a temperature per detected type on
    the validation photos' logits, both from the exported model itself; the thresholds per type from `cv`
    (`phototype.cv_thresholds`) if given, else the run's one boundary. A photo is judged as dermoscopic
    where the probe's P(dermoscopic) reaches `dermoscopic_min_probability`. Returns the card section."""
    from .card import ModelCard
    from .phototype import CARD_SECTION, fit_photo_types
    from .predict import Predictor

    onnx_path = Path(onnx_path)
    predictor = Predictor(onnx_path)
    if "embedding" not in [o.name for o in predictor.session.get_outputs()]:
        raise SkinscanError(f"{onnx_path} has no `embedding` output: re-export it with this skinscan")
    train, kept = _infer(predictor, list(train_image_paths), "training", batch_size, progress)
    val, val_kept = _infer(predictor, list(val_image_paths), "validation", batch_size, progress)
    section = fit_photo_types(
        train["embedding"],
        [train_types[i] for i in kept],
        [train_groups[i] for i in kept],
        val["embedding"],
        val["logit"],
        np.array([val_labels[i] for i in val_kept]),
        [val_types[i] for i in val_kept],
        temperature=predictor.card.temperature,
        threshold=predictor.card.threshold,
        cv=cv,
        dermoscopic_min_probability=dermoscopic_min_probability,
    )
    card = predictor.card.model_dump()
    card[CARD_SECTION] = section
    del predictor  # release the file before rewriting it
    write_card(onnx_path, ModelCard(**card).model_dump())
    return section


def refit_type_thresholds(
    onnx_path: str | Path,
    val_records: Sequence[Record],
    target: float,
    *,
    builds: Sequence[str | Path] = (),
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """Choose a model's threshold per photo type again, on its validation photos, by the rule that
    leave-one-source-out chose (`loso.decision_rule`): per photo type, the highest threshold that keeps
    `target` sensitivity in every source of that type with enough cancers (each photo's type its source's).
    Each type's boundary, in logit units, is then seen through the card's temperature for that *detected*
    type, as served; the probe and the temperatures stay. The model's own logits decide; its other `builds`
    (an int8 build, whose card `--int8` copied) receive the same section, as they carry its other decisions:
    a boundary set by the one lowest-scoring cancer of a source moves with any small change of that logit.
    Rewrites the cards' `photo_types` thresholds and rule (the export's kept in `threshold_fit`, through any
    number of refits); returns the section."""
    import copy

    from .card import ModelCard
    from .loso import MIN_CANCERS_FOR_THRESHOLD, decision_rule
    from .metrics import sigmoid
    from .phototype import CARD_SECTION
    from .predict import Predictor

    if not 0.5 < target < 1:
        raise SkinscanError(f"--target {target}: give a sensitivity between 0.5 and 1 (e.g. 0.98)")
    onnx_path = Path(onnx_path)
    predictor = Predictor(onnx_path)
    if predictor.photo_types is None:
        raise SkinscanError(f"{onnx_path} has no photo types to set thresholds for: export it with --photo-types")
    others = [Predictor(b) for b in builds]
    for b, other in zip(builds, others, strict=True):
        if other.card.photo_types != predictor.card.photo_types:
            raise SkinscanError(f"{b} calibrates photo types unlike {onnx_path}: not a build of the same model")
    val, kept = _infer(predictor, [r.path for r in val_records], "validation", batch_size, progress)
    records = [val_records[i] for i in kept]
    rule = decision_rule(val["logit"], records, target)
    section = copy.deepcopy(predictor.card.photo_types)
    previous = {t: {k: e[k] for k in ("threshold", "threshold_logit")} for t, e in section["types"].items()}
    previous_rule = section.get("threshold_rule")
    if "threshold_fit" in section:  # a refit: what the export chose stays the record, not the last fit
        previous, previous_rule = (section["threshold_fit"][k] for k in ("previous_thresholds", "previous_rule"))
    for t, entry in section["types"].items():
        if t not in rule:
            raise SkinscanError(f"no validation photo of a {t} source: its threshold cannot be chosen")
        z = float(rule[t]["temperature"] * np.log(rule[t]["threshold"] / (1 - rule[t]["threshold"])))
        entry["threshold_logit"], entry["threshold"] = z, float(sigmoid(z / entry["temperature"]))
    detected = predictor.photo_types.detect(val["embedding"])
    refer = np.array([z >= section["types"][t]["threshold_logit"] for z, t in zip(val["logit"], detected, strict=True)])
    y, src = np.array([r.label for r in records]), np.array([r.source for r in records])
    served = {
        s: {
            "n": int((src == s).sum()),
            "n_malignant": int(y[src == s].sum()),
            "sensitivity": float(refer[(src == s) & (y == 1)].mean()) if y[src == s].any() else None,
            "specificity": float(1 - refer[(src == s) & (y == 0)].mean()) if (y[src == s] == 0).any() else None,
        }
        for s in sorted(set(src))
    }
    section["threshold_rule"] = (
        f"per photo type: the highest threshold that keeps sensitivity >= {target:g} in every source of that type "
        f"with >= {MIN_CANCERS_FOR_THRESHOLD} cancers among the validation photos (skinscan.loso.decision_rule), "
        "its boundary seen through each detected type's temperature; the target above 0.95 because "
        "leave-one-source-out showed 0.95 on the training sources falling to about 0.91-0.94 on a source never seen"
    )
    section["threshold_fit"] = {
        "target": target,
        "validation_photos": len(records),
        "as_served": served,  # each photo judged by its detected type, as served
        "previous_rule": previous_rule,  # the export's (kept through refits)
        "previous_thresholds": previous,
    }
    cards = [(onnx_path, predictor.card.model_dump())] + [
        (Path(b), o.card.model_dump()) for b, o in zip(builds, others, strict=True)
    ]
    del predictor, others  # release the files before rewriting them
    for path, card in cards:
        card[CARD_SECTION] = section
        write_card(path, ModelCard(**card).model_dump())
    return section


def quantize_int8(onnx_path: str | Path, calibration_images: Sequence[str | Path], out_path: str | Path) -> Path:
    """Static int8 quantisation (ONNX Runtime, QDQ, per-channel weights) calibrated on real images through
    the model's own preprocessing; the card travels along with a `quantization` note and the largest
    probability difference from the fp32 model on the calibration images."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from .card import ModelCard
    from .predict import Predictor

    fp32 = Predictor(onnx_path)
    batches = [normalise(load_pixels(p, fp32.spec), fp32.spec)[None] for p in calibration_images]
    if not batches:
        raise SkinscanError("int8 quantisation needs calibration images (the run's validation images)")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter({fp32.card.input_name: b} for b in batches)

        def get_next(self) -> dict | None:
            return next(self._it, None)

    out_path = Path(out_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(onnx_path),
            str(out_path),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights: ONNX Runtime's u8s8 kernels saturate on x86 CPUs without VNNI (its quantisation
            # docs); full 8 bits disagreed with fp32 by 0.05 on average on such a CPU
            reduce_range=True,
        )
    model = onnx.load(str(out_path))  # the quantiser drops metadata: give the card back
    del model.metadata_props[:]
    onnx.save(model, str(out_path))
    x = np.concatenate(batches)
    p32 = fp32.calibrate(fp32.run(x)["logit"])
    card = fp32.card.model_dump()
    card["name"] = f"{card['name']}-int8"
    card["quantization"] = {
        "method": "onnxruntime static QDQ, per-channel int8 weights in a 7-bit range, uint8 activations",
        "calibration_images": len(batches),
    }
    write_card(out_path, ModelCard(**card).model_dump())
    p8 = Predictor(out_path)
    diff = float(np.abs(p8.calibrate(p8.run(x)["logit"]) - p32).max())
    card["quantization"]["max_abs_probability_diff_on_calibration_images"] = diff
    write_card(out_path, ModelCard(**card).model_dump())
    return out_path
