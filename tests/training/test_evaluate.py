"""Metrics and threshold choice (from scikit-learn, on known inputs)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.unit


def test_threshold_sits_in_the_middle_of_a_clean_gap():
    from detector.training.evaluate import choose_threshold

    labels = np.array([0, 0, 0, 1, 1, 1])
    assert choose_threshold(labels, np.array([0.01, 0.05, 0.2, 0.8, 0.95, 0.99])) == \
        pytest.approx(0.5)
    noisy = np.array([0.1, 0.3, 0.6, 0.4, 0.7, 0.9])  # one real above one fake
    t = choose_threshold(labels, noisy)
    assert ((noisy >= t) == labels).mean() >= 5 / 6


def test_metrics_on_a_known_confusion_matrix():
    from detector.training.evaluate import compute_metrics

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.4, 0.8, 0.9, 0.95])
    m = compute_metrics(labels, scores, threshold=0.5)
    assert m["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(15 / 16)  # 15 of 16 (fake, real) pairs ordered
    # With 4 real images, FPR <= 1% means no false positive: the cut sits above the real
    # 0.7, where 3 of the 4 fakes (0.8, 0.9, 0.95) are caught.
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.75)
    # 10 bins: |label - score| per bin, weighted: (.1+.2+.3+.7 + .6+.2 + 2 x .075) / 8
    assert m["ece"] == pytest.approx(2.25 / 8)


def test_calibration_error_is_zero_for_calibrated_scores():
    from detector.verdicts.calibration import expected_calibration_error

    labels = np.array([1] * 7 + [0] * 3 + [1] * 2 + [0] * 8)
    scores = np.array([0.75] * 10 + [0.15] * 10)
    assert expected_calibration_error(labels, scores) == pytest.approx(0.05)


def test_a_target_fpr_policy_holds_that_rate_on_validation_and_catches_the_most():
    from detector.training.evaluate import choose_threshold, parse_policy

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 2000)
    scores = np.concatenate([rng.beta(2, 5, 2000), rng.beta(5, 2, 2000)])
    for target in (0.01, 0.05, 0.2):
        cut = choose_threshold(labels, scores, f"target-fpr:{target}")
        fpr = ((scores >= cut) & (labels == 0)).sum() / 2000
        assert fpr <= target
        lower = np.nextafter(np.max(scores[(labels == 0) & (scores < cut)]), -1)
        # The next lower real score would break the target: nothing more could be caught.
        assert ((scores >= lower) & (labels == 0)).sum() / 2000 > target
    balanced = choose_threshold(labels, scores)
    assert choose_threshold(labels, scores, "target-fpr:0.01") > balanced
    assert parse_policy("balanced") is None and parse_policy("target-fpr:0.01") == 0.01
    for bad in ("target-fpr:0", "target-fpr:1.5", "target-fpr:x", "fpr:0.01", "strict"):
        with pytest.raises(ValueError, match="target-fpr:X"):
            parse_policy(bad)


def test_the_written_evaluation_has_its_plots_and_predictions(tmp_path):
    """`EvaluationReport.write`: the JSON and text records, predictions.parquet, and the
    confusion matrix, ROC and reliability diagrams as PNGs that decode."""
    import pyarrow.parquet as pq
    from PIL import Image

    from detector.training.evaluate import Scored, build_report

    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1], 50)
    scores = np.clip(labels * 0.5 + rng.uniform(0, 0.5, 100), 0, 1).astype(np.float32)
    scored = Scored(labels=labels, scores=scores, formats=["PNG"] * 100,
                    uris=[f"/x/{i}.png" for i in range(100)], sha256=["0" * 64] * 100)
    build_report(scored, 0.5, "test").write(str(tmp_path))
    for name in ("confusion_matrix.png", "roc.png", "reliability.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 100, name
    assert pq.read_table(tmp_path / "predictions.parquet").num_rows == 100
    assert (tmp_path / "metrics.json").stat().st_size > 0
