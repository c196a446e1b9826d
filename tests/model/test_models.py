"""Registered architectures: shapes, parameter counts, serialisation, learning."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.unit


def trainable_params(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_resnet50v2_has_the_notebooks_frozen_base_and_head():
    from detector.model.architectures import build_model

    model = build_model("resnet50v2", weights="none")
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 1)
    # GAP(2048) -> 256 -> BN -> 128 -> BN -> 1: the notebook's ~558k trainable parameters.
    assert trainable_params(model) == 2048 * 256 + 256 + 2 * 256 + 256 * 128 + 128 + 2 * 128 + 129
    assert trainable_params(model) == 558_337
    assert model.count_params() > 23_000_000  # the frozen ResNet50V2 base is really there


def test_vit_matches_the_notebooks_architecture():
    from detector.model.architectures import build_model

    model = build_model("vit")
    dim, tokens, mlp = 384, 14 * 14 + 1, 1536
    block = 2 * 2 * dim + 4 * (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    expected = (16 * 16 * 3 * dim + dim) + dim + tokens * dim + 6 * block + 2 * dim \
        + (dim * 512 + 512) + 513
    assert trainable_params(model) == expected == 11_216_513


@pytest.mark.parametrize("name", ["resnet50v2_tiny", "vit_tiny"])
def test_small_variants_output_probabilities(name):
    from detector.model.architectures import build_model

    model = build_model(name, image_size=32)
    out = model(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)).astype("float32"))
    out = np.asarray(out)
    assert out.shape == (3, 1)
    assert np.all((out > 0) & (out < 1))


def test_unknown_model_names_the_known_ones():
    from detector.model.architectures import build_model

    with pytest.raises(KeyError, match="vit_tiny"):
        build_model("resnet9000")


def test_vit_rejects_sizes_that_do_not_tile_into_patches():
    from detector.model.architectures import build_model

    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model("vit", image_size=100)


def test_imagenet_weights_need_the_full_architecture():
    from detector.model.architectures import build_model

    with pytest.raises(ValueError, match="ImageNet weights"):
        build_model("resnet50v2_tiny", weights="imagenet")


def test_resnet_base_loads_a_weights_file(tmp_path):
    """How clusters without internet get ImageNet weights: a local (or s3://) file."""
    from detector.model.architectures.resnet50v2 import build_base

    source = build_base(32, weights="none")
    path = str(tmp_path / "base.weights.h5")
    source.save_weights(path)
    loaded = build_base(32, weights=path)
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tiny_model_learns_sample_traces(sample_arrays, trained_tiny):
    """Loss falls and held-out accuracy clearly beats chance on `detector sample` data."""
    _, state = trained_tiny
    history = state.history
    assert history[-1]["loss"] < history[0]["loss"] * 0.8
    best = max(h["val_accuracy"] for h in history)
    assert best >= 0.8, history

