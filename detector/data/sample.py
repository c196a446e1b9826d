"""Synthetic sample buckets for the demo and the tests.

`write_sample` writes ``OUT/real/...`` and ``OUT/fake/...``: random smooth scenes (gradients,
soft shapes, texture) that carry the traces the field's detectors look for. With
`generators=N`, the fakes come from N distinct generator families instead, each in its own
folder ``OUT/fake/<family>/...`` (see FAMILIES), so attribution has something real to learn.

- fake (label 1): the scene is low-passed at half resolution and upsampled by nearest
  neighbour (zero insertion + box kernel) with a slight transposed-convolution gain imbalance,
  so the noise residual has a checkerboard peak at N/2; a faint period-8 decoder grid adds
  peaks at N/8; high frequencies are missing, as in diffusion-model outputs.
- real (label 0): a camera pipeline: Bayer RGGB mosaic, shot + read noise per photosite and
  bilinear demosaicing, so every frequency up to Nyquist carries sensor noise.

Families (`generators=N` takes the first N) all render at half resolution and upsample 2x
through a transposed convolution whose output phases get unequal gains; which phases gain
is each family's signature, as it is a real generator's:

- upsampler: a checkerboard of gains.
- decoder-grid: gains alternating by column, and a period-8 grid (peaks at N/8).
- lowpass-tint: gains alternating by row, a stronger low-pass and a warm colour cast.
- latent-diffusion: every trace of the default fake (checkerboard and grid) at once.

Both classes draw scenes from the same distribution and get the same formats and sizes, so
neither brightness, colour, format nor size tells them apart (unless `biased=True` asks for
the "real = JPEG 640x480, fake = PNG 512x512" shortcut on purpose). Every file depends only
on (seed, label, index): the same spec writes byte-identical files.
"""

from __future__ import annotations

import io
import math
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from detector.io import storage

CLASSES = ("real", "fake")  # folder name by label: 0 = real, 1 = AI-generated
FORMATS = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SIZES = ((256, 256), (320, 240), (384, 288), (512, 512))  # (width, height)
BIASED = {0: ("JPEG", (640, 480)), 1: ("PNG", (512, 512))}
CORRUPT_KINDS = ("empty", "truncated", "random", "text")
PER_FOLDER = 8  # a few images per sub-prefix, so listings are nested and paginate

Size = tuple[int, int]


@dataclass(frozen=True)
class SampleSpec:
    """What `write_sample` writes; `size` None means the default mix of sizes."""

    per_class: int = 100
    size: int | None = None
    seed: int = 0
    biased: bool = False
    corrupt: int = 0
    generators: int = 0  # 0: one unnamed kind of fake; N: the first N of FAMILIES

    def __post_init__(self) -> None:
        if min(self.per_class, self.corrupt, self.seed, self.generators) < 0:
            raise ValueError("per_class, corrupt, seed and generators must be >= 0")
        if self.generators > len(FAMILIES):
            raise ValueError(f"generators must be at most {len(FAMILIES)} "
                             f"({', '.join(FAMILIES)}), got {self.generators}")
        if self.size is not None and self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(FAMILIES)[: self.generators]

    def family(self, label: int, index: int) -> str | None:
        """The generator family of fake `index` (None: the default fake, or a real image).
        Families take turns, so each gets every format and size (see `_plan`)."""
        if label == 0 or not self.generators:
            return None
        return self.families[index % self.generators]

    def turn(self, label: int, index: int) -> int:
        """Image `index`'s place among its own family's (or class's) images."""
        return index // self.generators if self.family(label, index) else index


def write_sample(out_uri: str, spec: SampleSpec) -> dict:
    """Write OUT/real/... and OUT/fake/... ; return a summary of what was written.

    The summary is ``{"real": n, "fake": n, "corrupt": n (bad files, both classes),
    "formats": {"real": {"JPEG": n, ...}, "fake": {...}}, "sizes": {...},
    "generators": {family: n} (empty without families), "out": out_uri}``.
    """
    jobs: list[Callable[[], None]] = []
    formats: dict[str, Counter] = {name: Counter() for name in CLASSES}
    sizes: dict[str, Counter] = {name: Counter() for name in CLASSES}
    families: Counter = Counter()
    for label, name in enumerate(CLASSES):
        for index in range(spec.per_class):
            fmt, size = _plan(spec, label, index)
            formats[name][fmt] += 1
            sizes[name][f"{size[0]}x{size[1]}"] += 1
            if family := spec.family(label, index):
                families[family] += 1
            jobs.append(_image_job(out_uri, spec, label, index))
        for k in range(spec.corrupt):
            jobs.append(_corrupt_job(out_uri, spec, label, k))
    # Threads: encoding and S3 PUTs release the GIL; the output does not depend on the order.
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    return {
        "real": spec.per_class,
        "fake": spec.per_class,
        "corrupt": 2 * spec.corrupt,
        "formats": {name: dict(sorted(c.items())) for name, c in formats.items()},
        "sizes": {name: dict(sorted(c.items())) for name, c in sizes.items()},
        "generators": {family: families[family] for family in spec.families},
        "out": out_uri,
    }


def make_image(label: int, rng: np.random.Generator, size: Size,
               trace_box: tuple[int, int, int, int] | None = None,
               family: str | None = None) -> np.ndarray:
    """One image as an HxWx3 uint8 array; `size` is (width, height) as in Pillow.

    label 1 = AI-generated (generator traces: `family`'s, or by default every trace at
    once), 0 = real (camera traces). `trace_box` (left, top, right, bottom; even numbers
    keep the traces' phase) confines a generated image's traces to that region, camera
    traces around it: a known answer for where an explanation should point.
    """
    width, height = size
    scene = _scene(rng, width, height)
    generated = FAMILIES[family or "latent-diffusion"]
    if label == 1 and trace_box is not None:
        left, top, right, bottom = trace_box
        pixels = _camera(scene, rng)
        pixels[top:bottom, left:right] = generated(scene, rng)[top:bottom, left:right]
    else:
        pixels = generated(scene, rng) if label == 1 else _camera(scene, rng)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


# --- planning and writing -------------------------------------------------------------------


def _plan(spec: SampleSpec, label: int, index: int) -> tuple[str, Size]:
    """Format and size of image `index`: a per-index cycle shared by both classes (by a
    family's own count of fakes, so no family keeps to one format)."""
    if spec.biased:
        fmt, size = BIASED[label]
    else:
        turn = spec.turn(label, index)
        # 3 formats x 4 sizes are coprime cycles, so every combination occurs every 12.
        fmt, size = FORMATS[turn % len(FORMATS)], SIZES[turn % len(SIZES)]
    return fmt, (spec.size, spec.size) if spec.size else size


def _image_rng(spec: SampleSpec, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, label, index])


def _image_job(out_uri: str, spec: SampleSpec, label: int, index: int) -> Callable[[], None]:
    def job() -> None:
        fmt, size = _plan(spec, label, index)
        rng = _image_rng(spec, label, index)
        family = spec.family(label, index)
        data = encode(make_image(label, rng, size, family=family), fmt, rng)
        storage.write_bytes(_uri(out_uri, label, spec.turn(label, index),
                                 _file_name(index, fmt), family), data)

    return job


def _corrupt_job(out_uri: str, spec: SampleSpec, label: int, k: int) -> Callable[[], None]:
    def job() -> None:
        kind = CORRUPT_KINDS[k % len(CORRUPT_KINDS)]
        # A stream of its own (4th key) so bad files never change the good ones.
        rng = np.random.default_rng([spec.seed, label, k, 1])
        name = f"bad-{k:03d}-{kind}.{'png' if kind == 'text' else 'jpg'}"
        family = spec.family(label, k)
        storage.write_bytes(_uri(out_uri, label, spec.turn(label, k), name, family),
                            _corrupt_bytes(kind, rng))

    return job


def _uri(out_uri: str, label: int, turn: int, name: str, family: str | None = None) -> str:
    folder = (CLASSES[label], family) if family else (CLASSES[label],)
    return storage.join(out_uri, *folder, f"batch-{turn // PER_FOLDER:02d}", name)


def _file_name(index: int, fmt: str) -> str:
    # A few keys with a space and a non-ASCII letter, which scanners must carry unchanged.
    stem = f"photo ü {index}" if index % 20 == 3 else f"img-{index:05d}"
    return f"{stem}.{EXTENSIONS[fmt]}"


def encode(pixels: np.ndarray, fmt: str, rng: np.random.Generator) -> bytes:
    """Encode like the wild does: JPEG at quality 90-95, PNG and WebP lossless."""
    buf = io.BytesIO()
    img = Image.fromarray(pixels, "RGB")
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=int(rng.integers(90, 96)))
    elif fmt == "PNG":
        img.save(buf, "PNG", compress_level=1)  # a few % larger than level 6, ~5x faster
    elif fmt == "WEBP":
        img.save(buf, "WEBP", lossless=True, quality=0, method=0)  # least effort, still lossless
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue()


def _corrupt_bytes(kind: str, rng: np.random.Generator) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated":
        # A real JPEG cut in the middle of its entropy-coded data: the header parses, the
        # pixels do not.
        data = encode(make_image(0, rng, (96, 96)), "JPEG", rng)
        return data[: len(data) // 2]
    if kind == "random":
        return b"\x00" + rng.bytes(int(rng.integers(512, 4096)))  # 0x00: no format's magic
    return b"this is not a PNG, it is text that pretends to be one\n" * 8


# --- scenes ---------------------------------------------------------------------------------


def _scene(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random scene, float32 HxWx3 in [12, 243] (room for noise before clipping)."""
    img = _gradient(rng, width, height)
    img += _colour_field(rng, width, height)
    for _ in range(int(rng.integers(2, 7))):
        img = _add_shape(img, rng)
    img += _texture(rng, width, height)
    return np.clip(img, 12, 243)


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(width, dtype=np.float32) / width * math.cos(angle)
    ys = np.arange(height, dtype=np.float32)[:, None] / height * math.sin(angle)
    t = xs + ys
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    start, end = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    return start + (end - start) * t[..., None]


def _colour_field(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Large soft colour blobs: a coarse random grid upsampled bicubically."""
    rows, cols = (int(v) for v in rng.integers(2, 6, size=2))
    grid = rng.uniform(-35, 35, size=(rows, cols, 3)).astype(np.float32)
    return np.stack([_resize(grid[..., c], width, height) for c in range(3)], axis=-1)


def _add_shape(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend one soft-edged ellipse, rectangle or triangle of a random colour into `img`."""
    height, width = img.shape[:2]
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    kind = int(rng.integers(0, 3))
    if kind == 2:
        points = rng.uniform(0, 1, size=(3, 2)) * (width, height)
        draw.polygon([tuple(p) for p in points], fill=255)
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    else:
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, size=2) * width)
        y0, y1 = sorted(rng.uniform(-0.2, 1.2, size=2) * height)
        (draw.ellipse if kind == 0 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=255)
    radius = float(rng.uniform(0.6, 3.0)) * max(width, height) / 256
    # Blur and blend only the shape's box (plus the blur's reach): same pixels, less work.
    reach = int(3 * radius) + 2
    left, top = max(int(x0) - reach, 0), max(int(y0) - reach, 0)
    right, bottom = min(int(x1) + reach + 2, width), min(int(y1) + reach + 2, height)
    colour = rng.uniform(30, 225, size=3).astype(np.float32)
    if right <= left or bottom <= top:
        return img
    region = mask.crop((left, top, right, bottom)).filter(ImageFilter.GaussianBlur(radius))
    alpha = np.asarray(region, dtype=np.float32)[..., None] * np.float32(
        rng.uniform(0.4, 0.9) / 255
    )
    patch = img[top:bottom, left:right]
    patch += alpha * (colour - patch)
    return img


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Fine grey texture at quarter resolution: shared scene content, not a class trace."""
    coarse = rng.normal(0, 1, size=(max(height // 4, 2), max(width // 4, 2)))
    amplitude = rng.uniform(2, 7)
    return (_resize(coarse.astype(np.float32), width, height) * amplitude)[..., None]


def _resize(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(plane.astype(np.float32), "F")
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


# --- class traces ---------------------------------------------------------------------------


def _generated(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every generator trace: a half-resolution low-passed render (diffusion decoders lack
    the top octave), 2x upsampling with a content-modulated checkerboard of gains (peak at
    N/2, zero-mean, so brightness is unchanged), and a decoder grid."""
    up = _render(scene, rng, _phases(*scene.shape[:2], 1, 1), gains=(0.04, 0.08))
    return _add_grid(up, rng, (2.0, 4.0))


def _upsampler(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Phase gains in a checkerboard (the default fake's, stronger), nothing else."""
    return _render(scene, rng, _phases(*scene.shape[:2], 1, 1))


def _decoder_grid(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Phase gains alternating by column, and a period-8 decoder grid (peaks at N/8)."""
    return _add_grid(_render(scene, rng, _phases(*scene.shape[:2], 1, 0)), rng, (3.0, 5.0))


def _lowpass_tint(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Phase gains alternating by row, a stronger low-pass, and a warm colour cast."""
    up = _render(_convolve(scene, _BINOMIAL), rng, _phases(*scene.shape[:2], 0, 1))
    cast = np.float32(1) + np.array([1, 0.2, -1], dtype=np.float32) * np.float32(
        rng.uniform(0.05, 0.09))
    return up * cast


def _render(scene: np.ndarray, rng: np.random.Generator, phases: np.ndarray,
            gains: tuple[float, float] = (0.08, 0.12)) -> np.ndarray:
    """The fakes' shared pipeline: a half-resolution render, low-passed, with faint latent
    texture (so fakes are not flat where reals are noisy), upsampled 2x by a transposed
    convolution whose output phases get unequal gains. Which phases gain (`phases`, +1/-1
    per pixel) is a generator's signature."""
    height, width = scene.shape[:2]
    half = _convolve(_half(scene), _BINOMIAL)
    half += rng.normal(0, rng.uniform(0.5, 1.5), size=(*half.shape[:2], 1))
    gain = np.float32(rng.uniform(*gains))
    return _upsample(half, height, width) * (1 + gain * phases)[..., None]


def _add_grid(up: np.ndarray, rng: np.random.Generator, amplitudes: tuple[float, float]
              ) -> np.ndarray:
    """`up` plus a zero-mean period-8 decoder grid at a random phase and amplitude."""
    grid = _grid(rng, *up.shape[:2])
    return up + (np.float32(rng.uniform(*amplitudes)) * grid)[..., None]


def _half(scene: np.ndarray) -> np.ndarray:
    """2x2 box average (slicing: much faster than reshape + mean on this layout)."""
    height, width = scene.shape[:2]
    even = np.pad(scene, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return (even[0::2, 0::2] + even[1::2, 0::2] + even[0::2, 1::2] + even[1::2, 1::2]) / 4


def _upsample(half: np.ndarray, height: int, width: int) -> np.ndarray:
    return half.repeat(2, axis=0).repeat(2, axis=1)[:height, :width]


def _phases(height: int, width: int, along_x: int, along_y: int) -> np.ndarray:
    """+1/-1 per pixel by the parity of `along_x * x + along_y * y`: (1, 1) a checkerboard,
    (1, 0) alternating columns, (0, 1) alternating rows."""
    parity = (along_x * np.arange(width) + along_y * np.arange(height)[:, None]) % 2
    return np.where(parity == 0, 1, -1).astype(np.float32)


def _grid(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A zero-mean period-8 grid at a random phase (peaks at N/8)."""
    phase_x, phase_y = rng.uniform(0, 2 * math.pi, size=2)
    xs, ys = np.arange(width), np.arange(height)[:, None]
    return (np.cos(2 * math.pi * xs / 8 + phase_x) + np.cos(2 * math.pi * ys / 8 + phase_y)
            ).astype(np.float32)


def _camera(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera traces: RGGB mosaic, shot + read noise per photosite, bilinear demosaic."""
    red, blue = _bayer_masks(*scene.shape[:2])
    green = 1 - red - blue
    mosaic = scene[..., 0] * red + scene[..., 1] * green + scene[..., 2] * blue
    gain, read = rng.uniform(0.1, 0.3), rng.uniform(2.5, 5.0)
    sigma = np.sqrt(np.float32(gain) * mosaic + np.float32(read**2))
    mosaic += sigma * rng.standard_normal(mosaic.shape, dtype=np.float32)
    return np.stack(
        [
            _convolve(mosaic * red, _RED_BLUE),
            _convolve(mosaic * green, _GREEN),
            _convolve(mosaic * blue, _RED_BLUE),
        ],
        axis=-1,
    )


def _bayer_masks(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """HxW 0/1 masks of the red and blue sites of an RGGB colour filter array."""
    red = np.zeros((height, width), dtype=np.float32)
    blue = np.zeros((height, width), dtype=np.float32)
    red[0::2, 0::2] = 1
    blue[1::2, 1::2] = 1
    return red, blue


FAMILIES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "upsampler": _upsampler,
    "decoder-grid": _decoder_grid,
    "lowpass-tint": _lowpass_tint,
    "latent-diffusion": _generated,
}

_BINOMIAL = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
_GREEN = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], dtype=np.float32) / 4
_RED_BLUE = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32) / 4


def _convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """3x3 convolution over the first two axes. 'reflect' padding keeps the Bayer phase."""
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (img.ndim - 2)
    padded = np.pad(img, pad, mode="reflect")
    height, width = img.shape[:2]
    out = np.zeros_like(img, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * padded[dy : dy + height, dx : dx + width]
    return out
