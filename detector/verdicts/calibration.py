"""Calibrated probabilities and the "uncertain" band, both fitted on the validation split.

Calibration is Platt scaling on the model's logit, p = sigmoid(a * logit(s) + b), fitted
by scikit-learn's logistic regression on validation scores. It is monotone, so rankings
(ROC AUC) never change; it is kept only where it does not worsen the validation ECE,
else the identity is kept and the card says so. The card stores it, and the Predictor
applies it, so `score_ai` is the calibrated probability in predict, serve, scan and
evaluation alike.

The uncertain band is |p - threshold| < margin on the calibrated probability: the
narrowest margin that holds `ERROR_SHARE` of the validation errors, clamped so that all
three verdicts stay reachable (`clamp_band`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ERROR_SHARE = 0.5  # of the validation errors the uncertain band holds
EPSILON = 1e-6  # keeps logits finite at scores of exactly 0 or 1
CALIBRATION_BINS = 10  # equal-width bins of the ECE
MIN_MARGIN = 1e-3  # "uncertain" stays reachable at the threshold itself


@dataclass(frozen=True)
class Calibration:
    """p = sigmoid(a * logit(score) + b); the identity is a=1, b=0."""

    a: float = 1.0
    b: float = 0.0

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated float32 probabilities for raw float scores (the one place it's done)."""
        from scipy.special import expit, logit  # stable at the extremes

        raw = np.clip(np.asarray(scores, dtype=np.float64), EPSILON, 1 - EPSILON)
        return expit(self.a * logit(raw) + self.b).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)


def fit(labels: np.ndarray, scores: np.ndarray) -> tuple[Calibration, dict]:
    """Platt scaling fitted on (labels, raw scores); returns it (or the identity where it
    would raise the ECE) and a record of ECE and NLL before and after."""
    from scipy.special import logit
    from sklearn.linear_model import LogisticRegression

    raw = np.clip(np.asarray(scores, dtype=np.float64), EPSILON, 1 - EPSILON)
    logits = logit(raw).reshape(-1, 1)
    fitted = Calibration()
    if len(set(labels.tolist())) == 2:
        model = LogisticRegression(C=1e6).fit(logits, labels)  # ~unregularized: Platt
        fitted = Calibration(float(model.coef_[0][0]), float(model.intercept_[0]))
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
    """A margin that leaves `real` (at p = 0: margin <= threshold) and `ai-generated` (at
    p = 1: margin <= 1 - threshold) reachable; `uncertain` needs margin > 0, which fitted
    margins always are (a margin of 0 is a card's explicit "no band")."""
    return float(min(max(margin, 0.0), threshold, 1 - threshold))
