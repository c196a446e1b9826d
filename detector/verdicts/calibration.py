"""Calibrated probabilities and the "uncertain" band, both fitted on the validation split.

Calibration is Platt scaling on the model's logit, p = sigmoid(a * logit(s) + b), fitted
by scikit-learn's logistic regression on validation scores against Platt's own smoothed
targets ((N+ + 1) / (N+ + 2) for AI images, 1 / (N- + 2) for real ones): on a split the
classifier separates perfectly, hard 0/1 targets let the slope run away and the fit
promises certainty it never measured. It is monotone, so rankings (ROC AUC) never change;
it is kept only where it does not worsen the validation ECE, else the identity is kept
and the card says so. The card stores it, and the Predictor applies it, so `score_ai` is
the calibrated probability in predict, serve, scan and evaluation alike.

No classifier-only score is surer than SCORE_FLOOR either way: raw scores and calibrated
ones are held within [SCORE_FLOOR, 1 - SCORE_FLOOR]. A few hundred validation images
cannot support "1e-27": an image unlike anything in training (another generator, another
size) got that from a model that had only ever seen its own sample.

The uncertain band is |p - threshold| < margin on the calibrated probability: the
narrowest margin that holds `ERROR_SHARE` of the validation errors, clamped so that all
three verdicts stay reachable (`clamp_band`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ERROR_SHARE = 0.5  # of the validation errors the uncertain band holds
EPSILON = 1e-6  # keeps logits finite at scores of exactly 0 or 1
SCORE_FLOOR = 1e-4  # the surest a classifier-only score may be, either way
# How far a band stays from the floor and ceiling (twice the floor: float32 rounding at
# 1 - SCORE_FLOOR must not land a ceiling score inside the band).
BAND_ROOM = 2 * SCORE_FLOOR
CALIBRATION_BINS = 10  # equal-width bins of the ECE
MIN_MARGIN = 1e-3  # "uncertain" stays reachable at the threshold itself


@dataclass(frozen=True)
class Calibration:
    """p = sigmoid(a * logit(score) + b); the identity is a=1, b=0."""

    a: float = 1.0
    b: float = 0.0

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated float32 probabilities for raw float scores, both held within the
        floor and ceiling (the one place it's done; the identity only bounds)."""
        from scipy.special import expit, logit  # stable at the extremes

        return bounded(expit(self.a * logit(bounded(scores)) + self.b)).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)


def bounded(scores: np.ndarray) -> np.ndarray:
    """Scores held within [SCORE_FLOOR, 1 - SCORE_FLOOR], as float64."""
    return np.clip(np.asarray(scores, dtype=np.float64), SCORE_FLOOR, 1 - SCORE_FLOOR)


def platt(labels: np.ndarray, scores: np.ndarray) -> Calibration:
    """Platt scaling of raw `scores` against Platt's smoothed targets (the identity where
    `labels` hold one class only)."""
    from scipy.special import logit
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels).astype(int)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if not positives or not negatives:
        return Calibration()
    targets = np.where(labels == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    # Log loss against a soft target t is t * loss(1) + (1 - t) * loss(0): each image
    # enters once as AI with weight t and once as real with weight 1 - t.
    logits = np.tile(logit(bounded(scores)), 2).reshape(-1, 1)
    classes = np.repeat([1, 0], len(labels))
    weights = np.concatenate([targets, 1 - targets])
    model = LogisticRegression(C=1e6).fit(logits, classes, sample_weight=weights)
    return Calibration(float(model.coef_[0][0]), float(model.intercept_[0]))


def fit(labels: np.ndarray, scores: np.ndarray) -> tuple[Calibration, dict]:
    """Platt scaling fitted on (labels, raw scores); returns it (or the identity where it
    would raise the ECE) and a record of ECE and NLL before and after."""
    raw = bounded(scores)
    fitted = platt(labels, raw)
    before, after = quality(labels, raw), quality(labels, fitted.apply(raw))
    kept = after["ece"] <= before["ece"]
    chosen = fitted if kept else Calibration()
    record = {"method": "platt" if kept else "identity", **chosen.to_dict(),
              "fitted_on": "val", "images": len(labels),
              "ece_before": before["ece"], "ece_after": after["ece"] if kept else before["ece"],
              "nll_before": before["nll"], "nll_after": after["nll"] if kept else before["nll"]}
    return chosen, record


def quality(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """ECE (10 equal-width bins) and negative log-likelihood of probabilities."""
    from sklearn.metrics import log_loss

    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPSILON, 1 - EPSILON)
    return {"ece": round(expected_calibration_error(labels, p), 6),
            "nll": round(float(log_loss(labels, p, labels=[0, 1])), 6)}


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean |observed frequency - mean score| over equal-width bins, weighted by size."""
    bins = np.minimum((scores * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    total = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        total += in_bin.sum() * abs(labels[in_bin].mean() - scores[in_bin].mean())
    return float(total / len(labels))


def uncertain_margin(labels: np.ndarray, probabilities: np.ndarray, threshold: float,
                     share: float = ERROR_SHARE) -> float:
    """The narrowest band around `threshold` holding `share` of the validation errors,
    clamped (`clamp_band`)."""
    wrong = (probabilities >= threshold) != labels.astype(bool)
    distances = np.sort(np.abs(probabilities[wrong] - threshold))
    margin = float(distances[int(np.ceil(share * len(distances))) - 1]) + EPSILON \
        if len(distances) else MIN_MARGIN
    return clamp_band(threshold, max(margin, MIN_MARGIN))


def clamp_threshold(threshold: float) -> float:
    """A threshold strictly inside (0, 1), where both sides of it can be reached."""
    return float(min(max(threshold, MIN_MARGIN), 1 - MIN_MARGIN))


def clamp_band(threshold: float, margin: float) -> float:
    """A margin that leaves `real` (at the floor) and `ai-generated` (at the ceiling)
    reachable; `uncertain` needs margin > 0, which fitted margins always are (a margin of
    0 is a card's explicit "no band")."""
    return float(max(min(margin, threshold - BAND_ROOM, 1 - threshold - BAND_ROOM), 0.0))
