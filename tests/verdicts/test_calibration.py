"""Calibrated probabilities and the uncertain band (`verdicts.calibration`, `verdicts.verdict`)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.unit


def test_all_three_verdicts_stay_reachable_for_any_fitted_threshold_and_margin():
    from detector.verdicts.calibration import (
        MIN_MARGIN,
        SCORE_FLOOR,
        clamp_band,
        clamp_threshold,
    )
    from detector.verdicts.verdict import classify

    rng = np.random.default_rng(0)
    extremes = [0.0, 1e-9, 0.5, 1 - 1e-9, 1.0]
    candidates = [*rng.uniform(0, 1, (5000, 2)), *[(t, m) for t in extremes for m in extremes]]
    # The surest scores a Predictor gives, as the float32 it gives them in.
    floor, ceiling = (float(np.float32(p)) for p in (SCORE_FLOOR, 1 - SCORE_FLOOR))
    for raw_threshold, raw_margin in candidates:
        threshold = clamp_threshold(raw_threshold)
        margin = clamp_band(threshold, max(raw_margin, MIN_MARGIN))  # as fitting does
        assert classify(floor, threshold, margin) == "real"
        assert classify(ceiling, threshold, margin) == "ai-generated"
        assert classify(threshold, threshold, margin) == "uncertain"
    # An old card's fixed band no longer hides a verdict: 0.93 +/- 0.1 reaches 1.0.
    assert classify(1.0, 0.93, 0.1) == "ai-generated"


def test_the_band_holds_the_stated_share_of_validation_errors():
    from detector.verdicts.calibration import BAND_ROOM, uncertain_margin

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 4000)
    probabilities = np.clip(labels * 0.6 + rng.normal(0.2, 0.2, 4000), 0, 1)
    threshold = 0.5
    margin = uncertain_margin(labels, probabilities, threshold, share=0.5)
    wrong = (probabilities >= threshold) != labels.astype(bool)
    held = np.abs(probabilities[wrong] - threshold) < margin
    assert 0.5 <= held.mean() <= 0.51
    # Clamped: the ceiling score (1 - SCORE_FLOOR) stays outside the band.
    assert uncertain_margin(labels, probabilities, 0.97) == pytest.approx(0.03 - BAND_ROOM)


def test_calibration_lowers_ece_keeps_ranking_and_reaches_every_score(trained_tiny,
                                                                      sample_arrays):
    from sklearn.metrics import roc_auc_score

    from detector.model.predictor import Predictor
    from detector.verdicts import calibration

    _, _, held_x, held_y = sample_arrays
    predictor = Predictor.from_uri(trained_tiny[0], backend="keras")
    raw = predictor.score(held_x)
    fitted, record = calibration.fit(held_y, raw)
    assert record["ece_after"] <= record["ece_before"]
    assert record["nll_after"] <= record["nll_before"] + 1e-9
    probabilities = fitted.apply(raw)
    assert roc_auc_score(held_y, probabilities) == pytest.approx(roc_auc_score(held_y, raw))
    # The Predictor applies the card's calibration: score_ai everywhere is calibrated.
    predictor.card.calibration = record
    np.testing.assert_allclose(predictor.score(held_x), probabilities, atol=1e-6)


def test_overconfident_scores_are_pulled_in():
    from detector.verdicts import calibration

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 2000)
    # Right 80% of the time, but always 99% sure.
    right = rng.uniform(size=2000) < 0.8
    scores = np.where(right == labels.astype(bool), 0.99, 0.01)
    fitted, record = calibration.fit(labels, scores)
    assert record["method"] == "platt" and record["ece_after"] < record["ece_before"] / 5
    assert fitted.apply(np.array([0.99]))[0] == pytest.approx(0.8, abs=0.03)


def test_a_separable_validation_split_keeps_the_fit_honest():
    """Every validation image on the right side: hard 0/1 targets let Platt's slope run
    away (scores of 1 - 1e-9 stay 1 - 1e-9); Platt's own smoothed targets stop at what
    N images can show, (N+ + 1) / (N+ + 2)."""
    from scipy.special import expit, logit
    from sklearn.linear_model import LogisticRegression

    from detector.verdicts import calibration

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], [30, 20])
    scores = np.where(labels == 1, 1 - 10 ** -rng.uniform(3, 9, 50), 10 ** -rng.uniform(3, 9, 50))
    logits = logit(calibration.bounded(scores)).reshape(-1, 1)
    hard = LogisticRegression(C=1e6).fit(logits, labels)
    assert expit(hard.decision_function(logits)).max() > 0.9999  # the runaway
    fitted = calibration.platt(labels, scores)
    top, bottom = fitted.apply(np.array([1.0, 0.0]))
    assert top == pytest.approx(21 / 22, abs=0.01) and bottom == pytest.approx(1 / 32, abs=0.01)
    assert calibration.platt(np.zeros(5, int), scores[:5]) == calibration.Calibration()


def test_no_classifier_only_score_is_surer_than_the_floor(tmp_path):
    """A model whose last layer saturates (raw scores of exactly 0 and 1, as a model
    shown something unlike its training data can give) scores within the floor and
    ceiling, with and without a calibration on its card, and still reaches `real` and
    `ai-generated`."""
    import keras

    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard
    from detector.model.predictor import Predictor
    from detector.verdicts.calibration import SCORE_FLOOR
    from detector.verdicts.verdict import classify_for

    model = build_model("vit_tiny", image_size=32)
    head = next(layer for layer in reversed(model.layers) if isinstance(layer, keras.layers.Dense))
    pixels = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for bias, expected, verdict in ((-1e4, SCORE_FLOOR, "real"),
                                    (1e4, 1 - SCORE_FLOOR, "ai-generated")):
        head.bias.assign(np.full(head.bias.shape, bias, dtype="float32"))
        for calibration in ({}, {"a": 2.0, "b": 0.5}):
            card = ModelCard(name="vit_tiny", architecture="vit", image_size=32,
                             preprocess_version=1, calibration=calibration)
            scores = Predictor.from_model(model, card).score(pixels)
            np.testing.assert_allclose(scores, expected, rtol=1e-6)
            assert {classify_for(card, float(s)) for s in scores} == {verdict}
