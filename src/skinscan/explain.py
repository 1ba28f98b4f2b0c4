"""Heatmaps: a Prediction's class activation map drawn over the photo. NumPy and Pillow only.

The model's `cam` output is exact for its global-pool + linear head: cell (i, j) holds the logit that
the features at that place alone would give, and the mean over the cells is the logit itself. Positive
values are evidence for malignancy, negative values evidence against.

What the heatmap shows: influence, in either direction. Each cell's distance from the photo's typical
cell (the median), |cam - median(cam)|, min-max normalised per image, smoothed, and blended over the
photo with a weight that grows with it: coloured (red most) marks where the photo swayed the estimate
most, up or down, compared with the rest of the photo; uncoloured parts swayed it least (HEATMAP_LEGEND
says so in the same words everywhere). Why not the signed map: for the model trained on isic-mvb (measured on 100 benign
and 100 malignant test photos), a benign lesion is mostly strong evidence *against* malignancy, so the
signed map's maximum lay on the skin around it or on the border for 76% of benign photos (22% of
malignant ones), while the influence map peaks on the lesion (tests/test_explain.py). The signed map stays available: the service's raw
`heatmap` grid and `Prediction.cam`. The scale is relative: a hot spot does not mean a high risk and a
cool map does not mean a low one; the probability says that. A map whose cells (nearly) agree carries
no "where" and is drawn flat (all cold) instead of magnifying noise.

The network sees only the centre square of the photo (shorter side resized, centre-cropped; see
`preprocess.resize_for_model`), so the map covers that square; the strips outside it are dimmed in the
overlay to show that the model did not look at them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .predict import Prediction
from .preprocess import ImageSource, decode_image

# How the overlay reads, in the same words wherever it is shown (CLI, API schema, web page).
HEATMAP_LEGEND = (
    "coloured = where the photo swayed the estimate most, up or down, compared with the rest of the photo "
    "(red most); uncoloured parts swayed it least. Colour is not a sign of cancer by itself"
)

# Longest side of the overlays written by the CLI and returned by the service: the map has 7x7 cells,
# so more pixels add bytes, not information.
DEFAULT_MAX_SIDE = 1024
# The overlay's smoothing, in map cells (see smooth_upsample).
SMOOTH_SIGMA = 0.6
# Below this spread (max - min, in logit units) the map is treated as flat.
FLAT_SPREAD = 1e-6
# Strips of the photo outside the model's square are blended towards this grey.
_OUTSIDE_GREY, _OUTSIDE_DIM = 128.0, 0.55

# The Turbo colour map (Mikhailov 2019; Google's polynomial approximation, Apache-2.0) sampled at 17
# evenly spaced points and interpolated linearly: dark blue (least influence) through green and yellow
# to dark red (most influence).
_TURBO = np.array(
    [
        [35, 23, 27],
        [73, 62, 175],
        [68, 106, 238],
        [50, 149, 247],
        [38, 189, 225],
        [41, 221, 187],
        [64, 243, 146],
        [102, 253, 109],
        [150, 250, 80],
        [198, 235, 59],
        [238, 208, 45],
        [255, 171, 36],
        [255, 128, 29],
        [238, 84, 21],
        [201, 45, 12],
        [161, 18, 2],
        [144, 13, 0],
    ],
    dtype=np.float32,
)


def influence(cam: np.ndarray) -> np.ndarray:
    """What the heatmap draws, per cell in [0, 1]: |cam - median(cam)| min-max normalised (see the module
    docstring); all zeros when the map is flat."""
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2 or cam.size == 0 or not np.all(np.isfinite(cam)):
        raise ValueError(f"expected a finite 2-D class activation map, got shape {cam.shape}")
    if float(cam.max() - cam.min()) < FLAT_SPREAD:
        return np.zeros_like(cam)
    away = np.abs(cam - np.median(cam))
    lo, hi = float(away.min()), float(away.max())
    return (away - lo) / (hi - lo)


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of bilinear interpolation with cell centres aligned (edges clamped)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), i0), 1 - frac)
    np.add.at(weights, (np.arange(n_out), i1), frac)
    return weights


def upsample(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling of an (h, w) grid to (height, width); values stay within the grid's range."""
    grid = np.asarray(grid, dtype=np.float64)
    return _bilinear_matrix(height, grid.shape[0]) @ grid @ _bilinear_matrix(width, grid.shape[1]).T


def _gaussian_matrix(n_out: int, n_in: int, sigma: float) -> np.ndarray:
    """(n_out, n_in) weights of Gaussian interpolation (`sigma` in cells, cell centres aligned); rows sum to 1."""
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    weights = np.exp(-0.5 * ((src[:, None] - np.arange(n_in)[None, :]) / sigma) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def smooth_upsample(grid: np.ndarray, width: int, height: int, sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """Gaussian interpolation of an (h, w) grid to (height, width): a smooth map, round around a hot cell
    (bilinear interpolation draws a lone hot cell as a hard-edged square); values stay within the grid's range."""
    grid = np.asarray(grid, dtype=np.float64)
    return _gaussian_matrix(height, grid.shape[0], sigma) @ grid @ _gaussian_matrix(width, grid.shape[1], sigma).T


def _lookup_table(points: np.ndarray, n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours interpolated linearly between evenly spaced `points`."""
    x = np.linspace(0, len(points) - 1, n)
    i0 = np.minimum(np.floor(x).astype(int), len(points) - 2)
    frac = (x - i0)[:, None]
    return np.clip(points[i0] * (1 - frac) + points[i0 + 1] * frac + 0.5, 0, 255).astype(np.uint8)


_LUT = _lookup_table(_TURBO)  # 256 levels: finer than the eye can tell apart in a blend


def colorize(values: np.ndarray) -> np.ndarray:
    """[0, 1] values (any shape) -> uint8 RGB of the Turbo colour map (shape + (3,))."""
    levels = np.rint(np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_LUT) - 1)).astype(np.uint8)
    return _LUT[levels]


def model_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre square that the model sees, in the image's pixels."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def overlay(image: Image.Image, cam: np.ndarray, *, alpha: float = 0.6, max_side: int | None = None) -> Image.Image:
    """The photo with the heatmap alpha-blended over the model's centre square: RGB, the photo's size.

    The map is smoothed (`smooth_upsample`) and per pixel the blend weight grows with it, from 0 (the photo
    uncoloured: swayed the estimate least) to alpha (red: most), so there are no hard edges. `max_side` shrinks the
    photo first (keeping its aspect ratio) when its longer side is larger.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    img = image.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    photo = np.asarray(img, dtype=np.float32)
    left, top, right, bottom = model_box(img.width, img.height)
    values = smooth_upsample(influence(cam), right - left, bottom - top)
    values = (values / values.max() if values.max() > 0 else values).astype(np.float32)  # the peak stays red
    weight = (alpha * values)[..., None]
    out = photo * _OUTSIDE_DIM + _OUTSIDE_GREY * (1 - _OUTSIDE_DIM)
    square = photo[top:bottom, left:right]
    out[top:bottom, left:right] = square * (1 - weight) + colorize(values).astype(np.float32) * weight
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def explain(
    source: ImageSource, prediction: Prediction, *, alpha: float = 0.6, max_side: int | None = None
) -> Image.Image:
    """The heatmap overlay of `prediction` on the photo it was made from (decoded the same way)."""
    if prediction.cam is None:
        raise ValueError(
            "this prediction has no class activation map: the model has no `cam` output; "
            "re-export it with a current `skinscan export`"
        )
    # decode at a reduced scale when only a small overlay is wanted (big JPEGs decode much faster)
    img = decode_image(source, min_side=max_side)
    return overlay(img, prediction.cam, alpha=alpha, max_side=max_side)
