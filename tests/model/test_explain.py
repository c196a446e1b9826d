"""Explanations (detector.model.explain): Grad-CAM points where the trace is; rollout is sane."""

import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.unit

SIZE = 64
BOX = (0, 0, 32, 32)  # fakes carry generator traces only in the top-left quadrant


def images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from detector.data.sample import make_image

    rng = np.random.default_rng(seed)
    pixels = [make_image(label, rng, (SIZE, SIZE), BOX) for label in (0, 1)
              for _ in range(per_class)]
    return np.stack(pixels), np.repeat(np.array([0, 1], np.float32), per_class)


def test_grad_cam_is_highest_where_the_trace_is():
    """Train resnet50v2_tiny on fakes whose traces sit in one quadrant: its Grad-CAM on
    held-out fakes must light that quadrant (4x4 grid: the top-left 2x2 cells)."""
    import keras

    from detector.model.architectures import build_model
    from detector.model.explain import Explainer

    # 320 a class: with 160 the trace, a quarter of each fake, was learnt or not depending
    # on the CPU's kernels (0.82 test accuracy on a Zen 4 EPYC); 320 learnt it on every
    # seed tried there (0.96-1.00, Grad-CAM inside/outside 2.1-3.4x).
    x, y = images(320, seed=1)
    test_x, test_y = images(40, seed=2)
    keras.utils.set_random_seed(0)
    model = build_model("resnet50v2_tiny", image_size=SIZE)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=16, verbose=0)
    accuracy = model.evaluate(test_x, test_y, verbose=0)[1]
    assert accuracy >= 0.85, f"the model did not learn the trace ({accuracy:.2f})"

    explainer = Explainer(model, "resnet50v2")
    fakes = test_x[test_y == 1]
    heat = explainer.heatmaps(fakes)
    assert explainer.method == "grad-cam" and heat.shape == (len(fakes), 4, 4)
    assert heat.min() >= 0 and heat.max() <= 1
    inside = heat[:, :2, :2].mean(axis=(1, 2))
    outside = (heat.sum(axis=(1, 2)) - heat[:, :2, :2].sum(axis=(1, 2))) / 12
    assert inside.mean() > 1.5 * outside.mean(), heat.mean(axis=0)
    assert (inside > outside).mean() >= 0.75
    # Explaining never changes the score.
    before = model.predict(fakes[:4], verbose=0)
    explainer.heatmaps(fakes[:4])
    assert np.array_equal(before, model.predict(fakes[:4], verbose=0))


def test_attention_rollout_maps_the_patch_grid_and_depends_on_the_input():
    from detector.model.architectures import build_model
    from detector.model.explain import Explainer

    model = build_model("vit_tiny", image_size=SIZE)
    x, _ = images(2, seed=3)
    explainer = Explainer(model, "vit")
    heat = explainer.heatmaps(x)
    assert explainer.method == "attention-rollout"
    assert heat.shape[0] == 4 and heat.shape[1] == heat.shape[2] > 1
    assert heat.min() >= 0 and heat.max() == pytest.approx(1)
    assert not np.allclose(heat[0], heat[2])


def test_overlay_keeps_the_input_aspect_ratio_and_decodes_as_png():
    from detector.data.sample import make_image
    from detector.model.explain import MAX_OVERLAY_SIDE, overlay_png

    wide = make_image(1, np.random.default_rng(4), (1000, 500))
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="JPEG")
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1
    png = overlay_png(buffer.getvalue(), heat)
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.size == (MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE // 2)
    other = overlay_png(buffer.getvalue(), heat[::-1, ::-1].copy())
    assert png != other
