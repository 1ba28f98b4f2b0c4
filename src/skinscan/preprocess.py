"""THE image preprocessing: decode -> EXIF orientation -> RGB -> resize -> normalise.

Training, evaluation, export checks and prediction all call these functions; the parameters come
from a `PreprocessSpec`, which the model card records and the Predictor reads back from the model.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InvalidImage

try:  # phones save HEIC; pillow-heif teaches Pillow to read it
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - pillow-heif is a core dependency
    HEIF_SUPPORTED = False

# Phones take 108-200 MP photos; anything above this is refused as a likely decompression bomb.
MAX_PIXELS = 250_000_000
# Pillow's own guard must not fire below our limit (it warns at 1x and raises at 2x its setting).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "HEIF", "MPO")
# A decoded photo's shorter side, in multiples of the model's input size: a large JPEG decodes at a reduced
# scale (Pillow's draft, DCT scaling) that keeps it at least this long, and the web page's decoder bounds it
# to at most this long (web/private.js `boundedSize`). A photo up to this size is never reduced before the
# one antialiased resize to the model's size (Pillow here and in training, the `before` graph in the page):
# DCT scaling and the browser's resize differ enough at small sizes to flip decisions at the threshold.
DECODE_SIDE_FACTOR = 4
ImageSource = bytes | bytearray | memoryview | str | Path | BinaryIO | Image.Image


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels reach the network. Stored in the model card; never re-typed elsewhere."""

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "shorter-side-then-center-crop"
    interpolation: str = "bilinear"
    color_constancy: str = "none"  # or "shades-of-gray"
    mask: str = "none"  # or "disc": black outside the square's inscribed circle (`disc_mask`)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        return cls(
            size=int(d["size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize=str(d.get("resize", cls.resize)),
            interpolation=str(d.get("interpolation", cls.interpolation)),
            color_constancy=str(d.get("color_constancy", cls.color_constancy)),
            mask=str(d.get("mask", cls.mask)),
        )


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImage(f"{path}: no such file")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = source.read()
    if not data:
        raise InvalidImage("empty input (0 bytes): send the photo's file content")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage(f"image has more than {MAX_PIXELS:,} pixels: refused as a decompression bomb") from None
    except UnidentifiedImageError:
        raise InvalidImage(
            "not an image, or a format skinscan does not read (accepted: JPEG, PNG, WebP, BMP, TIFF, HEIC/HEIF)"
        ) from None
    except OSError as exc:
        raise InvalidImage(f"cannot read the image: {exc}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: scale to 8 bits instead of letting Pillow clip at 255.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(source: ImageSource, *, min_side: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode any accepted image to an upright RGB `PIL.Image`.

    `min_side` lets large JPEGs decode at a reduced scale (Pillow's `draft`) while keeping the
    shorter side at least that long. Raises `InvalidImage` with a readable message on bad input.
    """
    img = _open(source)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage("image has zero width or height")
    if width * height > max_pixels:
        raise InvalidImage(
            f"image has {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}"
        )
    if img.format not in ACCEPTED_FORMATS and not isinstance(source, Image.Image):
        raise InvalidImage(f"{img.format} images are not accepted (accepted: JPEG, PNG, WebP, BMP, TIFF, HEIC/HEIF)")
    try:
        if min_side and img.format in ("JPEG", "MPO"):
            # draft keeps both sides >= the requested box: ask for the box that keeps the shorter side >= min_side
            scale = min_side / min(width, height)
            img.draft("RGB", (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError, MemoryError) as exc:
        # Pillow raises OSError/SyntaxError/ValueError; pillow-heif EOFError and RuntimeError (its limits)
        raise InvalidImage(f"the image data is damaged or truncated ({exc})") from None


def resize_for_model(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side to `spec.size`, then centre-crop a square: uint8 array (size, size, 3)."""
    if spec.resize != "shorter-side-then-center-crop":
        raise ValueError(f"unknown resize mode {spec.resize!r}")
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[spec.interpolation]
    w, h = img.size
    scale = spec.size / min(w, h)
    nw, nh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    img = img.crop((left, top, left + spec.size, top + spec.size))
    return np.asarray(img, dtype=np.uint8)


def shades_of_gray(pixels: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004) on uint8 HWC or NHWC pixels.

    Estimates the illuminant per image as the Minkowski p-norm mean of each channel and rescales the
    channels so that the illuminant becomes neutral grey: a phone's white balance stops mattering.
    Returns float32 pixels in [0, 255].
    """
    x = pixels.astype(np.float32)
    return np.clip(x * _sog_gains(pixels, power)[..., None, None, :], 0.0, 255.0)


def _sog_gains(pixels: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Shades-of-Gray's per-channel gains, (..., 3) float32 for (..., H, W, 3) pixels. For uint8 pixels the
    p-norm mean comes from each channel's histogram (exact sums in float64; no (N, H, W, 3) power array)."""
    if pixels.dtype == np.uint8:
        lead = pixels.shape[:-3]
        flat = pixels.reshape(-1, pixels.shape[-3] * pixels.shape[-2], 3)
        levels = np.arange(256, dtype=np.float64) ** power
        sums = np.array([[levels @ np.bincount(img[:, c], minlength=256) for c in range(3)] for img in flat])
        mean_power = (sums / flat.shape[1]).reshape(*lead, 3)
    else:
        mean_power = np.mean(np.power(pixels.astype(np.float64), power), axis=(-3, -2))
    illuminant = np.maximum(mean_power ** (1.0 / power), 1e-3).astype(np.float32)
    return illuminant.mean(axis=-1, keepdims=True) / illuminant


def disc_mask(size: int) -> np.ndarray:
    """uint8 (size, size): 1 on the pixels whose centre lies inside the square's inscribed circle, else 0.

    With `PreprocessSpec.mask == "disc"` the network sees black corners on every photo: a dermatoscope's
    vignette or a corner stamp cannot tell it anything there (the corners hold 21% of the square).
    """
    c = np.arange(size, dtype=np.float64) + 0.5 - size / 2
    return (np.add.outer(c * c, c * c) <= (size / 2) ** 2).astype(np.uint8)


def normalise(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC (or NHWC) RGB -> float32 CHW (or NCHW): the mask, colour constancy if the spec asks, then
    scaling. The mask blackens before colour constancy, so Shades of Gray weighs the disc only (black adds
    nothing to its p-norm sums and the pixel count cancels in its gains).

    Training calls this after augmentation, prediction right after `load_pixels`: the same code path.
    Per image and channel the result depends only on the pixel's 8-bit value, so it is computed once per
    value (256 per channel: gain, clip to [0, 255], minus mean, over std) and looked up for every pixel.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"normalise takes uint8 pixels, not {pixels.dtype}")
    single = pixels.ndim == 3
    batch = pixels[None] if single else pixels
    n = batch.shape[0]
    if spec.mask == "disc":
        batch = batch * disc_mask(batch.shape[1])[None, :, :, None]
    elif spec.mask != "none":
        raise ValueError(f"unknown mask {spec.mask!r}")
    if spec.color_constancy == "shades-of-gray":
        gains = _sog_gains(batch)  # (N, 3)
    elif spec.color_constancy == "none":
        gains = None
    else:
        raise ValueError(f"unknown colour constancy {spec.color_constancy!r}")
    mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
    std = np.asarray(spec.std, dtype=np.float32) * 255.0
    values = np.arange(256, dtype=np.float32)
    scaled = values[None, None, :] if gains is None else np.clip(values[None, None, :] * gains[:, :, None], 0.0, 255.0)
    tables = (np.broadcast_to(scaled, (n, 3, 256)) - mean[None, :, None]) / std[None, :, None]  # (N, 3, 256)
    out = np.empty((n, 3, *batch.shape[1:3]), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            np.take(tables[i, c], batch[i, :, :, c], out=out[i, c])
    return out[0] if single else out


def load_pixels(source: ImageSource, spec: PreprocessSpec) -> np.ndarray:
    """Decode and resize: the uint8 (size, size, 3) array that augmentation or `normalise` takes. A large
    JPEG decodes reduced, never below `DECODE_SIDE_FACTOR` x the model's size on its shorter side."""
    return resize_for_model(decode_image(source, min_side=DECODE_SIDE_FACTOR * spec.size), spec)


def preprocess(source: ImageSource, spec: PreprocessSpec) -> np.ndarray:
    """Bytes/path/image -> float32 (3, size, size) network input."""
    return normalise(load_pixels(source, spec), spec)
