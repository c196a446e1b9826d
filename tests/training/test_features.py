"""The frozen-base feature cache's pieces without Ray: the head split, the equivalence of
training on cached features, the cache key, optimizer resumes and safe `--resume`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import batches

pytestmark = pytest.mark.unit

SIZE = 32


def frozen_model(seed: int = 0):
    import keras

    from detector.model.architectures import build_model

    keras.utils.set_random_seed(seed)
    return build_model("resnet50v2_tiny_frozen", image_size=SIZE, weights="none")


def test_the_head_split_scores_like_the_whole_model_and_shares_its_weights():
    from detector.training import features

    model = frozen_model()
    layer = features.feature_layer("resnet50v2_tiny_frozen")
    assert layer == "gap"
    assert features.feature_layer("resnet50v2") == "gap"
    assert features.feature_layer("resnet50v2_tiny") is None  # trained end to end
    assert features.feature_layer("vit_tiny") is None
    base, head = features.split(model, layer)
    pixels = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3)).astype(np.float32)
    whole = np.asarray(model(pixels, training=False))
    assert np.allclose(np.asarray(head(base(pixels, training=False), training=False)), whole,
                       atol=1e-6)
    assert {id(w) for w in head.weights} <= {id(w) for w in model.weights}
    assert not base.trainable_weights  # nothing the head's training could move
    # A change to the head is a change to the model that gets published.
    head.layers[-1].kernel.assign(np.zeros(head.layers[-1].kernel.shape))
    assert not np.allclose(np.asarray(model(pixels, training=False)), whole)


def test_training_the_head_on_cached_features_trains_the_same_model(sample_arrays):
    """Same data, same order, same seeds: the cached path ends where the full path does.

    In float64. In float32 the base's features differ in their last bits between the
    pass that caches them and the pass inside a training step wherever a CPU's kernels
    sum in another order for another batch shape (so on an AVX2-only EPYC, not on the
    AVX-512 machines). Adam's first steps move each weight by about lr * sign(gradient),
    so a gradient near zero whose sign those last bits flip sends the two runs apart
    (loss 0.855 against 0.868 after 3 epochs). float64 rounding is 1e-16, far below
    what Adam's epsilon (1e-7) lets through: what is left to compare is the code."""
    import keras

    from detector.training import features
    from detector.training.fit import FitSettings, fit

    train_x, train_y, test_x, test_y = (a[:, :SIZE, :SIZE] if a.ndim == 4 else a
                                        for a in sample_arrays)
    settings = FitSettings(epochs=3, lr=3e-3, patience=9)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")  # the global policy, which outranks floatx
    try:
        full = frozen_model()
        full_state = fit(full, batches(train_x, train_y, 16, seed=1),
                         batches(test_x, test_y, 64), settings)

        cached = frozen_model()
        base, head = features.split(cached, "gap")
        train_f = np.asarray(base.predict(train_x.astype(np.float64), verbose=0))
        test_f = np.asarray(base.predict(test_x.astype(np.float64), verbose=0))
        cached_state = fit(head, batches(train_f, train_y, 16, seed=1),
                           batches(test_f, test_y, 64), settings)
        scores_full = np.asarray(full(test_x.astype(np.float64), training=False))
        scores_cached = np.asarray(cached(test_x.astype(np.float64), training=False))
    finally:
        keras.config.set_dtype_policy(policy)

    assert train_f.dtype == np.float64
    for a, b in zip(full_state.history, cached_state.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-6)
    assert np.abs(scores_full - scores_cached).max() < 1e-4


def key(**changes):
    from detector.training.features import CacheKey

    base = CacheKey(fingerprint="f", model="resnet50v2", image_size=224, weights="imagenet",
                    seed=42, preprocess_version=1, augment="none", views=1)
    return dataclasses.replace(base, **changes)


def test_the_cache_key_changes_with_everything_the_features_depend_on():
    from detector.config import TrainConfig
    from detector.training.features import views_of

    assert key().digest() == key().digest()
    for change in ({"fingerprint": "g"}, {"weights": "none"}, {"image_size": 128},
                   {"augment": "robust"}, {"views": 4}, {"seed": 1},
                   {"preprocess_version": 2}, {"model": "resnet50v2_tiny_frozen"}):
        assert key(**change).digest() != key().digest(), change
    plain = TrainConfig(data="d", model=("resnet50v2",), out="o", views=4)
    assert views_of(plain) == 1  # nothing augmented: one view is all there is
    assert views_of(dataclasses.replace(plain, augment="robust")) == 4


def test_a_resumed_fit_continues_the_optimizer_where_it_stopped(sample_arrays):
    """Stopped after 2 epochs and resumed for the third: Adam's step count and moments
    carry on, and the weights end where an uninterrupted run's do."""
    import keras

    from detector.training.fit import FitSettings, fit

    x = np.random.default_rng(0).normal(size=(96, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)

    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(
            keras.layers.Dense(4, activation="relu")(inputs)))

    settings = FitSettings(epochs=3, lr=1e-2, patience=9)
    straight = model()
    fit(straight, batches(x, y, 16, seed=1), batches(x, y, 96), settings)

    ends = []
    first = model()
    stopped = fit(first, batches(x, y, 16, seed=1), batches(x, y, 96),
                  dataclasses.replace(settings, epochs=2), on_epoch_end=ends.append)
    assert [h["optimizer_steps"] for h in stopped.history] == [6, 12]
    resumed = model()
    resumed.set_weights(first.get_weights())
    state = fit(resumed, batches(x, y, 16, seed=1), batches(x, y, 96), settings,
                state=stopped, optimizer_state=ends[-1].optimizer_state)
    assert [h["optimizer_steps"] for h in state.history] == [6, 12, 18]
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        assert np.allclose(a, b, atol=1e-6)

    restarted = model()  # what every resume did before: Adam from zero moments
    restarted.set_weights(first.get_weights())
    fit(restarted, batches(x, y, 16, seed=1), batches(x, y, 96), settings, state=stopped)
    assert not all(np.allclose(a, b, atol=1e-6) for a, b in
                   zip(straight.get_weights(), restarted.get_weights(), strict=True))

    with pytest.raises(ValueError, match="does not fit"):
        fit(model(), batches(x, y, 16), batches(x, y, 96), settings,
            optimizer_state=ends[-1].optimizer_state[:-1])


def test_resume_continues_only_a_run_with_the_same_shards_and_settings(tmp_path):
    from detector.config import TrainConfig
    from detector.training.train import start_run

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"fingerprint": "A"}))
    run = tmp_path / "out" / "_ray_runs" / "train-vit_tiny"
    cfg = TrainConfig(data=str(shards), model=("vit_tiny",), out=str(tmp_path / "out"),
                      resume=True)
    said = []

    def start(config):
        said.clear()
        start_run(config, "vit_tiny", 32, str(run), say=said.append)
        kept = (run / "checkpoint").exists()
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoint").write_text("epoch 3")
        return kept

    assert not start(cfg) and "no earlier run" in said[0]
    assert start(cfg) and not said  # same shards and settings: Ray Train resumes it
    assert start(dataclasses.replace(cfg, epochs=40, workers=4, patience=9)) and not said
    assert not start(dataclasses.replace(cfg, lr=1e-3)) and "other lr;" in said[0]
    assert start(cfg) is False  # back to the recorded settings: fresh after the change
    # Reviewed images weighed otherwise are other data; the default weight is no key, so
    # runs recorded before the setting existed still resume.
    assert not start(dataclasses.replace(cfg, review_weight=4))
    assert "other review_weight;" in said[0]
    assert not start(cfg) and "other review_weight;" in said[0]
    assert start(cfg) and not said
    assert not start(dataclasses.replace(cfg, resume=False)) and not said  # fresh, as asked
    (shards / "manifest.json").write_text(json.dumps({"fingerprint": "B"}))
    assert not start(cfg)
    assert "other fingerprint; starting fresh" in said[0]
    assert start(cfg) and not said


@pytest.mark.parametrize("policy", [
    "mixed_float16",
    # Trained in bfloat16 only where the CPU has it (runtimes.training_policy refuses it
    # elsewhere): TensorFlow's oneDNN capped at AVX2 has no bfloat16 convolution at all.
    pytest.param("mixed_bfloat16", marks=pytest.mark.requires_bf16),
])
def test_mixed_precision_training_learns_and_keeps_float32_weights(policy):
    """float16 trains through the loss-scaling optimizer; bfloat16 without it (this CPU
    emulates float16, so only correctness is checked here, never speed)."""
    import keras

    from detector.model.runtimes import with_dtype_policy
    from detector.training.fit import FitSettings, fit

    x = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    plain = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="score")(
        keras.layers.Dense(16, activation="relu")(inputs)))
    model = with_dtype_policy(plain, policy)
    ends = []
    state = fit(model, batches(x, y, 16, seed=1), batches(x, y, 128),
                FitSettings(epochs=8, lr=2e-2, patience=9), on_epoch_end=ends.append)
    assert state.history[-1]["val_accuracy"] > 0.9
    assert all(w.dtype == np.float32 for w in model.get_weights())
    scaled = policy == "mixed_float16"
    # Adam holds its step, rate and two moments per weight; LossScaleOptimizer adds its
    # scale and growth counter (saved in checkpoints like the rest).
    assert (len(ends[-1].optimizer_state) > 2 + 2 * len(model.trainable_weights)) == scaled
