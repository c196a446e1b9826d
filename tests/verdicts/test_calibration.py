"""Calibrated probabilities and the uncertain band (`verdicts.calibration`, `verdicts.verdict`)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.unit


def test_all_three_verdicts_stay_reachable_for_any_fitted_threshold_and_margin():
    from detector.verdicts.calibration import MIN_MARGIN, clamp_band, clamp_threshold
    from detector.verdicts.verdict import classify

    rng = np.random.default_rng(0)
    extremes = [0.0, 1e-9, 0.5, 1 - 1e-9, 1.0]
    candidates = [*rng.uniform(0, 1, (5000, 2)), *[(t, m) for t in extremes for m in extremes]]
    for raw_threshold, raw_margin in candidates:
        threshold = clamp_threshold(raw_threshold)
        margin = clamp_band(threshold, max(raw_margin, MIN_MARGIN))  # as fitting does
        assert classify(0.0, threshold, margin) == "real"
        assert classify(1.0, threshold, margin) == "ai-generated"
        assert classify(threshold, threshold, margin) == "uncertain"
    # An old card's fixed band no longer hides a verdict: 0.93 +/- 0.1 reaches 1.0.
    assert classify(1.0, 0.93, 0.1) == "ai-generated"


def test_the_band_holds_the_stated_share_of_validation_errors():
    from detector.verdicts.calibration import uncertain_margin

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 4000)
    probabilities = np.clip(labels * 0.6 + rng.normal(0.2, 0.2, 4000), 0, 1)
    threshold = 0.5
    margin = uncertain_margin(labels, probabilities, threshold, share=0.5)
    wrong = (probabilities >= threshold) != labels.astype(bool)
    held = np.abs(probabilities[wrong] - threshold) < margin
    assert 0.5 <= held.mean() <= 0.51
    assert uncertain_margin(labels, probabilities, 0.97) == pytest.approx(0.03)  # clamped


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
