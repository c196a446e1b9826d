"""The output heads every architecture ends in: P(AI-generated), and optionally which
generator made it.

A binary model ends in `score_ai`, one sigmoid unit, as it always has. A model trained
with named generators ends in `Heads` instead: the same sigmoid and, beside it, a softmax
over the generators seen in training, as one (N, 1 + G) output whose column 0 is the
score. One output keeps every consumer of scores (runtimes, exports, the ensemble,
Grad-CAM) reading column 0 as before, carries the generator columns through ONNX and
OpenVINO unchanged, and keeps the head a chain of layers, which the feature cache cuts.
"""

from __future__ import annotations

import keras
from keras import layers, ops

SCORE_LAYER = "score_ai"


@keras.saving.register_keras_serializable(package="detector")
class Heads(layers.Layer):
    """[P(AI), P(generator 1 | AI), ..., P(generator G | AI)] from shared features."""

    def __init__(self, generators: int, **kwargs):
        super().__init__(**kwargs)
        self.generators = generators
        self.score = layers.Dense(1, activation="sigmoid", name="score")
        self.attribution = layers.Dense(generators, activation="softmax", name="attribution")

    def build(self, input_shape):
        self.score.build(input_shape)
        self.attribution.build(input_shape)

    def call(self, features):
        return ops.concatenate([self.score(features), self.attribution(features)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1 + self.generators)

    def get_config(self):
        return {**super().get_config(), "generators": self.generators}


def output_head(features, generators: int = 0):
    """The model's output from its last features: `score_ai` (binary, fewer than two
    generators: attribution needs a choice) or `Heads` over `generators` classes."""
    if generators < 2:
        return layers.Dense(1, activation="sigmoid", name=SCORE_LAYER)(features)
    return Heads(generators, name=SCORE_LAYER)(features)
