"""One Predictor for every consumer: `detector predict`, Ray Data scans and Ray Serve.

It owns the model and its card and turns uint8 pixel batches into P(AI-generated).
Decoding stays in `detector.preprocess`, so callers can decode in parallel elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from detector import consistency, preprocess, provenance, runtimes
from detector.artifact import ModelCard, load_card, resolve
from detector.calibration import Calibration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The outcome for one input: a score and verdict, or an error code."""

    score_ai: float | None
    verdict: str | None
    decided_by: str | None = None  # provenance | classifier (detector.verdict)
    evidence: list[dict] = field(default_factory=list)  # detector.provenance findings
    format: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    error_detail: str | None = None


class Predictor:
    """Scores batches of decoded images with a loaded model on one runtime."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], card: ModelCard,
                 batch_size: int = 32, runtime: str = "keras/float32"):
        self._forward = forward
        self.card = card
        self.batch_size = batch_size
        self.runtime = runtime  # "backend/precision", as resolved

    @classmethod
    def from_uri(cls, uri: str, batch_size: int = 32, backend: str = "auto",
                 precision: str = "float32", threads: int | None = None) -> Predictor:
        """Load the artifact at `uri` on the runtime `backend`/`precision` resolve to
        (see `detector.runtimes`); `threads`: the CPUs reserved for it (None: all)."""
        uri = resolve(uri)  # one version, even if training publishes another meanwhile
        card = load_card(uri)
        if card.architecture == "ensemble":  # members load here, each on its runtime
            from detector.ensemble import members_forward

            forward, runtime = members_forward(card, batch_size, backend, precision, threads)
            log.info("model %s@%s runs on %s", card.name, card.id, runtime)
            return cls(forward, card, batch_size=batch_size, runtime=runtime)
        choice = runtimes.resolve(card, backend, precision, uri)
        forward = runtimes.load(uri, choice, card, threads)
        log.info("model %s@%s runs on %s", card.name, card.id, choice)
        return cls(forward, card, batch_size=batch_size, runtime=str(choice))

    @classmethod
    def from_model(cls, model, card: ModelCard, batch_size: int = 32,
                   precision: str = "float32") -> Predictor:
        """A Predictor on an in-memory Keras model (training's own evaluation)."""
        return cls(keras_forward(model, card.image_size, precision), card,
                   batch_size=batch_size, runtime=f"keras/{precision}")

    @property
    def image_size(self) -> int:
        return self.card.image_size

    def score(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N,) P(AI-generated), calibrated when the card
        carries a calibration, in chunks of batch_size."""
        if len(pixels) == 0:
            return np.zeros((0,), dtype=np.float32)
        chunks = [
            self._forward(np.ascontiguousarray(pixels[i : i + self.batch_size],
                                               dtype=np.float32))
            for i in range(0, len(pixels), self.batch_size)
        ]
        raw = np.concatenate([np.asarray(c).reshape(-1) for c in chunks]).astype(np.float32)
        if self.card.calibration:  # the card's Platt scaling, fitted on validation
            return Calibration(self.card.calibration["a"], self.card.calibration["b"]).apply(raw)
        return raw

    def predict_bytes(self, blobs: Sequence[bytes], consistency: bool = False
                      ) -> list[Prediction]:
        """Decode and score raw files; undecodable ones come back with an error code.
        `consistency`: also score re-encoded copies (see `detector.consistency`)."""
        decoded: list[tuple[int, np.ndarray, preprocess.ImageInfo]] = []
        results: list[Prediction | None] = [None] * len(blobs)
        evidence = [provenance.inspect(blob) for blob in blobs]
        for i, blob in enumerate(blobs):
            try:
                pixels, info = preprocess.load_image(blob, self.image_size)
            except preprocess.ImageError as err:
                results[i] = Prediction(None, None, evidence=[e.to_dict() for e in evidence[i]],
                                        error=err.code, error_detail=err.detail)
                continue
            decoded.append((i, pixels, info))
        if decoded:
            images = np.stack([pixels for _, pixels, _ in decoded])
            scores = self.score(images)
            if consistency:
                self._check_consistency(images, scores, [evidence[i] for i, _, _ in decoded])
            for (i, _, info), score in zip(decoded, scores, strict=True):
                verdict, decided_by = self.card.decide(float(score), evidence[i])
                results[i] = Prediction(
                    float(score), verdict, decided_by, [e.to_dict() for e in evidence[i]],
                    info.format, info.width, info.height,
                )
        return results  # type: ignore[return-value]

    def _check_consistency(self, images: np.ndarray, scores: np.ndarray,
                           evidence: list[list]) -> None:
        """Score every image's re-encoded copies; add a finding where verdicts disagree."""
        copy_scores = consistency.copy_scores(images, self.score)
        for score, variant_scores, found in zip(scores, copy_scores, evidence, strict=True):
            flip = consistency.finding(self.card.verdict, float(score), variant_scores)
            if flip is not None:
                found.append(flip)


def keras_forward(model, image_size: int, precision: str = "float32"
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """The Keras model as a compiled forward function, in float32 or mixed bfloat16."""
    import tensorflow as tf

    if precision not in ("float32", "bfloat16"):
        raise runtimes.RuntimeUnavailable(f"keras runs float32 or bfloat16, not {precision}")
    if precision == "bfloat16":
        model = with_dtype_policy(model, "mixed_bfloat16")
    # A fixed signature compiles the graph once; a Python call per batch would pay
    # Keras' eager overhead every time (~4x slower on this CPU).
    compiled = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)],
        reduce_retracing=True,
    )
    return lambda pixels: np.asarray(compiled(pixels)).reshape(-1)


def with_dtype_policy(model, policy: str):
    """A copy of `model` whose layers compute in `policy` (e.g. mixed_bfloat16), with the
    same float32 weights. The output layers stay float32 so scores keep full precision.

    bfloat16 roughly doubles CPU inference on processors with AMX or AVX512-BF16 (and
    helps on Ampere+ GPUs); elsewhere it is emulated and slower, which `runtimes.resolve`
    refuses.
    """
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
