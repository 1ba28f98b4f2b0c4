"""The one preprocessing path: decode -> EXIF orientation -> RGB -> resize -> normalise."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pillow_heif
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import BLUE, GREEN, RED, YELLOW, encode, near, quadrants
from skinscan.errors import InvalidImage
from skinscan.preprocess import (
    DECODE_SIDE_FACTOR,
    MAX_PIXELS,
    PreprocessSpec,
    decode_image,
    disc_mask,
    load_pixels,
    normalise,
    preprocess,
    resize_for_model,
)

pillow_heif.register_heif_opener()  # lets the tests write HEIC (skinscan itself registers the reader)

SPEC = PreprocessSpec()
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def quadrant_colours(img: Image.Image) -> tuple:
    """Colours at the centres of the four quadrants: (top-left, top-right, bottom-left, bottom-right)."""
    w, h = img.size
    return tuple(img.getpixel((x, y)) for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4))


def assert_quadrants(img: Image.Image, expected: tuple, tol: int = 40) -> None:
    got = quadrant_colours(img)
    assert all(near(g, e, tol) for g, e in zip(got, expected, strict=True)), f"quadrants {got} != {expected}"


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (CRC fixed), with the data of an 8x8 image."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ---------------------------------------------------------------- EXIF orientation
# Stored quadrants are TL red, TR green, BL blue, BR yellow; where each lands once displayed upright.
ORIENTATIONS = {
    1: (RED, GREEN, BLUE, YELLOW),
    3: (YELLOW, BLUE, GREEN, RED),  # rotated 180 degrees
    6: (BLUE, RED, YELLOW, GREEN),  # stored row 0 is the visual right side: rotate 90 degrees clockwise
    8: (GREEN, YELLOW, RED, BLUE),  # stored row 0 is the visual left side: rotate 90 degrees anticlockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(quadrants(80, 40), "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).size == (80, 40)

    img = decode_image(data)

    assert img.size == ((40, 80) if orientation in (6, 8) else (80, 40))
    assert_quadrants(img, ORIENTATIONS[orientation])


def test_exif_orientation_survives_reduced_decode() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(quadrants(1600, 1200), "JPEG", quality=90, exif=exif)

    img = decode_image(data, min_side=224)

    assert img.width < img.height, "orientation 6 turns a landscape photo into a portrait"
    assert 224 <= img.width < 1200
    assert_quadrants(img, ORIENTATIONS[6])


# ---------------------------------------------------------------- colour modes
def _palette(colours: list[tuple[int, int, int]]) -> list[int]:
    flat = [c for rgb in colours for c in rgb]
    return flat + [0] * (768 - len(flat))


def _two_halves(mode: str, left, right, size=(16, 8)) -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def _palette_image(transparent: bool) -> Image.Image:
    img = _two_halves("P", 0, 1)
    img.putpalette(_palette([RED, BLUE]))
    if transparent:
        img.info["transparency"] = 1
    return img


# (id, image, format, expected RGB of the left half, expected RGB of the right half)
MODE_CASES = [
    ("L", Image.new("L", (16, 8), 100), "PNG", (100,) * 3, (100,) * 3),
    ("1", _two_halves("1", 0, 1), "PNG", BLACK, WHITE),
    ("1-bmp", _two_halves("1", 1, 0), "BMP", WHITE, BLACK),
    ("P", _palette_image(transparent=False), "PNG", RED, BLUE),
    ("P-transparency", _palette_image(transparent=True), "PNG", RED, WHITE),  # transparent -> white
    ("RGBA", _two_halves("RGBA", (*RED, 255), (0, 0, 255, 0)), "PNG", RED, WHITE),
    ("RGBA-half-alpha", _two_halves("RGBA", (0, 0, 0, 128), (0, 0, 0, 0)), "PNG", (127,) * 3, WHITE),
    ("RGBA-webp", _two_halves("RGBA", (*GREEN, 255), (0, 0, 0, 0)), "WEBP", GREEN, WHITE),
    ("LA", _two_halves("LA", (50, 255), (0, 0)), "PNG", (50,) * 3, WHITE),
    ("CMYK-jpeg", _two_halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 0)), "JPEG", (255, 0, 0), WHITE),
    ("CMYK-tiff", _two_halves("CMYK", (255, 0, 255, 0), (0, 0, 0, 255)), "TIFF", (0, 255, 0), BLACK),
]


@pytest.mark.parametrize(("image", "fmt", "left", "right"), [c[1:] for c in MODE_CASES], ids=[c[0] for c in MODE_CASES])
def test_every_colour_mode_becomes_rgb(image: Image.Image, fmt: str, left, right) -> None:
    data = encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).mode == image.mode, "the file must keep the mode under test"

    img = decode_image(data)

    assert img.mode == "RGB"
    assert img.size == image.size
    tol = 12 if fmt == "JPEG" else 2
    assert near(img.getpixel((2, 4)), left, tol), img.getpixel((2, 4))
    assert near(img.getpixel((13, 4)), right, tol), img.getpixel((13, 4))


def _grey_row(img: Image.Image) -> list[int]:
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all(), "grey input stays grey"
    return arr[0, :, 0].tolist()


def test_16_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")

    grey = _grey_row(decode_image(data))

    # clipping would turn 256 and 32768 into 255
    assert grey[0] == 0
    assert grey[1] <= 2
    assert abs(grey[2] - 128) <= 1
    assert grey[3] == 255


def test_dark_16_bit_image_stays_dark() -> None:
    # a 16-bit file whose values are all below 256 is a very dark photo, not an 8-bit one
    data = encode(Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint16)), "PNG")
    assert max(_grey_row(decode_image(data))) <= 2


def test_32_bit_integer_tiff_is_scaled() -> None:
    data = encode(Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"

    grey = _grey_row(decode_image(data))

    assert grey[0] == 0 and abs(grey[1] - 128) <= 1 and grey[2] == 255


def test_float_tiff_in_unit_range_is_scaled() -> None:
    data = encode(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"

    grey = _grey_row(decode_image(data))

    assert grey[0] == 0 and abs(grey[1] - 128) <= 1 and grey[2] == 255


# ---------------------------------------------------------------- accepted formats
FORMATS = [
    ("JPEG", ".jpg", {"quality": 95}, 40),
    ("PNG", ".png", {}, 0),
    ("WEBP", ".webp", {"lossless": True}, 0),
    ("BMP", ".bmp", {}, 0),
    ("TIFF", ".tiff", {}, 0),
    ("HEIF", ".heic", {"quality": 90}, 40),
]


@pytest.mark.parametrize(("fmt", "suffix", "params", "tol"), FORMATS, ids=[f[0] for f in FORMATS])
def test_every_accepted_format_round_trips(write_image, fmt: str, suffix: str, params: dict, tol: int) -> None:
    original = quadrants(64, 48)
    path = write_image(f"photo{suffix}", original, fmt, **params)
    data = path.read_bytes()
    assert Image.open(io.BytesIO(data)).format == fmt

    from_bytes = decode_image(data)
    from_path = decode_image(path)

    for img in (from_bytes, from_path):
        assert img.mode == "RGB"
        assert img.size == (64, 48)
        assert_quadrants(img, (RED, GREEN, BLUE, YELLOW), tol)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_path))
    if tol == 0:
        assert np.array_equal(np.asarray(from_bytes), np.asarray(original))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("fmt", ["GIF", "ICO", "TGA"])
def test_unsupported_format_is_refused(fmt: str) -> None:
    data = encode(quadrants(32, 32), fmt)
    with pytest.raises(InvalidImage, match=fmt):
        decode_image(data)


@pytest.mark.parametrize(
    "data",
    [b"this is a text file, not a photo\n" * 20, b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", b"\x00" * 1000],
    ids=["text", "pdf-header", "zeros"],
)
def test_not_an_image_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidImage, match="not an image"):
        decode_image(data)


@pytest.mark.parametrize("empty", [b"", bytearray(), io.BytesIO()], ids=["bytes", "bytearray", "file"])
def test_empty_input_is_refused(empty) -> None:
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(empty)


def test_empty_file_and_missing_file_are_refused(tmp_path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(tmp_path / "empty.jpg")
    with pytest.raises(InvalidImage, match="no such file"):
        decode_image(tmp_path / "missing.jpg")
    with pytest.raises(InvalidImage, match="no such file"):
        decode_image(str(tmp_path))  # a folder is not an image file


def _noisy(width: int = 256, height: int = 192) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_truncated_jpeg_is_refused() -> None:
    data = encode(_noisy(), "JPEG", quality=90)
    decode_image(data)  # the whole file is fine

    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(("fmt", "params"), [(f[0], f[2]) for f in FORMATS], ids=[f[0] for f in FORMATS])
def test_truncated_file_of_every_format_is_refused(fmt: str, params: dict) -> None:
    data = encode(_noisy(64, 48), fmt, **params)
    for cut in (len(data) // 10, len(data) // 2, len(data) * 9 // 10):
        with pytest.raises(InvalidImage):
            decode_image(data[:cut])


def _heif_boxes(data: bytes) -> dict[str, int]:
    """Offsets of the top-level boxes of an ISO-BMFF (HEIF) file."""
    boxes, i = {}, 0
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        boxes[kind.decode("latin-1")] = i
        if size < 8:
            break
        i += size
    return boxes


@pytest.mark.filterwarnings("ignore")
def test_damaged_heic_header_raises_invalid_image_only() -> None:
    """Any single damaged byte in a HEIC's header gives InvalidImage (or still decodes), never another error.

    Damage to the item location table (iloc) makes pillow-heif raise EOFError, which must not escape:
    `skinscan predict` only turns InvalidImage into an error row, so any other type stops the whole run.
    """
    data = encode(_noisy(64, 48), "HEIF", quality=90)
    header_end = _heif_boxes(data)["mdat"]
    escaped = set()
    for pos in range(header_end):
        for value in (0x00, 0xFF, data[pos] ^ 0x01, data[pos] ^ 0x80):
            damaged = bytearray(data)
            damaged[pos] = value
            try:
                decode_image(bytes(damaged))
            except InvalidImage:
                pass
            except Exception as exc:
                escaped.add(f"byte {pos}={value:#04x}: {type(exc).__name__}: {exc}")
    assert not escaped, f"{len(escaped)} damaged HEIC files raised a non-InvalidImage error, e.g. {sorted(escaped)[:3]}"


def test_heic_claiming_huge_size_is_refused() -> None:
    data = bytearray(encode(quadrants(64, 48), "HEIF"))
    i = data.index(b"ispe")  # image spatial extents: version/flags, then width and height
    data[i + 8 : i + 16] = struct.pack(">II", 40_000, 40_000)

    with pytest.raises(InvalidImage):
        decode_image(bytes(data))


# ---------------------------------------------------------------- pixel limits
def test_pixel_limit_is_inclusive_and_refuses_larger_images() -> None:
    data = encode(Image.new("RGB", (100, 50), RED), "PNG")

    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(InvalidImage, match="pixels") as info:
        decode_image(data, max_pixels=4999)
    assert "5,000" in str(info.value) and "4,999" in str(info.value), "the message says the size and the limit"


def test_pixel_limit_refuses_before_decoding() -> None:
    # the header claims 5000x5000 but there is no pixel data: refused for its size, not as damaged
    with pytest.raises(InvalidImage, match="pixels, more than the limit"):
        decode_image(png_claiming(5000, 5000), max_pixels=1_000_000)


def test_decompression_bomb_header_is_refused() -> None:
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(png_claiming(30_000, 30_000))


def test_highly_compressible_bomb_is_refused() -> None:
    width = height = 20_000  # 400 MP of zeros compress to ~50 kB
    assert width * height > MAX_PIXELS
    data = encode(Image.new("1", (width, height)), "PNG")
    assert len(data) < 200_000

    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(data)
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(data, max_pixels=10_000_000)


# ---------------------------------------------------------------- reduced decode of large JPEGs
@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(quadrants(4000, 3000), "JPEG", quality=90)


def test_large_jpeg_is_decoded_reduced(large_jpeg: bytes) -> None:
    full = decode_image(large_jpeg)
    reduced = decode_image(large_jpeg, min_side=224)

    assert full.size == (4000, 3000)
    assert reduced.width < 4000 / 2 and reduced.height < 3000 / 2, "draft should cut the decode at least 2x"
    assert min(reduced.size) >= 224
    assert reduced.width / reduced.height == pytest.approx(4 / 3, rel=0.01)
    assert_quadrants(reduced, (RED, GREEN, BLUE, YELLOW))


@pytest.mark.parametrize("min_side", [224, 500, 1000, 2999])
def test_reduced_decode_keeps_shorter_side(large_jpeg: bytes, min_side: int) -> None:
    assert min(decode_image(large_jpeg, min_side=min_side).size) >= min_side


@pytest.mark.parametrize("width,height", [(800, 600), (896, 1195), (1791, 1343)])
def test_load_pixels_reduces_only_what_stays_above_the_decode_bound(width: int, height: int) -> None:
    # a JPEG that 1/2 would take below DECODE_SIDE_FACTOR x the model's size (448-896 px phone photos) gets one resize, the
    # antialiased one to the model's size: what the web page's graph does with the same decoded pixels
    data = encode(quadrants(width, height), "JPEG", quality=90)
    assert np.array_equal(load_pixels(data, SPEC), resize_for_model(decode_image(data), SPEC))


def test_load_pixels_drafts_a_large_jpeg_to_the_bound(large_jpeg: bytes) -> None:
    drafted = decode_image(large_jpeg, min_side=DECODE_SIDE_FACTOR * SPEC.size)
    assert drafted.size == (2000, 1500)  # 1/2: 1/4 would take the shorter side below 4 x 224
    assert np.array_equal(load_pixels(large_jpeg, SPEC), resize_for_model(drafted, SPEC))


def test_small_image_is_never_upscaled_by_decode() -> None:
    img = decode_image(encode(quadrants(167, 120), "JPEG"), min_side=224)
    assert img.size == (167, 120)


# ---------------------------------------------------------------- resize, normalise, preprocess
def test_resize_centre_crops_a_landscape_photo() -> None:
    # 4:3 frame: blue background, red marker in the centre, green stripes at the edges that the crop removes
    img = Image.new("RGB", (400, 300), BLUE)
    img.paste(RED, (190, 140, 210, 160))
    img.paste(GREEN, (0, 0, 40, 300))
    img.paste(GREEN, (360, 0, 400, 300))

    out = resize_for_model(img, SPEC)

    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert near(out[112, 112], RED, 10)
    for y, x in [(5, 5), (5, 218), (218, 5), (218, 218)]:
        assert near(out[y, x], BLUE, 10)
    greenish = (out[..., 1] > 120) & (out[..., 0] < 100) & (out[..., 2] < 100)
    assert not greenish.any(), "the side stripes must be cropped away"
    red = np.argwhere((out[..., 0] > 150) & (out[..., 2] < 100))
    assert np.allclose(red.mean(axis=0), (111.5, 111.5), atol=1.5), "the marker stays in the centre"


def test_resize_centre_crops_a_portrait_photo() -> None:
    img = Image.new("RGB", (300, 400), BLUE)
    img.paste(RED, (140, 190, 160, 210))
    img.paste(GREEN, (0, 0, 300, 40))
    img.paste(GREEN, (0, 360, 300, 400))

    out = resize_for_model(img, SPEC)

    assert out.shape == (224, 224, 3)
    assert near(out[112, 112], RED, 10)
    assert not ((out[..., 1] > 120) & (out[..., 0] < 100) & (out[..., 2] < 100)).any()


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    size=st.sampled_from([64, 224, 256]),
    interpolation=st.sampled_from(["bilinear", "bicubic"]),
)
def test_resize_always_gives_the_model_size(width: int, height: int, size: int, interpolation: str) -> None:
    out = resize_for_model(
        Image.new("RGB", (width, height), (10, 20, 30)), PreprocessSpec(size=size, interpolation=interpolation)
    )
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert near(out[size // 2, size // 2], (10, 20, 30), 1)


def test_resize_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="resize"):
        resize_for_model(quadrants(), PreprocessSpec(resize="stretch"))


def test_preprocess_output_shape_dtype_and_range() -> None:
    # 50-px blocks of saturated colours: resizing blends only their edges, so the extremes survive
    blocks = np.random.default_rng(1).choice([0, 255], size=(6, 8, 3)).astype(np.uint8)
    photo = Image.fromarray(np.kron(blocks, np.ones((50, 50, 1), dtype=np.uint8)))

    x = preprocess(encode(photo, "PNG"), SPEC)

    assert x.shape == (3, 224, 224)
    assert x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() == 1.0, "pure black and white reach the ends of the range"


@pytest.mark.parametrize(
    ("colour", "expected"), [(WHITE, (1, 1, 1)), (BLACK, (-1, -1, -1)), ((255, 0, 0), (1, -1, -1))]
)
def test_preprocess_normalises_with_mean_std_half_in_rgb_chw_order(colour, expected) -> None:
    x = preprocess(Image.new("RGB", (50, 40), colour), SPEC)
    for channel, value in enumerate(expected):
        assert np.allclose(x[channel], value), f"channel {channel}"


def test_normalise_batch_is_nchw_and_uses_the_spec() -> None:
    spec = PreprocessSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)

    out = normalise(batch, spec)

    assert out.shape == (4, 3, 8, 8) and out.dtype == np.float32
    for c in range(3):
        expected = (batch[..., c] / 255.0 - spec.mean[c]) / spec.std[c]
        assert np.allclose(out[:, c], expected, atol=1e-5)


def test_disc_mask_blackens_the_corners_and_colour_constancy_weighs_only_the_disc() -> None:
    spec = PreprocessSpec(size=64, color_constancy="shades-of-gray", mask="disc")
    inside = disc_mask(64).astype(bool)
    assert 0.75 < inside.mean() < 0.80  # pi / 4 of the square
    assert inside[32, 32] and inside[0, 32] and inside[32, 0] and not inside[0, 0] and not inside[63, 63]
    photo = np.random.default_rng(3).integers(60, 200, (64, 64, 3), dtype=np.uint8)
    red_corners, green_corners = photo.copy(), photo.copy()
    red_corners[~inside] = (255, 0, 0)
    green_corners[~inside] = (0, 255, 0)

    out_red, out_green = normalise(red_corners, spec), normalise(green_corners, spec)

    assert np.all(out_red[:, ~inside] == -1.0)  # black, whatever was there
    np.testing.assert_array_equal(out_red, out_green)  # the corners change nothing, Shades of Gray's gains included
    unmasked = PreprocessSpec(size=64, color_constancy="shades-of-gray")
    assert not np.allclose(normalise(red_corners, unmasked)[:, inside], normalise(green_corners, unmasked)[:, inside])
    batch = normalise(np.stack([red_corners, green_corners]), spec)
    np.testing.assert_array_equal(batch[0], out_red)
    with pytest.raises(ValueError, match="unknown mask"):
        normalise(photo, PreprocessSpec(size=64, mask="oval"))


def test_every_source_type_gives_identical_arrays(write_image) -> None:
    path = write_image("photo.jpg", _noisy(320, 240), quality=92)
    data = path.read_bytes()

    reference = preprocess(path, SPEC)
    for source in (str(path), data, bytearray(data), memoryview(data), io.BytesIO(data), Image.open(path)):
        assert np.array_equal(preprocess(source, SPEC), reference), type(source).__name__
    assert np.array_equal(load_pixels(data, SPEC), load_pixels(path, SPEC))


# ---------------------------------------------------------------- the spec the model card records
def test_spec_round_trips_through_dict_and_json() -> None:
    spec = PreprocessSpec(size=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic")

    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert PreprocessSpec.from_dict(PreprocessSpec().to_dict()) == PreprocessSpec()
    masked = PreprocessSpec(color_constancy="shades-of-gray", mask="disc")
    assert PreprocessSpec.from_dict(json.loads(json.dumps(masked.to_dict()))) == masked


def test_spec_from_dict_fills_optional_fields_with_defaults() -> None:
    spec = PreprocessSpec.from_dict({"size": "300", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    assert spec.size == 300
    assert spec.std == (0.25, 0.25, 0.25)
    assert spec.resize == PreprocessSpec().resize
    assert spec.interpolation == PreprocessSpec().interpolation
    assert spec.mask == "none"  # cards written before the mask existed
