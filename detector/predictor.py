"""One Predictor for every consumer: `detector predict`, Ray Data scans and Ray Serve.

It owns the model and its card and turns uint8 pixel batches into P(AI-generated).
Decoding stays in `detector.preprocess`, so callers can decode in parallel elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detector import preprocess
from detector.artifact import ModelCard, load_artifact
from detector.config import PRECISIONS

log = logging.getLogger(__name__)


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

    def __init__(self, model, card: ModelCard, batch_size: int = 32,
                 precision: str = "float32"):
        import tensorflow as tf

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bfloat16":
            model = with_dtype_policy(model, "mixed_bfloat16")
        self.model = model
        self.card = card
        self.batch_size = batch_size
        self.precision = precision
        size = card.image_size
        # A fixed signature compiles the graph once; a Python call per batch would pay
        # Keras' eager overhead every time (~4x slower on this CPU).
        self._forward = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
            reduce_retracing=True,
        )

    @classmethod
    def from_uri(cls, uri: str, batch_size: int = 32, precision: str = "float32") -> Predictor:
        model, card = load_artifact(uri)
        return cls(model, card, batch_size=batch_size, precision=precision)

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


def with_dtype_policy(model, policy: str):
    """A copy of `model` whose layers compute in `policy` (e.g. mixed_bfloat16), with the
    same float32 weights. The output layers stay float32 so scores keep full precision.

    bfloat16 roughly doubles CPU inference on processors with AMX or AVX512-BF16 (and
    helps on Ampere+ GPUs); elsewhere it is emulated and slower, hence the warning.
    """
    if not _has_bf16_hardware():
        log.warning("precision bfloat16 requested, but this machine has neither a GPU nor a "
                    "CPU with AMX/AVX512-BF16: inference will be slower, not faster")
    config = model.get_config()
    outputs = config.get("output_layers") or []
    if outputs and isinstance(outputs[0], str):  # a single output is stored unwrapped
        outputs = [outputs]
    keep_float32 = {entry[0] for entry in outputs}

    def rewrite(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy":
                return {**node, "config": {**node["config"], "name": policy}}
            return {key: rewrite(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rewrite(value) for value in node]
        return node

    layers = [layer if layer.get("name") in keep_float32 else rewrite(layer)
              for layer in config["layers"]]
    clone = model.__class__.from_config({**config, "layers": layers})
    clone.set_weights(model.get_weights())
    return clone


def _has_bf16_hardware() -> bool:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return True
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
