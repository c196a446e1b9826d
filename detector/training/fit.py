"""The training loop itself: a custom `strategy.run` + GradientTape loop.

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy (see DESIGN), so this loop
does what the notebook's callbacks did (early stopping on val loss, reduce-LR-on-plateau,
keep the best weights) by hand. It knows nothing about Ray: Ray Train workers call it
with their MultiWorkerMirroredStrategy and dataset shard; tests call it with the default
strategy and in-memory batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
# How much the attribution loss counts beside the binary one. Its cross-entropy is over G
# classes (log G at chance, 1.1 for 3) where the binary's is at most log 2, and it is
# masked to the share of images whose generator is known: 1 keeps both heads learning.
ATTRIBUTION_WEIGHT = 1.0


@dataclass(frozen=True)
class FitSettings:
    """Optimisation settings, defaults as in the notebook."""

    epochs: int = 20
    lr: float = 1e-4
    patience: int = 3  # early stopping on validation loss
    lr_patience: int = 2  # reduce-LR-on-plateau
    lr_factor: float = 0.5
    min_lr: float = 1e-7
    max_steps_per_epoch: int | None = None  # cap for smoke tests and benchmarks


@dataclass
class FitState:
    """Where training stands; saved with every checkpoint so a run can resume."""

    epoch: int = 0  # epochs completed
    lr: float = 1e-4
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    epochs_since_lr_change: int = 0
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FitState:
        return cls(**data)


@dataclass(frozen=True)
class EpochEnd:
    """Passed to the per-epoch hook: the state, and whether these weights are the best."""

    state: FitState
    improved: bool
    metrics: dict
    optimizer_state: list[np.ndarray] = field(default_factory=list)  # for the checkpoint
    best_weights: list | None = None  # the best epoch's so far, for the checkpoint
    epochs: int = 0  # the run's limit

    @property
    def final(self) -> bool:
        """True when no epoch follows (early stopping, or the last of `epochs`)."""
        return self.state.stopped_early or self.state.epoch >= self.epochs


def fit(
    model,
    train_batches: Batches,
    val_batches: Batches,
    settings: FitSettings,
    strategy=None,
    state: FitState | None = None,
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
    best_weights: list | None = None,
    optimizer_state: list[np.ndarray] | None = None,
) -> FitState:
    """Train `model` (built inside `strategy.scope()`) until early stopping or `epochs`.

    Labels are 0/1 per image, or for a model with an attribution head (N, 2) rows of
    (label, generator index): the index into the head's classes, -1 where the generator
    is unknown or the image real, which the attribution loss then skips.

    On return the model holds the best weights seen. `state` (and the `best_weights` and
    `optimizer_state` saved with it) resume a previous run whose current weights are
    already in `model`: Adam continues with its moments and step count, as if never stopped.
    """
    import keras
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    state = state or FitState(lr=settings.lr)
    with strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate=state.lr)
        if _computes_in_float16(model):  # small float16 gradients underflow to zero
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        if optimizer_state is not None:
            _restore_optimizer(optimizer, optimizer_state)

    def per_example_loss(labels, predictions):
        labels = tf.reshape(labels, (tf.shape(predictions)[0], -1))
        loss = keras.losses.binary_crossentropy(labels[:, :1], predictions[:, :1])
        if predictions.shape[-1] > 1:  # the attribution head: only where the generator is known
            index = labels[:, 1]
            known = tf.cast(index >= 0, loss.dtype)
            attribution = keras.losses.sparse_categorical_crossentropy(
                tf.maximum(index, 0), predictions[:, 1:])
            loss += ATTRIBUTION_WEIGHT * known * tf.cast(attribution, loss.dtype)
        return loss

    def train_replica(images, labels):
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            loss = tf.nn.compute_average_loss(per_example_loss(labels, predictions))
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)  # the loss scale, under float16; else as is
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    def eval_replica(images, labels):
        predictions = model(images, training=False)
        losses = per_example_loss(labels, predictions)
        binary = tf.reshape(labels, (tf.shape(predictions)[0], -1))[:, 0]
        hits = tf.cast(tf.equal(tf.cast(predictions[:, 0] >= 0.5, tf.float32), binary), tf.float32)
        return tf.reduce_sum(losses), tf.reduce_sum(hits), tf.cast(tf.size(binary), tf.float32)

    @_traced_once
    def train_step(images, labels):
        loss = strategy.run(train_replica, args=(images, labels))
        # Each replica already divided by the global batch: the sum is the batch mean.
        return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

    @_traced_once
    def eval_step(images, labels):
        sums = strategy.run(eval_replica, args=(images, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None) for s in sums]

    while state.epoch < settings.epochs and not state.stopped_early:
        started = time.perf_counter()
        train_loss, steps, seen = 0.0, 0, 0
        for images, labels in train_batches():
            # Summed on the device: float() here would wait for every step to finish.
            train_loss += train_step(_as_images(images), _as_labels(labels))
            steps += 1
            seen += len(labels)
            if settings.max_steps_per_epoch and steps >= settings.max_steps_per_epoch:
                break
        loss_sum, hits, count = 0.0, 0.0, 0.0
        for images, labels in val_batches():
            batch_loss, batch_hits, batch_count = eval_step(_as_images(images), _as_labels(labels))
            loss_sum, hits, count = loss_sum + batch_loss, hits + batch_hits, count + batch_count
        count = float(count)
        metrics = {
            "epoch": state.epoch + 1,
            "loss": float(train_loss) / max(steps, 1),
            "val_loss": float(loss_sum) / count if count else math.nan,
            "val_accuracy": float(hits) / count if count else math.nan,
            "lr": state.lr,
            "train_images": seen,
            "optimizer_steps": int(optimizer.iterations.numpy()),
            "seconds": time.perf_counter() - started,
        }
        improved = _update(state, metrics, settings)
        if improved:
            best_weights = model.get_weights()
        optimizer.learning_rate.assign(state.lr)
        if on_epoch_end is not None:
            on_epoch_end(EpochEnd(state, improved, metrics, optimizer_snapshot(optimizer),
                                  best_weights, settings.epochs))
    if best_weights is not None:
        model.set_weights(best_weights)
    return state


def _computes_in_float16(model) -> bool:
    return any(layer.dtype_policy.name == "mixed_float16" for layer in model.layers)


def optimizer_snapshot(optimizer) -> list[np.ndarray]:
    """Every optimizer variable (step count, moments) as arrays, in the optimizer's order."""
    return [np.asarray(variable.numpy()) for variable in optimizer.variables]


def _restore_optimizer(optimizer, values: list[np.ndarray]) -> None:
    variables = optimizer.variables
    shapes = [tuple(v.shape) for v in variables]
    if len(values) != len(variables) or shapes != [tuple(np.shape(v)) for v in values]:
        raise ValueError(
            f"the checkpoint's optimizer state ({len(values)} variables) does not fit this "
            f"model's optimizer ({len(variables)}): was it saved for another model?"
        )
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def _update(state: FitState, metrics: dict, settings: FitSettings) -> bool:
    """Early stopping and LR schedule bookkeeping, as the notebook's Keras callbacks did."""
    state.epoch += 1
    state.history.append(metrics)
    val_loss = metrics["val_loss"]
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss = val_loss
        state.best_epoch = state.epoch
        state.epochs_without_improvement = 0
        state.epochs_since_lr_change = 0
        return True
    state.epochs_without_improvement += 1
    state.epochs_since_lr_change += 1
    if state.epochs_since_lr_change >= settings.lr_patience:
        state.lr = max(state.lr * settings.lr_factor, settings.min_lr)
        state.epochs_since_lr_change = 0
    if state.epochs_without_improvement >= settings.patience:
        state.stopped_early = True
    return False


def _traced_once(step):
    """`step(images, labels)` as a tf.function traced once for every batch size.

    A plain tf.function traces again for each new shape it sees, and every epoch ends in
    a smaller batch: four traces of the model (training and evaluation, full and last
    batch) before the first epoch ends, each seconds of graph building and optimising."""
    import tensorflow as tf

    traced = {}

    def call(images, labels):
        key = (images.shape[1:], images.dtype, labels.shape[1:])
        if key not in traced:
            traced[key] = tf.function(step, input_signature=[
                tf.TensorSpec((None, *images.shape[1:]), images.dtype),
                tf.TensorSpec((None, *labels.shape[1:]), labels.dtype)])
        return traced[key](images, labels)

    return call


def _as_images(images):
    """Pixels (uint8) as float32; inputs already in floating point (features) as they are."""
    images = np.asarray(images)
    return images if np.issubdtype(images.dtype, np.floating) else images.astype(np.float32)


def _as_labels(labels):
    """0/1 labels as a float32 vector; (label, generator index) rows as (N, 2) float32."""
    labels = np.asarray(labels, dtype=np.float32)
    return labels if labels.ndim == 2 else labels.reshape(-1)
