"""Model artifacts for tests, saved the way training publishes them: the weights, the card
and the ONNX export (int8 too on request), so that `backend="auto"` loads them on OpenVINO
as it loads a trained model. A scan's scoring actor or a Serve replica then never imports
TensorFlow (about 5 s of CPU and 700 MB each); tests of the Keras runtime ask for it."""

from __future__ import annotations

import numpy as np


def save_exported(model, card, uri: str, int8: bool = False) -> str:
    """`save_artifact` with the exports `card.exports` then names, their parity measured
    on random pixels (an untrained model has no test split to measure on)."""
    from detector.model.artifact import save_artifact
    from detector.model.export import export_into

    size = card.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)

    def exports(directory: str) -> None:
        card.exports.update(export_into(model, card, directory, pixels, None,
                                        calibration=pixels if int8 else None))

    return save_artifact(model, card, uri, extra_files=exports)
