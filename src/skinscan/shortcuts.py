"""Shortcut checks: what a source stamps on its photos, pasted onto photos that lack it.

Each source marks its photos in its own way: DermNet NZ's logo, the "SFS" text on many Fitzpatrick17k photos,
the ruler and the round dark vignette of some dermatoscopes, the surgical-ink circle drawn around a lesion in
the phone set. A network can learn the mark instead of the lesion. The counterfactual check pastes each
mark onto held-out benign photos and measures how far the probability moves (`stamp_effects`); a model that
looks at the lesion barely moves. `perturbation_effects` measures the same for changes that carry no mark
(`CONTROLS`: the photo mirrored, moved by 4 px, saved again as a JPEG): how far the model moves for nothing.

The stamps themselves are RGBA images cut from real photos of the datasets at run time
(`skinscan.stamps.build_stamps`); `PLACEMENTS` says where each source puts its mark and how large. No torch
here.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageOps

from .data import Record
from .errors import SkinscanError
from .preprocess import ImageSource, load_pixels

if TYPE_CHECKING:  # only for the annotations: importing this module loads no model runtime
    from .predict import Predictor

Anchor = Literal["bottom-left", "bottom", "centre", "fill"]
Blend = Literal["over", "multiply"]


@dataclass(frozen=True)
class Placement:
    """Where a stamp goes on a photo, and how large.

    - `anchor`: "bottom-left" (a corner mark), "bottom" (along the bottom edge, the photo's full width),
      "centre" (around the lesion, which sits at the centre), "fill" (stretched over the whole photo).
    - `width`: the stamp's width as a fraction of the photo's shorter side ("bottom" and "fill" ignore it).
    - `margin`: (from the left, from the bottom) as fractions of the shorter side ("bottom-left" only).
    - `blend`: "over" paints the stamp's colour with its alpha; "multiply" darkens the photo by the stamp's
      colour (ink absorbs light, a vignette shades it): photo * (1 - alpha * (1 - colour)).
    - `origin`: where the mark comes from; `carried_by`: the sources whose photos already carry it (the
      check skips them: pasting a logo onto a photo that has it tests nothing).
    """

    anchor: Anchor
    width: float = 1.0
    margin: tuple[float, float] = (0.0, 0.0)
    blend: Blend = "over"
    origin: str = ""
    carried_by: tuple[str, ...] = ()


# Geometry measured on the photos the stamps are cut from (skinscan.stamps: crop box / photo size).
PLACEMENTS: Mapping[str, Placement] = {
    # DermNet NZ: the logo sits at the bottom left of every photo (288x216: x 24-86, y 144-199)
    "dermnet-logo": Placement(
        "bottom-left", width=0.287, margin=(0.111, 0.079), origin="dermnet-nz", carried_by=("dermnet-nz",)
    ),
    # Fitzpatrick17k (DermaAmin): "SFS" in the bottom-left corner; its size varies with the original photo
    "sfs-text": Placement(
        "bottom-left", width=0.147, margin=(0.031, 0.019), origin="fitzpatrick17k", carried_by=("fitzpatrick17k",)
    ),
    # ISIC archive dermoscopy: a ruler along the bottom edge, the photo's full width
    "ruler": Placement("bottom", origin="isic-archive-pre2019"),
    # the phone set: ink drawn around the lesion. The source circle spans 0.56 of its photo; 0.7 surrounds
    # most dermoscopic nevi too instead of crossing them
    "ink-circle": Placement("centre", width=0.7, blend="multiply", origin="pad-ufes-20-phone"),
    # dermatoscopes: a dark round field of view over the whole photo (a generated mask)
    "vignette": Placement("fill", blend="multiply", origin="dermoscopes"),
}

# Predictions over this many photos at a time (each with every stamp): bounded memory for large photos.
_PHOTOS_PER_CHUNK = 8


def load_stamps(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, Image.Image]:
    """The stamps `<folder>/<name>.png` (every name of PLACEMENTS unless `names`), as RGBA images."""
    folder = Path(folder)
    stamps = {}
    for name in names if names is not None else PLACEMENTS:
        if name not in PLACEMENTS:
            raise SkinscanError(f"unknown stamp {name!r}; stamps: {', '.join(PLACEMENTS)}")
        path = folder / f"{name}.png"
        if not path.is_file():
            raise SkinscanError(f"{path} not found: a folder of <name>.png stamps (skinscan.stamps.build_stamps)")
        with Image.open(path) as img:
            stamps[name] = img.convert("RGBA")
    return stamps


def paste_stamp(image: Image.Image, stamp: Image.Image, where: Placement | str) -> Image.Image:
    """`image` (RGB) with `stamp` (RGBA) pasted where `where` says (a Placement or a name in PLACEMENTS),
    scaled to the photo's size. Returns a new RGB image of the same size; `image` is unchanged."""
    place = PLACEMENTS[where] if isinstance(where, str) else where
    photo = image.convert("RGB")
    w, h = photo.size
    side = min(w, h)
    if place.anchor == "fill":
        size = (w, h)
    elif place.anchor == "bottom":
        size = (w, max(1, round(stamp.height * w / stamp.width)))
    elif place.anchor in ("bottom-left", "centre"):
        sw = max(1, round(place.width * side))
        size = (sw, max(1, round(stamp.height * sw / stamp.width)))
    else:
        raise ValueError(f"unknown anchor {place.anchor!r}; anchors: bottom-left, bottom, centre, fill")
    if place.anchor == "bottom-left":
        left, top = round(place.margin[0] * side), h - round(place.margin[1] * side) - size[1]
    elif place.anchor == "bottom":
        left, top = 0, h - size[1]
    elif place.anchor == "centre":
        left, top = (w - size[0]) // 2, (h - size[1]) // 2
    else:
        left, top = 0, 0
    scaled = stamp.convert("RGBA").resize(size, Image.LANCZOS)  # Pillow resizes RGBA premultiplied
    # the part of the stamp inside the photo
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + size[0], w), min(top + size[1], h)
    if x0 >= x1 or y0 >= y1:
        return photo
    part = np.asarray(scaled.crop((x0 - left, y0 - top, x1 - left, y1 - top)), dtype=np.float32) / 255.0
    out = np.asarray(photo, dtype=np.float32).copy()
    region = out[y0:y1, x0:x1]
    colour, alpha = part[..., :3], part[..., 3:]
    if place.blend == "over":
        region[:] = region * (1.0 - alpha) + colour * 255.0 * alpha
    elif place.blend == "multiply":
        region[:] = region * (1.0 - alpha * (1.0 - colour))
    else:
        raise ValueError(f"unknown blend {place.blend!r}; blends: over, multiply")
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def random_stamp(pixels: np.ndarray, stamps: Mapping[str, Image.Image], rng: np.random.Generator) -> np.ndarray:
    """Counterfactual augmentation (training's `stamp_augment`): `pixels` (uint8 H x W x 3) with one of
    `stamps` pasted, chosen at random whatever the photo's label or source, its size, place and opacity
    jittered around where its source puts it (PLACEMENTS): a corner mark 0.7-1.4x its width with margins of
    0-0.15, the ink circle 0.5-0.95 of the shorter side, the vignette's field 0.8-1 of its drawn size
    (cropped from its centre: a lighter one), opacity 0.7-1. Flips and rotations come later, in the
    augmentation pipeline, and move marks to the other corners and edges."""
    name = list(stamps)[int(rng.integers(len(stamps)))]
    place, stamp = PLACEMENTS[name], stamps[name]
    if place.anchor == "bottom-left":
        margin = (float(rng.uniform(0, 0.15)), float(rng.uniform(0, 0.15)))
        place = replace(place, width=place.width * float(rng.uniform(0.7, 1.4)), margin=margin)
    elif place.anchor == "centre":
        place = replace(place, width=float(rng.uniform(0.5, 0.95)))
    elif place.anchor == "fill":
        f = float(rng.uniform(0.8, 1.0))
        w, h = stamp.size
        box = (round(w * (1 - f) / 2), round(h * (1 - f) / 2), round(w * (1 + f) / 2), round(h * (1 + f) / 2))
        stamp = stamp.crop(box)
    rgba = np.array(stamp.convert("RGBA"))
    rgba[..., 3] = np.round(rgba[..., 3] * rng.uniform(0.7, 1.0)).astype(np.uint8)
    out = paste_stamp(Image.fromarray(pixels, "RGB"), Image.fromarray(rgba, "RGBA"), place)
    return np.asarray(out, dtype=np.uint8)


@dataclass(frozen=True)
class StampEffect:
    """How one stamp moved the model on `n` photos. Changes are stamped minus unstamped calibrated
    probability: `median_abs_change` and `p90_abs_change` of |change|, `mean_change` signed (> 0: the stamp
    pushes towards cancer); `flipped` is the share of photos whose decision (refer/monitor) changed."""

    stamp: str
    n: int
    median_abs_change: float
    mean_change: float
    p90_abs_change: float
    flipped: float

    def to_dict(self) -> dict[str, Any]:
        """As JSON takes it: NaN (a stamp pasted on no photo) becomes None."""
        return {k: None if isinstance(v, float) and v != v else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True, eq=False)
class ShortcutReport:
    """`stamp_effects`' result. Per photo (rows) and version (columns: the photo as it is, then each stamp):
    `probabilities` (calibrated; NaN where the stamp was skipped) and `refer` (the decision); `sources`
    names each photo's source (None where not given). `effects` summarises each stamp over all photos,
    `for_source` over one source's."""

    stamps: tuple[str, ...]
    sources: tuple[str | None, ...]
    probabilities: np.ndarray = field(repr=False)
    refer: np.ndarray = field(repr=False)

    @property
    def baseline(self) -> np.ndarray:
        """The photos' unstamped probabilities."""
        return self.probabilities[:, 0]

    @property
    def effects(self) -> tuple[StampEffect, ...]:
        return tuple(self[name] for name in self.stamps)

    def __getitem__(self, stamp: str) -> StampEffect:
        if stamp not in self.stamps:
            raise KeyError(f"no stamp {stamp!r} in this report; stamps: {', '.join(self.stamps)}")
        j = 1 + self.stamps.index(stamp)
        done = ~np.isnan(self.probabilities[:, j])
        change = self.probabilities[done, j] - self.probabilities[done, 0]
        if not len(change):
            return StampEffect(stamp, 0, float("nan"), float("nan"), float("nan"), float("nan"))
        return StampEffect(
            stamp=stamp,
            n=len(change),
            median_abs_change=float(np.median(np.abs(change))),
            mean_change=float(np.mean(change)),
            p90_abs_change=float(np.quantile(np.abs(change), 0.9)),
            flipped=float(np.mean(self.refer[done, j] != self.refer[done, 0])),
        )

    def for_source(self, source: str) -> ShortcutReport:
        """The same report over the photos of one source."""
        rows = np.array([s == source for s in self.sources], dtype=bool)
        if not rows.any():
            raise KeyError(
                f"no photo of source {source!r}; sources: {', '.join(sorted({str(s) for s in self.sources}))}"
            )
        return ShortcutReport(
            self.stamps,
            tuple(s for s in self.sources if s == source),
            self.probabilities[rows],
            self.refer[rows],
        )

    def to_dict(self) -> dict[str, Any]:
        return {"n": len(self.sources), "effects": [e.to_dict() for e in self.effects]}


def stamp_effects(
    predictor: Predictor,
    photos: Sequence[ImageSource],
    stamps: Mapping[str, Image.Image],
    *,
    sources: Sequence[str] | None = None,
    placements: Mapping[str, Placement] = PLACEMENTS,
    batch_size: int = 32,
) -> ShortcutReport:
    """Paste every stamp onto every photo and predict (forced past the quality gate, batched): how far each
    stamp moves the calibrated probability and how often it flips the decision.

    Each photo is first cut to what the model sees (`load_pixels`: the centre square at the model's input
    size) and the stamps are pasted on that square: every mark lies inside the model's view, where on a
    landscape photo a corner mark would fall outside the crop and test nothing.

    With `sources` (each photo's source), a stamp skips the photos of the sources that already carry it
    (`Placement.carried_by`); its `n` counts the photos it was pasted on. A photo that cannot be read
    raises: the check runs on the photos it was given or not at all."""
    names = tuple(stamps)
    unknown = [n for n in names if n not in placements]
    if unknown:
        raise SkinscanError(f"no placement for stamp(s) {unknown}; placements: {', '.join(placements)}")
    changes = {name: partial(_paste, stamps[name], placements[name]) for name in names}
    skip = {name: placements[name].carried_by for name in names}
    return _effects(predictor, photos, changes, skip, sources, batch_size)


def _paste(stamp: Image.Image, place: Placement, img: Image.Image) -> Image.Image:
    return paste_stamp(img, stamp, place)


def _shift(img: Image.Image, pixels: int = 4) -> Image.Image:
    """The square moved `pixels` right and down, its top and left edges repeated into the gap."""
    a = np.asarray(img)
    return Image.fromarray(np.pad(a, ((pixels, 0), (pixels, 0), (0, 0)), mode="edge")[: a.shape[0], : a.shape[1]])


def _jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    with Image.open(buf) as out:
        return out.convert("RGB")


# Changes that carry no mark and no information about the lesion: how far the model moves for nothing, the
# floor that the marks' changes are read against (`perturbation_effects`). Training flips photos at random,
# so a network that had learned only the lesion would not move under the mirror.
CONTROLS: Mapping[str, Callable[[Image.Image], Image.Image]] = {
    "mirror": ImageOps.mirror,  # left and right swapped
    "shift-4px": _shift,  # the square moved 4 px (1.8% of 224) right and down, edges repeated
    "jpeg-q90": _jpeg,  # saved once more as a JPEG of quality 90
}


def perturbation_effects(
    predictor: Predictor,
    photos: Sequence[ImageSource],
    changes: Mapping[str, Callable[[Image.Image], Image.Image]] = CONTROLS,
    *,
    sources: Sequence[str] | None = None,
    batch_size: int = 32,
) -> ShortcutReport:
    """Like `stamp_effects`, for any change of the square the model sees (`changes`: name -> a function of
    the RGB square returning one of the same size); by default `CONTROLS`, changes that carry no mark. The
    report names each change where `stamp_effects`' names a stamp."""
    return _effects(predictor, photos, changes, {}, sources, batch_size)


def _effects(
    predictor: Predictor,
    photos: Sequence[ImageSource],
    changes: Mapping[str, Callable[[Image.Image], Image.Image]],
    skip: Mapping[str, tuple[str, ...]],
    sources: Sequence[str] | None,
    batch_size: int,
) -> ShortcutReport:
    """Predict every photo's square as it is and with each change (the photos of `skip[name]`'s sources
    skip that change), in chunks of photos: bounded memory for large photos."""
    if not photos:
        raise SkinscanError("no photos to stamp: give at least one held-out photo")
    if sources is not None and len(sources) != len(photos):
        raise SkinscanError(f"{len(sources)} sources for {len(photos)} photos: give one source per photo")
    names = tuple(changes)
    # which (photo, version) pairs to predict: column 0 is the photo as it is
    todo = np.ones((len(photos), 1 + len(names)), dtype=bool)
    if sources is not None:
        for j, name in enumerate(names, start=1):
            todo[:, j] = [s not in skip.get(name, ()) for s in sources]
            if not todo[:, j].any():
                raise SkinscanError(f"stamp {name!r} was pasted on no photo: every photo's source already carries it")
    probs = np.full(todo.shape, np.nan)
    refer = np.zeros(todo.shape, dtype=bool)
    for start in range(0, len(photos), _PHOTOS_PER_CHUNK):
        cells, variants = [], []
        for i in range(start, min(start + _PHOTOS_PER_CHUNK, len(photos))):
            img = Image.fromarray(load_pixels(photos[i], predictor.spec))
            for j in np.flatnonzero(todo[i]):
                cells.append((i, j))
                variants.append(img if j == 0 else changes[names[j - 1]](img))
        preds = predictor.predict(variants, batch_size=batch_size, force=True)
        bad = next((p for p in preds if not p.ok), None)
        if bad is not None:
            raise SkinscanError(f"a photo could not be scored: {bad.error}")
        for (i, j), p in zip(cells, preds, strict=True):
            probs[i, j], refer[i, j] = p.probability, p.decision == "refer"
    return ShortcutReport(names, tuple(sources) if sources is not None else (None,) * len(photos), probs, refer)


def held_out(records: Sequence[Record], card: Any) -> list[Record]:
    """The records a model never trained on, by its card's `training.data`: a `test` split (training reads
    only the `train` split of a dataset that has one), a source the card's `per_source` does not list (where
    it lists any), or a validation photo (`val_keys`, uids "dataset/relative-path", where the card has them).
    A held-out record that shares its group (patient, lesion, near-duplicate) with a trained one is dropped:
    isic-mvb's 14 test images with a near-copy in train go."""
    data = ((getattr(card, "model_extra", None) or {}).get("training") or {}).get("data") or {}
    seen = set(data.get("per_source") or {})
    val_keys = set(data.get("val_keys") or ())

    def is_held_out(r: Record) -> bool:
        return r.split == "test" or bool(seen and r.source not in seen) or r.uid in val_keys

    trained = {(r.dataset, r.group) for r in records if not is_held_out(r)}
    return [r for r in records if is_held_out(r) and (r.dataset, r.group) not in trained]


def spread(items: Sequence, n: int) -> list:
    """`n` items spread evenly over `items` (all of them when there are at most `n`)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]
