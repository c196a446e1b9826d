"""The open-set rule: a generator is named only when the head is as sure as it was on the
validation images it named correctly; otherwise the answer is `unknown`."""

from __future__ import annotations

import numpy as np
import pytest

from detector.verdicts.attribution import KEEP, UNKNOWN, fit_threshold, name

pytestmark = pytest.mark.unit

CLASSES = ["mj", "sdxl", "flux"]


def test_the_threshold_keeps_the_stated_share_of_correctly_named_validation_images():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 400)
    logits = rng.normal(0, 1, (400, 3)) + 3 * np.eye(3)[truth]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rule = fit_threshold(probabilities, truth)
    correct = np.argmax(probabilities, axis=1) == truth
    kept = probabilities[correct].max(axis=1) >= rule["threshold"]
    assert rule["correct"] == correct.sum() and rule["images"] == 400
    assert rule["keep"] == KEEP and rule["fitted_on"] == "val"
    assert kept.mean() == pytest.approx(KEEP, abs=0.01)
    assert kept.mean() >= KEEP  # rounded down: never fewer kept than stated


def test_unsure_outputs_are_unknown_and_the_top_three_are_reported():
    rule = {"threshold": 0.7}
    sure = np.array([0.12, 0.8, 0.08])
    assert name(sure, CLASSES, rule) == ("sdxl", [
        {"generator": "sdxl", "score": pytest.approx(0.8)},
        {"generator": "mj", "score": pytest.approx(0.12)},
        {"generator": "flux", "score": pytest.approx(0.08)}])
    assert name(np.array([0.4, 0.35, 0.25]), CLASSES, rule)[0] == UNKNOWN
    assert name(sure, CLASSES, {})[0] == UNKNOWN  # no rule fitted: never a guess
    assert fit_threshold(np.zeros((0, 3)), []) == {}


def test_open_set_shares_add_up():
    from detector.training.attribution import attribution_metrics

    probabilities = np.array([[0.9, 0.05, 0.05], [0.1, 0.85, 0.05], [0.5, 0.3, 0.2],
                              [0.8, 0.1, 0.1]])
    metrics = attribution_metrics(["mj", "sdxl", "mj", "flux"], probabilities, CLASSES,
                                  {"threshold": 0.6})
    assert metrics["open_set"] == {"threshold": 0.6, "named_correctly": 0.5,
                                   "misattributed": 0.25, "unknown": 0.25}


def test_the_generator_rule_for_every_verdict():
    """Provenance naming a tool first; a real verdict names none; an unfamiliar image is
    unknown; a model without a head names none (an artifact from before attribution)."""
    from detector.verdicts.attribution import attribute
    from detector.verdicts.provenance import Evidence

    head, rule = np.array([0.05, 0.9, 0.05]), {"threshold": 0.5}
    named = Evidence("png-text", "generator-metadata", "strong", "A1111 parameters",
                     "AUTOMATIC1111")
    odd = Evidence("familiarity", "unfamiliar", "info", "format AVIF was never seen")
    camera = Evidence("exif", "camera", "weak", "camera Canon", None)
    assert attribute("ai-generated", [named], head, CLASSES, rule).generator == "AUTOMATIC1111"
    assert attribute("ai-generated", [camera], head, CLASSES, rule).generator == "sdxl"
    real = attribute("real", [camera], head, CLASSES, rule)
    assert (real.generator, real.scores, real.decided_by) == (None, real.scores, None)
    assert attribute("uncertain", [odd], head, CLASSES, rule).generator == UNKNOWN
    assert attribute("ai-generated", [], np.array([0.4, 0.35, 0.25]), CLASSES,
                     rule).generator == UNKNOWN
    binary = attribute("ai-generated", [], None, [], {})
    assert (binary.generator, binary.scores, binary.decided_by) == (None, None, None)
    # Weak provenance (a manifest changed after signing) never names it either.
    weak = Evidence("c2pa", "ai-source-type", "weak", "edited", "OpenAI")
    assert attribute("ai-generated", [weak], head, CLASSES, rule).decided_by == "classifier"
