"""Real images' fine-scale noise (`verdicts.residual`): a one-class model of the real
training images that every `detector sample` generator family falls outside, held-out
families included, and the rule that keeps it from calling them real."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tests.conftest import TINY_SIZE

pytestmark = pytest.mark.unit

FAMILIES = ("upsampler", "decoder-grid", "lowpass-tint", "latent-diffusion")


def sample_pixels(seed: int, count: int, family: str | None = None,
                  size: int = TINY_SIZE) -> np.ndarray:
    """`detector sample` images as the model sees them: encoded in the sample's formats,
    then decoded by preprocess (None: real photographs)."""
    from detector.data.sample import encode, make_image
    from detector.io.preprocess import load_image

    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        pixels = make_image(0 if family is None else 1, rng, (size, size), family=family)
        out.append(load_image(encode(pixels, ("JPEG", "PNG", "WEBP")[i % 3], rng), size)[0])
    return np.stack(out)


@pytest.fixture(scope="module")
def fitted():
    from detector.verdicts import residual

    record = residual.fit(residual.features(sample_pixels(1, 160)),
                          residual.features(sample_pixels(2, 60)))
    return residual.Model.from_card({"residual": record})


def test_features_are_finite_numbers_per_image_and_the_same_for_the_same_pixels():
    from detector.verdicts.residual import FEATURES, features

    pixels = sample_pixels(3, 4)
    values = features(pixels)
    assert values.shape == (4, FEATURES) and np.isfinite(values).all()
    np.testing.assert_array_equal(values, features(pixels.copy()))
    flat = features(np.full((1, 64, 64, 3), 128, np.uint8))  # no residual at all: the floor
    assert np.isfinite(flat).all()


def test_every_generator_family_is_unlike_the_reals_and_few_unseen_reals_are(fitted):
    """No family is in the fit: each stands for a generator the classifier never saw."""
    assert fitted.record["quantile"] == 0.99 and fitted.record["images"] == 160
    unseen_real = np.mean(fitted.distances(sample_pixels(4, 100)) > fitted.threshold)
    assert unseen_real <= 0.05, unseen_real  # 0.01 measured
    for family in FAMILIES:
        flagged = np.mean(fitted.distances(sample_pixels(5, 40, family)) > fitted.threshold)
        assert flagged >= 0.9, (family, flagged)  # 1.0 measured for each


def test_the_finding_says_why_and_a_card_without_the_model_flags_nothing(fitted):
    from detector.verdicts import residual

    fake = sample_pixels(6, 2, "upsampler")
    found = fitted.findings(fake)
    assert all(f is not None for f in found)
    assert (found[0].source, found[0].kind, found[0].strength) == \
        ("familiarity", "unlike-real", "info")
    assert found[0].detail.startswith("its fine-scale noise is unlike the real training")
    card_domain = {"formats": ["PNG"], "long_side": [48, 48], "residual": dict(fitted.record)}
    assert residual.check(card_domain, fake) == found
    assert residual.check({"formats": ["PNG"], "long_side": [48, 48]}, fake) == [None, None]
    assert residual.check({}, fake[:0]) == []
    few = residual.features(sample_pixels(7, 12))
    assert residual.fit(few, few) == {}  # too few reals to fit: nothing is flagged


def test_an_ensemble_keeps_the_model_only_when_every_member_has_the_same(fitted):
    from detector.verdicts.residual import same

    record = dict(fitted.record)
    assert same([{"residual": record}, {"residual": dict(record)}]) == record
    assert same([{"residual": record}, {}]) == {}
    assert same([{"residual": record}, {"residual": {**record, "threshold": 1.0}}]) == {}


def test_an_image_unlike_the_reals_is_never_called_real_and_its_generator_is_unknown(fitted):
    from detector.verdicts.attribution import attribute
    from detector.verdicts.provenance import Evidence
    from detector.verdicts.verdict import decide

    unlike = fitted.findings(sample_pixels(8, 1, "lowpass-tint"))[0]
    # Called real by the classifier: uncertain instead, and no known generator named.
    assert decide(0.02, 0.5, 0.05, [unlike]) == ("uncertain", "classifier")
    head = np.array([0.97, 0.03])
    named = attribute("uncertain", [unlike], head, ["upsampler", "decoder-grid"],
                      {"threshold": 0.9})
    assert named.generator == "unknown" and named.decided_by == "classifier"
    # Called AI: the finding agrees; the verdict and the head's name stand.
    assert decide(0.98, 0.5, 0.05, [unlike]) == ("ai-generated", "classifier")
    assert attribute("ai-generated", [unlike], head, ["upsampler", "decoder-grid"],
                     {"threshold": 0.9}).generator == "upsampler"
    # Like the reals: the classifier decides as before; provenance still decides first.
    assert decide(0.02, 0.5, 0.05, []) == ("real", "classifier")
    claim = Evidence("c2pa", "ai-source-type", "strong", "trainedAlgorithmicMedia")
    assert decide(0.02, 0.5, 0.05, [claim, unlike]) == ("ai-generated", "provenance")


def test_smoothed_reals_lose_their_noise_and_are_flagged_while_recompressed_ones_are_not(
        fitted):
    """The price, stated in the module: a real photograph smoothed (a 1 px Gaussian blur,
    as a denoiser does) has lost the noise the reals have and is flagged like a generator's
    image; one re-saved as a JPEG at quality 30 keeps enough of it."""
    reals = sample_pixels(9, 30)

    def resaved(pixels, **save) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", **save)
        return np.asarray(Image.open(buffer).convert("RGB"))

    def flagged(images) -> float:
        return float(np.mean(fitted.distances(np.stack(images)) > fitted.threshold))

    assert flagged(reals) <= 0.1  # 0.0 measured
    assert flagged([resaved(p, quality=30) for p in reals]) <= 0.1  # 0.02 measured
    smoothed = [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(1)))
                for p in reals]
    assert flagged(smoothed) >= 0.8  # 0.92 measured
