"""Image bytes -> model-ready RGB uint8 array: the ONE decode/resize path.

Training shards, the Serve endpoint and bucket scans all call `load_image`, so a
model never sees pixels prepared differently from the ones it was trained on (the
notebook resized with TF bilinear in training and PIL in inference).

Geometry: the shorter side is scaled to `size` and the centre square is kept, so the
aspect ratio is never distorted. An image that is already `size` x `size` is passed
through untouched, which keeps the high-frequency traces detectors look for.
"""

from __future__ import annotations

import functools
import io
import posixpath
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Bump when anything below changes the pixels a model sees; recorded in detector.json.
PREPROCESS_VERSION = 1

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # ~8K x 6K; above every camera, below decompression bombs

# Formats whose decoders we trust with untrusted bytes, as Pillow names them: the one list
# predict, serve, scan and prepare accept. MPO is a multi-picture JPEG, APNG is a PNG and
# GIF may animate: the first frame is scored. HEIF (HEIC, iPhones) comes from pillow-heif
# and JXL from pillow-jxl-plugin (`register_formats`); AVIF and JPEG 2000 are Pillow's own.
# Pillow can open more (EPS calls Ghostscript; PSD, TGA and friends are rarely fuzzed):
# those are refused with `unsupported-format`, naming the format, not guessed at.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF",
                               "AVIF", "JXL", "JPEG2000"})

# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose)
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a browser would


class ImageError(ValueError):
    """An input that cannot become model pixels, with a short machine-readable code.

    Codes: ``empty``, ``not-an-image``, ``unsupported-format``, ``too-large``,
    ``truncated``, ``corrupt``.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What the source file was: format and size as displayed (after EXIF orientation)."""

    format: str
    width: int
    height: int


def load_image(
    data: bytes,
    size: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, ImageInfo]:
    """Decode `data` into a `size` x `size` x 3 uint8 array and describe the source.

    Raises ImageError (never a bare PIL or OS error) for anything that is not a usable image.
    """
    img, info = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    if img.format in ("JPEG", "MPO"):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= size: the
        # DCT does the downscale almost for free (~9x faster on 12 MP photos).
        img.draft(img.mode, (size, size))
    _decode(img)
    transpose = _TRANSPOSES.get(_orientation(img))  # read before conversion drops the EXIF
    rgb = _to_rgb(img)
    if rgb is not img:
        img.close()  # free the decoded pixels before the transpose copies the RGB ones
    # Our own transpose, not ImageOps.exif_transpose: that one rewrites the EXIF block (and
    # raises on malformed tags). After the conversion, which is per-pixel: same pixels.
    if transpose is not None:
        rgb = rgb.transpose(transpose)
    return _center_square(rgb, size), info


def square_pixels(img: Image.Image, size: int) -> np.ndarray:
    """A decoded image (any mode) as model pixels: RGB, the centre square at `size` px, as
    `load_image` makes them (video frames take this path too)."""
    return _center_square(_to_rgb(img), size)


def named_as_image(name: str) -> bool:
    """Whether a file name's extension is one Pillow opens (.jpg, .heic, .avif, ...)."""
    register_formats()
    ext = posixpath.splitext(posixpath.basename(name))[1].lower()
    return bool(ext) and ext in Image.registered_extensions()


def could_be_image(head: bytes) -> bool:
    """Whether the first bytes of a file can start an image: a format's signature, as
    Pillow's own plugins check it (HEIF and JXL included), or else a header Pillow parses
    from these bytes alone (formats without a signature, such as TGA). A TIFF whose
    directory lies past `head` still passes on its signature."""
    register_formats()
    Image.init()
    prefix = head[:16]  # what Image.open hands each plugin's check
    for fmt in Image.ID:
        _, accept = Image.OPEN[fmt]
        try:
            found = accept(prefix) if accept else False
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # a check that needs more bytes: Image.open skips it alike
        if found and not isinstance(found, str):  # a str is Pillow's "no, because ..."
            return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(head))
    except Exception:
        return False
    return True


@functools.cache
def register_formats() -> None:
    """Register the decoders Pillow lacks, once per process (on first use, so importing
    `detector` registers nothing): HEIF/HEIC through pillow-heif (primary image only, no
    thumbnails) and JPEG XL through pillow-jxl-plugin. Their pixels are bounded like every
    other format's: `open_image` checks the header's size before anything is decoded."""
    import pillow_heif
    import pillow_jxl  # noqa: F401  (registers JXL on import)

    pillow_heif.register_heif_opener(thumbnails=False)


def open_image(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, ImageInfo]:
    """Parse only the header of `data` and enforce the limits before any pixel is decoded.

    (A PNG is then decoded here, where Pillow would decode it anyway to look for EXIF.)
    """
    register_formats()
    if not data:
        raise ImageError("empty", "the file has no bytes")
    if len(data) > max_bytes:
        raise ImageError("too-large", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            # We apply our own, lower pixel limit below; Pillow's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too-large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError("not-an-image", "not a recognised image format") from None
    except Exception as exc:  # a header parser tripping over garbage
        raise ImageError("corrupt", f"unreadable header: {exc}") from None
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(
            "unsupported-format",
            f"{img.format} is not accepted (supported: {', '.join(sorted(SUPPORTED_FORMATS))})",
        )
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            "too-large", f"{width}x{height} = {width * height} pixels exceeds {max_pixels}"
        )
    if img.format == "PNG" and "exif" not in img.info:
        # Pillow's PNG getexif() decodes the pixels to look for an eXIf chunk after IDAT. Do it
        # here, so a decode error is reported: swallowed inside _orientation, it left a blank
        # "loaded" image that load_image returned as valid black pixels.
        _decode(img)
    # Pillow's TIFF plugin already reports (and decodes to) the upright size.
    if img.format != "TIFF" and _orientation(img) in _ROTATING_ORIENTATIONS:
        width, height = height, width
    return img, ImageInfo(format=img.format, width=width, height=height)


def _orientation(img: Image.Image) -> object:
    # The raw tag, not int(): a malformed one (e.g. the string "6") must be judged exactly as
    # load_image transposes by it, so ImageInfo and the pixels agree.
    try:
        value = img.getexif().get(0x0112, 1)
        hash(value)
        return value
    except Exception:  # malformed EXIF must not make a good image unusable
        return 1


def _decode(img: Image.Image) -> None:
    try:
        img.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error...
        raise _decode_error(exc) from None


def _decode_error(exc: Exception) -> ImageError:
    message = str(exc) or type(exc).__name__
    lowered = message.lower()
    if "truncated" in lowered or "end of file" in lowered or "premature" in lowered:
        return ImageError("truncated", message)
    return ImageError("corrupt", message)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every Pillow mode -> RGB, compositing transparency over white.

    Compositing and rescaling go in strips of rows into one RGB image: at the pixel limit
    (50 MP) whole-image intermediates (RGBA copies, a white canvas, float64 greyscale)
    would cost gigabytes per request; strips cost a few MB, with the same pixels.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:  # RGB PNGs may carry a tRNS colour key
        return img
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        to_uint8 = _uint8_scaler(img)
        return _by_strips(img, lambda strip: Image.fromarray(
            to_uint8(np.asarray(strip)), "L").convert("RGB"))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        return _by_strips(img, _on_white)
    try:
        return img.convert("RGB")
    except ValueError as exc:  # e.g. LAB or multi-channel TIFFs Pillow cannot convert
        raise ImageError("unsupported-format", f"colour mode {mode}: {exc}") from None


STRIP_ROWS = 256


def _by_strips(img: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """`convert` (per-pixel, any mode -> RGB) applied strip by strip into one RGB image."""
    out = Image.new("RGB", img.size)
    for top, strip in _strips(img):
        out.paste(convert(strip), (0, top))
    return out


def _strips(img: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    width, height = img.size
    for top in range(0, height, STRIP_ROWS):
        yield top, img.crop((0, top, width, min(top + STRIP_ROWS, height)))  # keeps palette


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _uint8_scaler(img: Image.Image) -> Callable[[np.ndarray], np.ndarray]:
    """16/32-bit integer or float greyscale -> 0..255, with the range decided on the whole
    image (its extrema and type), so every strip is scaled alike."""
    dtype = np.asarray(img.crop((0, 0, 1, 1))).dtype
    kind, itemsize = dtype.kind, dtype.itemsize
    high = max(np.asarray(strip).max() for _, strip in _strips(img))  # (no getextrema: I;16B)

    def to_uint8(values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float64)
        if (kind == "u" and itemsize == 2) or high > 255:
            # 16-bit range: 65535 -> 255, decided by the type for I;16 so a dark image stays
            # dark
            values = values / 257.0
        elif high <= 1.0 and kind == "f":
            values = values * 255.0
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)

    return to_uint8


def _center_square(img: Image.Image, size: int) -> np.ndarray:
    width, height = img.size
    if (width, height) != (size, size):
        side = min(width, height)
        left = (width - side) / 2
        top = (height - side) / 2
        # Resizing the centre box directly is one pass: no intermediate full-size copy.
        img = img.resize(
            (size, size),
            Image.Resampling.BILINEAR,
            box=(left, top, left + side, top + side),
            reducing_gap=3.0,
        )
    return np.asarray(img, dtype=np.uint8)
