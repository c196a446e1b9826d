"""Model artifacts for tests, saved the way training publishes them: the weights, the card
and the ONNX export (int8 too on request), so that `backend="auto"` loads them on OpenVINO
as it loads a trained model. A scan's scoring actor or a Serve replica then never imports
TensorFlow (about 5 s of CPU and 700 MB each); tests of the Keras runtime ask for it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def exports(model, card, int8: bool = False, pixels: np.ndarray | None = None
            ) -> Callable[[str], None]:
    """The `extra_files` step that writes the exports `card.exports` then names, their
    parity measured on `pixels` (default: random ones, as an untrained model has no test
    split to measure on); int8 is calibrated on the same pixels."""
    from detector.model.export import export_into

    if pixels is None:
        size = card.image_size
        pixels = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)

    def write(directory: str) -> None:
        card.exports.update(export_into(model, card, directory, pixels, None,
                                        calibration=pixels if int8 else None))

    return write


def save_exported(model, card, uri: str, int8: bool = False,
                  pixels: np.ndarray | None = None) -> str:
    """`save_artifact` with its exports (see `exports`)."""
    from detector.model.artifact import save_artifact

    return save_artifact(model, card, uri, extra_files=exports(model, card, int8, pixels))


def publish_exported(model, card, name_uri: str, int8: bool = False,
                     pixels: np.ndarray | None = None) -> str:
    """`publish_version` with its exports (see `exports`)."""
    from detector.model.artifact import publish_version

    return publish_version(model, card, name_uri, extra_files=exports(model, card, int8, pixels))
