"""One Predictor for every consumer: `detector predict`, Ray Data scans and Ray Serve.

It owns the model and its card and turns uint8 pixel batches into P(AI-generated).
Decoding stays in `detector.preprocess`, so callers can decode in parallel elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detector import preprocess
from detector.artifact import ModelCard, load_artifact


@dataclass(frozen=True)
class Prediction:
    """The outcome for one input: a score and verdict, or an error code."""

    score_ai: float | None
    verdict: str | None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    error_detail: str | None = None


class Predictor:
    """Scores batches of decoded images with a loaded model."""

    def __init__(self, model, card: ModelCard, batch_size: int = 32):
        import tensorflow as tf

        self.model = model
        self.card = card
        self.batch_size = batch_size
        size = card.image_size
        # A fixed signature compiles the graph once; a Python call per batch would pay
        # Keras' eager overhead every time (~4x slower on this CPU).
        self._forward = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
            reduce_retracing=True,
        )

    @classmethod
    def from_uri(cls, uri: str, batch_size: int = 32) -> Predictor:
        model, card = load_artifact(uri)
        return cls(model, card, batch_size=batch_size)

    @property
    def image_size(self) -> int:
        return self.card.image_size

    def score(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N,) P(AI-generated), in chunks of batch_size."""
        if len(pixels) == 0:
            return np.zeros((0,), dtype=np.float32)
        chunks = [
            self._forward(np.asarray(pixels[i : i + self.batch_size], dtype=np.float32))
            for i in range(0, len(pixels), self.batch_size)
        ]
        return np.concatenate([np.asarray(c).reshape(-1) for c in chunks]).astype(np.float32)

    def predict_bytes(self, blobs: Sequence[bytes]) -> list[Prediction]:
        """Decode and score raw files; undecodable ones come back with an error code."""
        decoded: list[tuple[int, np.ndarray, preprocess.ImageInfo]] = []
        results: list[Prediction | None] = [None] * len(blobs)
        for i, blob in enumerate(blobs):
            try:
                pixels, info = preprocess.load_image(blob, self.image_size)
            except preprocess.ImageError as err:
                results[i] = Prediction(None, None, error=err.code, error_detail=err.detail)
                continue
            decoded.append((i, pixels, info))
        if decoded:
            scores = self.score(np.stack([pixels for _, pixels, _ in decoded]))
            for (i, _, info), score in zip(decoded, scores, strict=True):
                results[i] = Prediction(
                    float(score), self.card.verdict(float(score)), info.format, info.width,
                    info.height,
                )
        return results  # type: ignore[return-value]
