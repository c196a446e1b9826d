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


def test_short_epochs_checkpoint_once_per_interval_with_the_best_weights_so_far():
    """Writing and registering a checkpoint took as long as an epoch of the sample data:
    short epochs checkpoint after the first, the last, and once per interval; each hook
    call carries the best epoch's weights, which the checkpoint stores."""
    import keras

    from detector.training.fit import FitSettings, fit
    from detector.training.train import CHECKPOINT_INTERVAL_S, checkpoint_due

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    rng = np.random.default_rng(1)
    data = (rng.integers(0, 256, (16, 4, 4, 3)).astype(np.uint8),
            rng.integers(0, 2, 16).astype(np.float32))
    epochs, seen = 40, []  # (epoch, final, improved, best weights) as each hook saw them

    def on_epoch_end(end) -> None:
        seen.append((end.state.epoch, end.final, end.improved, end.best_weights))

    fit(model, lambda: iter([data]), lambda: iter([data]),
        FitSettings(epochs=epochs, lr=1e-2, patience=epochs, lr_patience=epochs),
        on_epoch_end=on_epoch_end)
    assert [final for _, final, _, _ in seen] == [False] * (epochs - 1) + [True]
    best = None
    for _, _, improved, weights in seen:
        assert weights is not None
        best = weights if improved else best
        assert weights is best  # the improving epoch's weights until another improves

    class End:  # checkpoint_due reads `final` alone
        def __init__(self, final):
            self.final = final

    # Epochs 2 s apart: the first and the last checkpoint, and one per interval between.
    due, last = [], None
    for epoch, final, _, _ in seen:
        now = 2.0 * epoch
        if checkpoint_due(End(final), last, now):
            due.append(epoch)
            last = now
    every = int(CHECKPOINT_INTERVAL_S // 2)
    assert due == [1, *range(1 + every, epochs, every), epochs], due
