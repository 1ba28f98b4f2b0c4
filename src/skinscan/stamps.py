"""The marks sources leave on their photos, cut from real photos of the shared datasets at run time.

`build_stamps(data_root)` returns each stamp as an RGBA image for `skinscan.shortcuts` (which pastes it where
its source puts it, `shortcuts.PLACEMENTS`). They are cut each time from the datasets (seconds) rather than
committed: no pixel of a dataset image enters the repository. Crop boxes are in the photo's own pixels
(left, top, right, bottom).

- dermnet-logo: DermNet NZ's logo ("DermNet(TM) All about the skin"), bottom left of every DermNet photo (the
  mean of all 1486 DermNet images shows it at this same place), cut from a photo with a near-black
  background behind it, so its brightness is its opacity: white, alpha = (luma - bg) / (255 - bg), bg = the
  median of the crop's 2-px border; alpha under 0.06 set to 0.
- sfs-text: the white "SFS" in the bottom-left corner of many Fitzpatrick17k (DermaAmin) photos, on a dark
  background; bg = a 7x7 grey opening of the crop (the background without the 2-4 px strokes); alpha
  under 0.15 set to 0.
- ruler: the white ruler with black ticks along the bottom edge of some ISIC archive (pre-2019) dermoscopic
  photos (found by ranking isic-archive-more by periodic ticks along the edges), kept opaque.
- ink-circle: a purple surgical-ink circle drawn around a mole in a phone photo (PAD-UFES-20). Ink = PIL hue
  150-230 and saturation > 30; skin and the lesion inside are transparent. Pasted in multiply mode: RGB =
  the ink's transmittance, alpha = each pixel's darkening projected on the ink's, blurred by 1 px.
- vignette: a dermatoscope's round field of view, drawn (no photo): black, alpha 0 inside 0.92 of the half
  side, a smoothstep up to 0.97 at 1.12 of it (corners near black, centre untouched), multiply mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

# (dataset-relative file, crop box (left, top, right, bottom) in that photo's pixels)
DERMNET_LOGO = ("clinical-atlas/images/dermnet-nz/actinic_keratosis-5f0099f14eaef4c1.jpg", (24, 144, 86, 199))
SFS_TEXT = ("clinical-atlas/images/fitzpatrick17k/scc-22bd8aa5373f1091456b7f40af1ce786.jpg", (8, 233, 46, 254))
RULER = ("isic-archive-more/images/ISIC_0015144.jpg", (0, 203, 224, 224))
INK_CIRCLE = ("pad-ufes-20-phone/images/PAT_2080_4484_997.jpg", (170, 210, 600, 550))
# the photos the marks are cut from: `skinscan pack` keeps them as they are, so a run on the pack cuts the same marks
SOURCE_PHOTOS = tuple(rel for rel, _ in (DERMNET_LOGO, SFS_TEXT, RULER, INK_CIRCLE))
INK_WIDTH = 128  # the ink circle is stored at this width (px): pasting rescales it anyway
VIGNETTE_SIZE = 128


def _crop(root: Path, spec: tuple[str, tuple[int, int, int, int]]) -> tuple[np.ndarray, tuple[int, int]]:
    rel, box = spec
    with Image.open(root / rel) as im:
        return np.asarray(im.convert("RGB").crop(box), dtype=np.float32), im.size


def _white_on(luma: np.ndarray, background: np.ndarray | float, floor: float) -> Image.Image:
    """White with the opacity that turns `background` into the observed `luma`: luma = a*255 + (1-a)*bg."""
    alpha = np.clip((luma - background) / np.maximum(255.0 - background, 1.0), 0.0, 1.0)
    alpha[alpha < floor] = 0.0  # JPEG noise on the background
    rgba = np.empty((*luma.shape, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = np.round(alpha * 255)
    return Image.fromarray(rgba, "RGBA")


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def dermnet_logo(root: Path) -> Image.Image:
    rgb, _ = _crop(root, DERMNET_LOGO)
    luma = _luma(rgb)
    border = np.concatenate([luma[:2].ravel(), luma[-2:].ravel(), luma[:, :2].ravel(), luma[:, -2:].ravel()])
    return _white_on(luma, float(np.median(border)), floor=0.06)


def sfs_text(root: Path) -> Image.Image:
    rgb, _ = _crop(root, SFS_TEXT)
    luma = _luma(rgb)
    background = ndimage.grey_opening(luma, size=(7, 7))  # strokes are 2-4 px wide: the opening drops them
    return _white_on(luma, background, floor=0.15)


def ruler(root: Path) -> Image.Image:
    rgb, _ = _crop(root, RULER)
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.float32)], axis=-1)
    return Image.fromarray(np.round(rgba).astype(np.uint8), "RGBA")


def ink_circle(root: Path) -> Image.Image:
    """Multiply-mode stamp: RGB = the ink's transmittance (observed / skin), alpha = how much ink.

    Ink pixels: PIL hue 150-230 (blue to purple) and saturation > 30; everything else (skin, the orange-brown
    lesion inside the circle) is transparent. The skin colour is the median of the non-ink pixels."""
    rgb, _ = _crop(root, INK_CIRCLE)
    hsv = np.asarray(Image.fromarray(rgb.astype(np.uint8)).convert("HSV"), dtype=np.int32)
    ink = (hsv[..., 0] > 150) & (hsv[..., 0] < 230) & (hsv[..., 1] > 30)
    skin = np.median(rgb[~ink], axis=0)
    darkening = np.clip(1.0 - rgb / skin, 0.0, 1.0)  # per channel: what the ink took away
    strong = ink & (darkening.mean(-1) >= np.quantile(darkening.mean(-1)[ink], 0.8))
    filter_dark = darkening[strong].mean(0)  # the ink's full darkening (its densest fifth)
    amount = np.clip(darkening @ filter_dark / float(filter_dark @ filter_dark), 0.0, 1.0) * ink
    amount = ndimage.gaussian_filter(amount, 1.0)  # soften the hue rule's hard edge
    rgba = np.empty((*amount.shape, 4), np.float32)
    rgba[..., :3] = (1.0 - filter_dark) * 255
    rgba[..., 3] = amount * 255
    img = Image.fromarray(np.round(rgba).astype(np.uint8), "RGBA")
    height = round(img.height * INK_WIDTH / img.width)
    return img.resize((INK_WIDTH, height), Image.LANCZOS)


def vignette() -> Image.Image:
    """Black; alpha 0 inside 0.92 of the half side, rising smoothly to 0.97 at the square's inscribed
    circle plus 12% (corners are near black, the centre untouched)."""
    n = VIGNETTE_SIZE
    c = (np.arange(n) + 0.5) / n * 2 - 1  # -1..1 across the square
    r = np.hypot(*np.meshgrid(c, c))
    t = np.clip((r - 0.92) / (1.12 - 0.92), 0.0, 1.0)
    alpha = 0.97 * t * t * (3 - 2 * t)  # smoothstep
    rgba = np.zeros((n, n, 4), np.uint8)
    rgba[..., 3] = np.round(alpha * 255)
    return Image.fromarray(rgba, "RGBA")


def build_stamps(data_root: str | Path) -> dict[str, Image.Image]:
    """Every stamp of `shortcuts.PLACEMENTS`, cut from the datasets under `data_root` (the vignette drawn)."""
    from .errors import SkinscanError

    root = Path(data_root)
    missing = [rel for rel in SOURCE_PHOTOS if not (root / rel).is_file()]
    if missing:
        raise SkinscanError(f"{root}: the stamps are cut from photos that are missing there ({', '.join(missing)})")
    return {
        "dermnet-logo": dermnet_logo(root),
        "sfs-text": sfs_text(root),
        "ruler": ruler(root),
        "ink-circle": ink_circle(root),
        "vignette": vignette(),
    }
