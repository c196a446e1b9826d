"""detector.io.preprocess: every decode case and every ImageError code.

All images are made here, in memory, with Pillow and numpy; nothing is read from disk.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from detector.io.preprocess import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    ImageError,
    ImageInfo,
    load_image,
    open_image,
)

pytestmark = pytest.mark.unit

CODES = {"empty", "not-an-image", "unsupported-format", "too-large", "truncated", "corrupt"}
RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255,) * 3
ORIENTATION = 0x0112

# Pillow warns (UserWarning) about the malformed metadata some tests feed it on purpose.
quiet_pillow = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def bands(width: int, height: int, colours, vertical: bool = True) -> np.ndarray:
    """Equal bands of `colours`, left to right (or top to bottom when not `vertical`)."""
    a = np.zeros((height, width, 3), np.uint8)
    n = len(colours)
    for i, colour in enumerate(colours):
        if vertical:
            a[:, i * width // n : (i + 1) * width // n] = colour
        else:
            a[i * height // n : (i + 1) * height // n, :] = colour
    return a


def textured(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth photo-like content (no flat colour, no pixel noise that would alias)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def close(pixel, colour, tol: int = 40) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour, int)) <= tol))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def tiff_ifd(*entries: tuple[int, int, int, bytes]) -> bytes:
    """A little-endian TIFF/EXIF block with one IFD of (tag, type, count, 4-byte value)."""
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, typ, count, value in sorted(entries):
        out += struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\0")
    return out + struct.pack("<I", 0)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def handmade_png(width: int, height: int, idat: bytes) -> bytes:
    """An RGB 8-bit PNG with a valid IHDR claiming width x height and the given IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def expect_error(data: bytes, code: str | set[str], size: int = 32, **limits) -> ImageError:
    codes = {code} if isinstance(code, str) else code
    with pytest.raises(ImageError) as caught:
        load_image(data, size, **limits)
    assert caught.value.code in codes, caught.value
    assert caught.value.detail
    return caught.value


@pytest.fixture
def no_decode(monkeypatch):
    """Fail the test if any pixel data is decoded."""

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("fmt", "params", "tol"),
    [
        ("JPEG", {"quality": 95}, 4.0),
        ("PNG", {}, 0.5),
        ("WEBP", {"lossless": True}, 0.5),
        ("WEBP", {"quality": 90}, 6.0),
        ("GIF", {}, 12.0),  # 256-colour palette
        ("BMP", {}, 0.5),
        ("TIFF", {}, 0.5),
        ("TIFF", {"compression": "tiff_deflate"}, 0.5),
        # What phones and newer tools upload, written by the libraries that write them.
        ("HEIF", {"quality": 90}, 8.0),  # pillow-heif (libheif + x265): an iPhone's HEIC
        ("AVIF", {"quality": 90}, 8.0),  # Pillow's own (libavif)
        ("JXL", {"lossless": True}, 0.5),  # pillow-jxl-plugin
        ("JPEG2000", {}, 0.5),
    ],
)
def test_each_supported_format_decodes_to_model_pixels(fmt, params, tol):
    from detector.io.preprocess import register_formats

    register_formats()  # the encoders too (pillow-heif, pillow-jxl-plugin)
    source = textured(96, 64)
    out, info = load_image(encode(Image.fromarray(source), fmt, **params), 48)
    assert out.shape == (48, 48, 3)
    assert out.dtype == np.uint8
    assert info == ImageInfo(format=fmt, width=96, height=64)
    # Same geometry as the lossless reference: shorter side to 48, centre square.
    reference, _ = load_image(encode(Image.fromarray(source), "PNG"), 48)
    assert mean_abs_diff(out, reference) <= tol


def test_mpo_is_accepted_and_gives_the_first_frame():
    frames = [Image.fromarray(bands(64, 48, [RED])), Image.fromarray(bands(64, 48, [BLUE]))]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    out, info = load_image(data, 16)
    assert info == ImageInfo("MPO", 64, 48)
    assert close(out.reshape(-1, 3).mean(0), RED, 10)


def test_apng_gives_the_first_frame():
    frames = [Image.fromarray(bands(64, 48, [RED])), Image.fromarray(bands(64, 48, [BLUE]))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out, info = load_image(data, 16)
    assert info == ImageInfo("PNG", 64, 48)
    assert close(out.reshape(-1, 3).mean(0), RED, 10)


def test_heic_orientation_and_pixel_limit_apply_before_decoding():
    """An iPhone HEIC rotated by its EXIF is scored upright; one over the pixel limit is
    refused from its header, as every format is."""
    from detector.io.preprocess import register_formats

    register_formats()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(textured(96, 64)), "HEIF", exif=exif.tobytes())
    _, info = load_image(data, 16)
    assert info == ImageInfo("HEIF", 64, 96)
    with pytest.raises(ImageError) as refused:
        load_image(data, 16, max_pixels=96 * 64 - 1)
    assert refused.value.code == "too-large"


@pytest.mark.parametrize("size", [1, 7, 224, 299])
def test_any_output_size(size):
    out, _ = load_image(encode(Image.fromarray(textured(320, 240)), "JPEG"), size)
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8


def test_same_bytes_give_the_same_pixels():
    data = encode(Image.fromarray(textured(640, 480, seed=3)), "JPEG")
    first, _ = load_image(data, 224)
    second, _ = load_image(data, 224)
    assert np.array_equal(first, second)


# --------------------------------------------------------------------------- geometry


def test_image_already_at_size_passes_through_pixel_identical():
    noise = np.random.default_rng(7).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out, info = load_image(encode(Image.fromarray(noise), "PNG"), 224)
    assert info == ImageInfo("PNG", 224, 224)
    assert np.array_equal(out, noise)


def test_landscape_keeps_aspect_ratio_by_centre_crop():
    # 400x200: the centre square is x in [100, 300), i.e. the green and blue bands only.
    source = bands(400, 200, [RED, GREEN, BLUE, YELLOW])
    out, info = load_image(encode(Image.fromarray(source), "PNG"), 100)
    assert (info.width, info.height) == (400, 200)
    assert close(out[:, 5:45].reshape(-1, 3).mean(0), GREEN, 2)
    assert close(out[:, 55:95].reshape(-1, 3).mean(0), BLUE, 2)
    assert not np.any(np.all(out == RED, axis=-1)) and not np.any(np.all(out == YELLOW, axis=-1))


def test_portrait_keeps_aspect_ratio_by_centre_crop():
    source = bands(200, 400, [RED, GREEN, BLUE, YELLOW], vertical=False)
    out, _ = load_image(encode(Image.fromarray(source), "PNG"), 100)
    assert close(out[5:45].reshape(-1, 3).mean(0), GREEN, 2)
    assert close(out[55:95].reshape(-1, 3).mean(0), BLUE, 2)


def test_upscales_small_images():
    out, info = load_image(encode(Image.fromarray(bands(20, 10, [RED, BLUE])), "PNG"), 64)
    assert info == ImageInfo("PNG", 20, 10)
    assert out.shape == (64, 64, 3)
    assert close(out[32, 2], RED, 2) and close(out[32, -3], BLUE, 2)


# --------------------------------------------------------------------------- EXIF orientation


def test_jpeg_orientation_6_is_rotated_clockwise():
    # Stored landscape 120x80 with a red marker on the top edge at x in [20, 40). Orientation 6
    # means "rotate 90° clockwise to display": displayed 80x120 portrait, the marker now on the
    # right edge at y in [20, 40), which is the top-right corner of the centre square
    # (y in [20, 100)).
    stored = np.full((80, 120, 3), 128, np.uint8)
    stored[:20, 20:40] = RED
    data = encode(Image.fromarray(stored), "JPEG", exif=exif_bytes(6), quality=95, subsampling=0)
    out, info = load_image(data, 40)
    assert info == ImageInfo("JPEG", width=80, height=120)  # swapped: the displayed size
    assert close(out[4, 35], RED)  # top-right
    for corner in (out[4, 4], out[35, 4], out[35, 35]):  # top-left, bottom-left, bottom-right
        assert close(corner, (128, 128, 128), 12)


UPRIGHT = {  # EXIF orientation -> the numpy view that shows the stored pixels upright
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
@pytest.mark.parametrize(
    ("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})]
)
def test_every_orientation_lossless(fmt, params, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    data = encode(Image.fromarray(stored), fmt, exif=exif_bytes(orientation), **params)
    upright = np.ascontiguousarray(UPRIGHT[orientation](stored))
    out, info = load_image(data, 40)
    assert (info.width, info.height) == (upright.shape[1], upright.shape[0])
    expected, _ = load_image(encode(Image.fromarray(upright), "PNG"), 40)
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_every_orientation_jpeg(orientation):
    stored = textured(96, 64, seed=orientation)
    stored[:16, :16] = RED  # make every transform distinguishable
    data = encode(Image.fromarray(stored), "JPEG", exif=exif_bytes(orientation), quality=95)
    upright = np.ascontiguousarray(UPRIGHT[orientation](stored))
    out, info = load_image(data, 48)
    assert (info.width, info.height) == (upright.shape[1], upright.shape[0])
    expected, _ = load_image(encode(Image.fromarray(upright), "PNG"), 48)
    assert mean_abs_diff(out, expected) < 4


def test_open_image_reports_the_displayed_size_without_decoding(no_decode):
    data = encode(Image.fromarray(textured(120, 80)), "JPEG", exif=exif_bytes(8))
    _, info = open_image(data)
    assert info == ImageInfo("JPEG", width=80, height=120)


# Orientation 6 next to a second tag of the wrong type: Pillow's ImageOps.exif_transpose
# raised TypeError/struct.error/AttributeError rewriting such an EXIF block.
SHORT_6 = (ORIENTATION, 3, 1, struct.pack("<H", 6))
MALFORMED_EXIF = {
    "not-tiff": (b"\x01\x02garbage" * 4, False),
    "ifd-offset-past-end": (b"II*\x00" + struct.pack("<I", 99_999), False),
    "ifd-cut-short": (b"II*\x00" + struct.pack("<I", 8) + b"\x05\x00", False),
    "orientation-9": (tiff_ifd((ORIENTATION, 3, 1, struct.pack("<H", 9))), False),
    "orientation-0": (tiff_ifd((ORIENTATION, 3, 1, struct.pack("<H", 0))), False),
    "orientation-ascii": (tiff_ifd((ORIENTATION, 2, 2, b"6\0")), False),
    "orientation-huge-count": (tiff_ifd((ORIENTATION, 3, 0x7FFFFFFF, b"\x10\0\0\0")), False),
    "orientation-unknown-type": (tiff_ifd((ORIENTATION, 99, 1, struct.pack("<H", 6))), False),
    "orientation-long": (tiff_ifd((ORIENTATION, 4, 1, struct.pack("<I", 6))), True),
    "xresolution-ascii": (tiff_ifd(SHORT_6, (0x011A, 2, 1, b"AB")), True),
    "resolution-unit-ascii": (tiff_ifd(SHORT_6, (0x0128, 2, 1, b"AB")), True),
    "make-float": (tiff_ifd(SHORT_6, (0x010F, 11, 1, b"AB")), True),
}


@quiet_pillow
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("case", sorted(MALFORMED_EXIF))
def test_malformed_exif_does_not_break_a_valid_image(case, fmt):
    exif, rotates = MALFORMED_EXIF[case]
    if fmt == "JPEG":
        exif = b"Exif\x00\x00" + exif
    stored = bands(60, 40, [RED, BLUE])  # left red, right blue
    params = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    out, info = load_image(encode(Image.fromarray(stored), fmt, exif=exif, **params), 20)
    assert out.shape == (20, 20, 3)
    # ImageInfo and the pixels agree on whether the image was turned.
    if rotates:  # orientation 6: left -> top
        assert (info.width, info.height) == (40, 60)
        assert close(out[2, 10], RED) and close(out[17, 10], BLUE)
    else:
        assert (info.width, info.height) == (60, 40)
        assert close(out[10, 2], RED) and close(out[10, 17], BLUE)


# --------------------------------------------------------------------------- colour modes


def test_mode_l_greyscale():
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    out, _ = load_image(encode(Image.fromarray(grey, "L"), "PNG"), 64)
    assert np.array_equal(out, np.repeat(grey[..., None], 3, axis=-1))


def test_mode_la_composited_on_white():
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 50
    la[:, 4:, 1] = 255  # left half transparent, right half opaque
    data = encode(Image.fromarray(la, "LA"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out, _ = load_image(data, 8)
    assert np.all(out[:, :4] == 255) and np.all(out[:, 4:] == 50)


def test_mode_p_palette():
    img = Image.fromarray(bands(16, 16, [RED, GREEN, BLUE, YELLOW])).convert("P")
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out, _ = load_image(data, 16)
    assert np.array_equal(out, bands(16, 16, [RED, GREEN, BLUE, YELLOW]))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_mode_p_transparent_index_composited_on_white(fmt):
    index = np.zeros((8, 8), np.uint8)
    index[:, 4:] = 1
    img = Image.fromarray(index, "P")
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # 0 black (transparent), 1 blue
    data = encode(img, fmt, transparency=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    out, _ = load_image(data, 8)
    assert np.all(out[:, :4] == 255)
    assert np.all(out[:, 4:] == BLUE)


def test_mode_p_with_per_index_alpha():
    index = np.array([[0, 1], [2, 0]], np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    data = encode(img, "PNG", transparency=bytes([0, 255, 128]))  # tRNS with 3 alphas
    out, _ = load_image(data, 2)
    assert np.array_equal(out[0, 0], WHITE)  # transparent red
    assert np.array_equal(out[0, 1], GREEN)
    assert close(out[1, 0], (127, 127, 255), 2)  # half blue over white


def test_mode_rgb_with_trns_colour_key_composited_on_white():
    source = bands(8, 8, [(0, 0, 0), (10, 200, 30)])
    data = encode(Image.fromarray(source), "PNG", transparency=(0, 0, 0))
    assert Image.open(io.BytesIO(data)).info["transparency"] == (0, 0, 0)
    out, _ = load_image(data, 8)
    assert np.all(out[:, :4] == 255)
    assert np.all(out[:, 4:] == (10, 200, 30))


def test_mode_l_with_trns_composited_on_white():
    grey = np.zeros((8, 8), np.uint8)
    grey[:, 4:] = 90
    out, _ = load_image(encode(Image.fromarray(grey, "L"), "PNG", transparency=0), 8)
    assert np.all(out[:, :4] == 255) and np.all(out[:, 4:] == 90)


@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_mode_rgba_fully_transparent_is_white(fmt, params):
    data = encode(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), fmt, **params)
    assert Image.open(io.BytesIO(data)).mode == "RGBA"
    out, _ = load_image(data, 16)
    assert np.all(out == 255)


def test_mode_rgba_partial_alpha_blends_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :2, 3] = 255  # opaque red
    rgba[:, 2:, 3] = 128  # half red
    out, _ = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 4)
    assert np.all(out[:, :2] == RED)
    assert close(out[0, 3], (255, 127, 127), 2)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_mode_cmyk(fmt):
    cmyk = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # no cyan, full magenta+yellow = red
    data = encode(cmyk, fmt)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out, info = load_image(data, 16)
    assert info == ImageInfo(fmt, 32, 16)
    assert close(out.reshape(-1, 3).mean(0), RED, 6)


def test_mode_i16_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    data = encode(Image.fromarray(np.tile(ramp, (256, 1))), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out, _ = load_image(data, 256)
    row = out[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200  # a ramp, not a clipped step
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_mode_i16_dark_image_stays_dark():
    # 16-bit values up to 255 are only 0.4% of full scale: they must not be read as 8-bit.
    dark = np.full((8, 8), 200, np.uint16)
    dark[:, 4:] = 1
    out, _ = load_image(encode(Image.fromarray(dark), "PNG"), 8)
    assert np.all(out[:, :4] == 1) and np.all(out[:, 4:] == 0)


def test_mode_i16_big_endian_tiff():
    values = np.full((8, 8), 65535, ">u2")
    values[:, 4:] = 1028
    data = encode(Image.frombytes("I;16B", (8, 8), values.tobytes()), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    out, _ = load_image(data, 8)
    assert np.all(out[:, :4] == 255) and np.all(out[:, 4:] == 4)


def test_mode_i32_and_f_tiff():
    ints = Image.fromarray(np.full((8, 8), 65535, np.int32), "I")
    out, _ = load_image(encode(ints, "TIFF"), 8)
    assert np.all(out == 255)
    floats = np.full((8, 8), 0.5, np.float32)
    out, _ = load_image(encode(Image.fromarray(floats, "F"), "TIFF"), 8)
    assert np.all(out == 128)  # 0..1 floats scaled to 0..255


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_mode_1_bilevel(fmt):
    bits = np.eye(8, dtype=bool)
    data = encode(Image.fromarray(bits), fmt)
    out, _ = load_image(data, 8)
    assert np.array_equal(out[..., 0], np.where(bits, 255, 0).astype(np.uint8))


def test_mode_ycbcr_tiff():
    img = Image.fromarray(bands(16, 16, [RED, BLUE])).convert("YCbCr")
    out, _ = load_image(encode(img, "TIFF"), 16)
    assert close(out[8, 2], RED, 6) and close(out[8, 13], BLUE, 6)


# --------------------------------------------------------------------------- animations


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_the_first_frame(fmt):
    frames = [Image.new("RGB", (32, 24), colour) for colour in (RED, BLUE, GREEN)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out, info = load_image(data, 16)
    assert info == ImageInfo(fmt, 32, 24)
    assert close(out.reshape(-1, 3).mean(0), RED, 4)


# --------------------------------------------------------------------------- large JPEG / draft


def spy_draft(monkeypatch) -> list[tuple[int, int]]:
    """Record the size each JPEG will be decoded at after load_image asks for a draft."""
    decoded_sizes = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return decoded_sizes


def test_large_jpeg_is_decoded_through_draft_and_matches_a_full_decode(monkeypatch):
    source = textured(2400, 1600, seed=11)
    data = encode(Image.fromarray(source), "JPEG", quality=92)
    decoded_sizes = spy_draft(monkeypatch)
    out, info = load_image(data, 224)
    assert info == ImageInfo("JPEG", 2400, 1600)
    # libjpeg scales in the DCT by 1/2, 1/4 or 1/8 while both sides stay >= 224.
    assert decoded_sizes == [(600, 400)]

    monkeypatch.undo()
    full = Image.open(io.BytesIO(data)).convert("RGB")  # no draft: every pixel decoded
    reference = np.asarray(
        full.resize(
            (224, 224), Image.Resampling.BILINEAR, box=(400, 0, 2000, 1600), reducing_gap=3.0
        )
    )
    assert mean_abs_diff(out, reference) < 2.0
    assert np.abs(out.astype(int) - reference).max() < 40


@pytest.mark.parametrize(
    ("width", "height", "decoded"),
    [(900, 460, (450, 230)), (4000, 3000, (500, 375)), (640, 480, (320, 240)), (300, 300, None)],
)
def test_draft_never_decodes_below_the_requested_size(monkeypatch, width, height, decoded):
    data = encode(Image.new("RGB", (width, height), (90, 30, 200)), "JPEG")
    decoded_sizes = spy_draft(monkeypatch)
    out, _ = load_image(data, 224)
    assert out.shape == (224, 224, 3)
    assert close(out[112, 112], (90, 30, 200), 4)
    # libjpeg only scales by 1/2, 1/4, 1/8 and both sides must stay >= 224.
    assert decoded_sizes == [decoded or (width, height)]


# --------------------------------------------------------------------------- limits


def test_pixel_limit_refuses_a_huge_png_header_before_decoding(no_decode):
    data = handmade_png(30_000, 30_000, zlib.compress(b"\0" * 1000))  # 900 MP in ~80 bytes
    assert len(data) < 200
    error = expect_error(data, "too-large")  # `no_decode`: refused from the header alone
    assert "30000" in error.detail or "900000000" in error.detail


def test_pixel_limit_applies_even_when_raised_above_pillows_own(no_decode):
    data = handmade_png(30_000, 30_000, zlib.compress(b"\0" * 1000))
    expect_error(data, "too-large", max_pixels=10**12)  # Pillow's bomb check still maps here


def test_pixel_limit_on_a_highly_compressible_image(no_decode):
    data = encode(Image.new("RGB", (2000, 2000), (9, 9, 9)), "PNG")
    assert len(data) < 50_000  # tiny file, 4 MP of pixels
    expect_error(data, "too-large", max_pixels=3_999_999)


def test_pixel_limit_is_inclusive():
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    out, _ = load_image(data, 8, max_pixels=5000)
    assert out.shape == (8, 8, 3)
    expect_error(data, "too-large", max_pixels=4999)
    assert DEFAULT_MAX_PIXELS > 8000 * 6000  # a big camera frame passes the default


PEAK_SCRIPT = """
import resource, sys
from PIL import Image, ImageDraw
from detector.io import preprocess

if sys.argv[1] == "make":  # a 50 MP RGBA PNG with partial and full transparency: ~250 KB
    img = Image.new("RGBA", (10_000, 5_000), (30, 120, 200, 128))
    draw = ImageDraw.Draw(img)
    for left in range(0, 10_000, 500):
        draw.rectangle((left, 0, left + 250, 5_000), fill=(200, 50, 20, 255))
    draw.ellipse((2_000, 1_000, 8_000, 4_000), fill=(0, 0, 0, 0))
    img.save(sys.argv[2])
else:
    data = open(sys.argv[2], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels, info = preprocess.load_image(data, 224)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, info.width * info.height, pixels.shape)
"""


def test_decode_memory_is_bounded_at_the_pixel_limit(tmp_path):
    """A 50 MP RGBA PNG (a few hundred KB on disk) peaks at its decode (4 bytes/pixel) plus
    one RGB canvas (Pillow keeps RGB in 4 bytes/pixel), not at whole-image RGBA copies and
    a white canvas (~20 bytes/pixel before: 956 MiB). Measured in a fresh process."""
    import subprocess
    import sys

    path = tmp_path / "huge.png"
    subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "make", str(path)], check=True)
    assert path.stat().st_size < 1_000_000
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "load", str(path)], check=True,
                         capture_output=True, text=True)
    grew, pixels, shape = run.stdout.split(" ", 2)
    assert int(pixels) == 50_000_000 and shape.strip() == "(224, 224, 3)"
    assert int(grew) < 10 * int(pixels), f"decode peaked {int(grew) / 2**20:.0f} MiB"


def test_max_bytes():
    data = encode(Image.new("RGB", (16, 16)), "PNG")
    load_image(data, 8, max_bytes=len(data))
    error = expect_error(data, "too-large", max_bytes=len(data) - 1)
    assert str(len(data)) in error.detail


# --------------------------------------------------------------------------- error codes


def test_image_error_carries_code_and_detail():
    error = expect_error(b"", "empty")
    assert isinstance(error, ValueError)
    assert str(error).startswith("empty: ")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_not_an_image(seed):
    data = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    expect_error(data, "not-an-image")


@pytest.mark.parametrize(
    "data", [b"hello, world\n" * 50, b"<html><body>not found</body></html>", b"\x00", b"%PDF-1.7"]
)
def test_other_files_are_not_an_image(data):
    expect_error(data, "not-an-image")


@pytest.mark.parametrize("fmt", ["PCX", "ICO", "TGA", "PPM", "SGI", "QOI"])
def test_formats_pillow_opens_but_we_refuse(fmt):
    assert fmt not in SUPPORTED_FORMATS
    data = encode(Image.fromarray(textured(32, 32)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would accept it
    error = expect_error(data, "unsupported-format")
    assert fmt in error.detail


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_jpeg_and_png(fmt, keep):
    data = encode(Image.fromarray(textured(256, 192)), fmt)
    expect_error(data[: int(len(data) * keep)], "truncated")


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {}), ("WEBP", {"lossless": True})],
)
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_other_formats(fmt, params, keep):
    data = encode(Image.fromarray(textured(256, 192)), fmt, **params)
    # WebP's decoder only says "could not create decoder object": corrupt is all it can tell.
    expect_error(data[: int(len(data) * keep)], {"truncated", "corrupt"})


@quiet_pillow
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF"])
def test_cut_inside_the_header(fmt):
    data = encode(Image.fromarray(textured(64, 64)), fmt)
    expect_error(data[:12], {"not-an-image", "truncated", "corrupt"})


def test_png_with_a_broken_zlib_stream_is_corrupt_not_black():
    # Regression: the decode error used to be swallowed while looking for EXIF, and the blank
    # image it left behind came back as valid all-black pixels.
    expect_error(handmade_png(10, 10, b"this is not zlib data" * 3), "corrupt")
    data = bytearray(encode(Image.fromarray(textured(64, 64)), "PNG"))
    start = data.index(b"IDAT") + 4 + 2  # inside the deflate stream, past the zlib header
    data[start : start + 16] = b"\xde\xad\xbe\xef" * 4
    expect_error(bytes(data), "corrupt")


def test_png_without_image_data_is_truncated():
    expect_error(handmade_png(10, 10, zlib.compress(b"\0" * 10)), "truncated")


def test_jpeg_with_markers_in_the_middle_is_corrupt():
    data = encode(Image.fromarray(textured(128, 128)), "JPEG")
    sos = data.index(b"\xff\xda")  # start of scan: entropy-coded data follows
    expect_error(data[: sos + 200] + b"\xff\xd8" * 10 + data[sos + 200 :], "corrupt")


@pytest.mark.parametrize("seed", range(6))
def test_jpeg_with_garbage_in_the_middle(seed):
    rng = np.random.default_rng(seed)
    data = encode(Image.fromarray(textured(128, 128)), "JPEG")
    sos = data.index(b"\xff\xda")
    at = int(rng.integers(sos + 20, len(data) - 20))
    garbage = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    try:
        out, info = load_image(data[:at] + garbage + data[at:], 64)
    except ImageError as error:  # libjpeg gave up
        assert error.code in {"corrupt", "truncated"}
    else:  # libjpeg resynchronised: damaged pixels, but a well-formed result
        assert out.shape == (64, 64, 3) and info == ImageInfo("JPEG", 128, 128)


def test_jpeg_headers_without_scan_data():
    data = encode(Image.fromarray(textured(64, 64)), "JPEG")
    expect_error(data[: data.index(b"\xff\xda")], {"truncated", "corrupt"})


def test_zero_width_header():
    expect_error(handmade_png(0, 10, zlib.compress(b"\0" * 10)), {"corrupt", "not-an-image"})


# --------------------------------------------------------------------------- fuzzing


def _fuzz_seeds() -> list[bytes]:
    rng = np.random.default_rng(2024)
    pixels = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "maker"
    with_exif = exif.tobytes()
    return [
        encode(pixels, "JPEG", exif=with_exif),
        encode(pixels, "JPEG", progressive=True),
        encode(pixels, "PNG", exif=with_exif),
        encode(pixels.convert("P"), "PNG", transparency=3),
        encode(pixels, "WEBP", exif=with_exif),
        encode(pixels, "WEBP", lossless=True),
        encode(pixels, "GIF"),
        encode(pixels, "BMP"),
        encode(pixels, "TIFF", exif=with_exif),
        encode(pixels, "TIFF", compression="tiff_deflate"),
    ]


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    kind = int(rng.integers(0, 5))
    if kind == 0:  # flip a few bytes anywhere
        for _ in range(int(rng.integers(1, 8))):
            out[int(rng.integers(0, len(out)))] = int(rng.integers(0, 256))
    elif kind == 1:  # flip a byte in the header region
        out[int(rng.integers(0, min(len(out), 128)))] = int(rng.integers(0, 256))
    elif kind == 2:  # overwrite a run with random bytes
        at = int(rng.integers(0, len(out)))
        out[at : at + int(rng.integers(1, 64))] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    elif kind == 3:  # truncate
        del out[int(rng.integers(1, len(out))) :]
    else:  # duplicate a slice (chunk/marker confusion)
        at, length = int(rng.integers(0, len(out))), int(rng.integers(1, 200))
        out[at:at] = out[at : at + length]
    return bytes(out)


@quiet_pillow
def test_fuzzed_images_only_ever_raise_image_error():
    rng = np.random.default_rng(12345)
    seeds = _fuzz_seeds()
    outcomes = []
    started = time.perf_counter()
    for i in range(200):
        data = _mutate(seeds[i % len(seeds)], rng)
        try:
            out, info = load_image(data, 16, max_pixels=1_000_000)
        except ImageError as error:
            assert error.code in CODES, error
            outcomes.append(error.code)
        else:  # anything that decodes must be well-formed
            assert out.shape == (16, 16, 3) and out.dtype == np.uint8
            assert info.format in SUPPORTED_FORMATS and info.width > 0 and info.height > 0
            outcomes.append("ok")
        # any other exception type propagates and fails the test
    assert time.perf_counter() - started < 20
    assert {"ok", "truncated", "corrupt"} <= set(outcomes)  # the mutations reached the decoders


# --------------------------------------------------------------------------- augmentation


def test_mirror_keeps_the_pixel_grid_phase_a_centre_flip_shifts():
    """Sensor mosaics, 2x upsampling and JPEG blocks sit at even/8-aligned columns: the
    training mirror must keep them there (a centre flip moved them by one pixel, and robust
    training on the sample data then stayed at chance)."""
    from detector.data.augment import mirror, robust_augment

    columns = np.arange(64)
    grid = np.broadcast_to(((columns % 2) * 200 + (columns % 8 == 0) * 50)[None, :, None],
                           (16, 64, 3)).astype(np.uint8)
    assert np.array_equal(mirror(grid), grid)
    assert not np.array_equal(grid[:, ::-1], grid)
    scene = np.random.default_rng(0).integers(0, 256, (16, 64, 3), dtype=np.uint8)
    assert np.array_equal(mirror(mirror(scene)), scene)
    assert np.array_equal(mirror(scene)[:, 1:], scene[:, :0:-1])  # a left-right mirror
    rng = np.random.default_rng(1)
    outs = [robust_augment(scene, rng) for _ in range(40)]
    assert all(o.shape == scene.shape and o.dtype == np.uint8 for o in outs)
    assert any(np.array_equal(o, mirror(scene)) for o in outs)


@pytest.mark.parametrize("head", [b"", b"B", b"\x89PN", b"\xff\xd8", b"RIFF", bytes(3)])
def test_a_head_too_short_for_a_format_check_is_no_image_and_no_crash(head):
    """Pillow's own checks read past a few bytes (BMP's DIB header, say): an empty or
    3-byte file is simply not an image."""
    from detector.io.preprocess import could_be_image

    assert could_be_image(head) is False
