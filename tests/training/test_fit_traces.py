"""The training loop's own costs: how often it builds the model's graph."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.unit


def test_fit_traces_the_model_once_for_training_and_once_for_evaluation():
    """Every epoch ends in a smaller batch; a step traced per batch shape built the graph
    four times before the first epoch ended (seconds each for a ResNet on 2 cores)."""
    import keras

    from detector.training.fit import FitSettings, fit

    traces = []

    class Counted(keras.layers.Layer):  # Python in call() runs once per trace
        def call(self, x):
            traces.append(x.shape)
            return x

    inputs = keras.Input((4, 4, 3))
    features = keras.layers.GlobalAveragePooling2D()(Counted()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(features))
    built = len(traces)
    rng = np.random.default_rng(0)

    def batches(*sizes):
        def generate():
            for size in sizes:
                yield (rng.integers(0, 256, (size, 4, 4, 3)).astype(np.uint8),
                       rng.integers(0, 2, size).astype(np.float32))
        return generate

    state = fit(model, batches(8, 8, 3), batches(8, 2),
                FitSettings(epochs=3, lr=1e-3, patience=3, lr_patience=3))
    assert len(state.history) == 3
    assert len(traces) - built == 2, traces[built:]
