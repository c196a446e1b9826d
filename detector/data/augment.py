"""Image perturbations on model-ready uint8 arrays, shared by training and evaluation.

Training applies them at random to BOTH classes (so format and resolution stop being
shortcuts, as in CNNDetection); evaluation applies them deterministically to measure
robustness to re-saving and resizing.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

# Bumped when robust_augment changes what it produces (cached augmented features key on it).
# 2: the mirror keeps the pixel-grid phase (see `mirror`).
AUGMENT_VERSION = 2


def jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as JPEG at `quality` and decode again."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(buffer).convert("RGB"))


def blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(sigma)))


def rescale(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Downscale by `factor` and back up to the original size (detail is lost, size kept)."""
    height, width = pixels.shape[:2]
    small = (max(1, round(width * factor)), max(1, round(height * factor)))
    image = Image.fromarray(pixels).resize(small, Image.Resampling.BILINEAR)
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


# Name -> perturbation, for evaluation's robustness table.
ROBUSTNESS_CHECKS = {
    "jpeg95": lambda p: jpeg(p, 95),
    "jpeg75": lambda p: jpeg(p, 75),
    "jpeg50": lambda p: jpeg(p, 50),
    "resize0.5": lambda p: rescale(p, 0.5),
}


def robust_augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CNNDetection-style: blur (p=0.1, sigma 0-3), JPEG (p=0.1, q 30-100),
    downscale+upscale (p=0.1, 0.5-1x); horizontal flip at p=0.5."""
    if rng.random() < 0.1:
        pixels = blur(pixels, rng.uniform(0.1, 3.0))
    if rng.random() < 0.1:
        pixels = jpeg(pixels, int(rng.integers(30, 101)))
    if rng.random() < 0.1:
        pixels = rescale(pixels, rng.uniform(0.5, 1.0))
    if rng.random() < 0.5:
        pixels = mirror(pixels)
    return np.ascontiguousarray(pixels)


def mirror(pixels: np.ndarray) -> np.ndarray:
    """Left-right mirror about column 0 (x -> -x mod width), not about the centre.

    The traces detectors read sit on the pixel grid: a sensor's 2x2 colour filter, a
    generator's 2x upsampling, JPEG's 8x8 blocks. A centre flip of an even-width image maps
    column x to width-1-x and so moves every one of them by a pixel, which stride-2
    networks see as a different pattern (on the sample data, training with centre flips
    stays at chance); this mirror keeps their phase. Column 0 stays; one seam at its right.
    """
    return np.roll(pixels[:, ::-1], 1, axis=1)
