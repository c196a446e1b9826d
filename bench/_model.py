"""Shared by the benchmarks: an untrained model artifact (speed does not depend on the
weights), optionally with the exports the fast runtimes load."""

from __future__ import annotations

import os

import numpy as np

CALIBRATION_IMAGES = 64  # as the issue's own int8 measurement; enough for speed figures


def sample_pixels(count: int, image_size: int, seed: int = 0) -> np.ndarray:
    """`count` decoded sample images of both classes, uint8 (N, S, S, 3)."""
    from detector.data.sample import make_image

    rng = np.random.default_rng(seed)
    return np.stack([make_image(i % 2, rng, (image_size, image_size)) for i in range(count)])


def untrained_artifact(where: str, name: str, image_size: int, exports: bool = False) -> str:
    """Save `name` (pretrained weights replaced by none) at `where/name`; with `exports`,
    also its ONNX and NNCF int8 exports, calibrated on sample images, as training and
    `detector export --int8` publish them. Returns the artifact's URI."""
    from detector.io.preprocess import PREPROCESS_VERSION
    from detector.model.architectures import build_model, get_spec
    from detector.model.artifact import ModelCard, save_artifact
    from detector.model.export import export_into

    spec = get_spec(name)
    model = build_model(name, image_size=image_size,
                        **({"weights": "none"} if spec.pretrained else {}))
    card = ModelCard(name=name, architecture=spec.family, image_size=image_size,
                     preprocess_version=PREPROCESS_VERSION)

    def write_exports(directory: str) -> None:
        pixels = sample_pixels(CALIBRATION_IMAGES, image_size)
        # No labels: an untrained model's AUC means nothing, so no int8 refusal either.
        card.exports.update(export_into(model, card, directory, pixels, None,
                                        calibration=pixels))

    return save_artifact(model, card, os.path.join(where, name),
                         extra_files=write_exports if exports else None)
