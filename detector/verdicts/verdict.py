"""The one verdict rule, used by predict, serve and scan alike.

1. Strong AI provenance in the image's own bytes (a C2PA manifest or IPTC XMP declaring
   an AI digital source type, generator parameters, a generator's name as the creating
   software) decides: `ai-generated`, decided_by `provenance`.
2. Otherwise the classifier decides (decided_by `classifier`) on the calibrated
   probability: `uncertain` within `margin` of the threshold (the band fitted on the
   validation split, clamped so all three verdicts stay reachable: see
   `detector.verdicts.calibration`), else `ai-generated` at or above it and `real` below; and
   `uncertain` whenever a consistency check found the verdict flipping on a re-saved or
   resized copy (`detector.verdicts.consistency`, when asked for), or when the image lies
   outside the training data's formats and sizes (`detector.verdicts.familiarity`), or
   when a video's frames disagree (`detector.verdicts.frames`). A `real` verdict also
   needs the image's fine-scale noise to be like the real training images'
   (`detector.verdicts.residual`): an image unlike them is `uncertain` instead, as images
   of generators the classifier never saw are.

Weak evidence (camera EXIF, a manifest that fails validation) and a C2PA
`digitalCapture` claim are shown beside the verdict and never change it: metadata that
claims a camera is easy to write, while nobody adds an AI claim to pass as real.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from detector.verdicts.calibration import clamp_band
from detector.verdicts.consistency import disagrees
from detector.verdicts.familiarity import unfamiliar
from detector.verdicts.frames import mixed
from detector.verdicts.provenance import Evidence, decisive
from detector.verdicts.residual import unlike_real


def classify(score: float, threshold: float, margin: float) -> str:
    """The classifier's verdict for calibrated P(AI-generated) `score`. The band is
    clamped, so a card with a high threshold still reaches `ai-generated`."""
    if abs(score - threshold) < clamp_band(threshold, margin):
        return "uncertain"
    return "ai-generated" if score >= threshold else "real"


def decide(score: float, threshold: float, margin: float,
           evidence: Iterable[Evidence] = ()) -> tuple[str, str]:
    """(verdict, decided_by) for a decoded image's classifier score and its provenance
    evidence. An image that did not decode gets no verdict at all (its error instead)."""
    evidence = list(evidence)
    if decisive(evidence) is not None:
        return "ai-generated", "provenance"
    if disagrees(evidence) or unfamiliar(evidence) or mixed(evidence):
        return "uncertain", "classifier"
    verdict = classify(score, threshold, margin)
    if verdict == "real" and unlike_real(evidence):  # like no real image it was shown
        return "uncertain", "classifier"
    return verdict, "classifier"


class Thresholds(Protocol):
    """What a model card carries for the rule: its threshold and its uncertain band."""

    threshold: float
    uncertain_margin: float


def classify_for(card: Thresholds, score: float, threshold: float | None = None) -> str:
    """`classify` with the card's threshold (unless one is given) and band."""
    return classify(score, card.threshold if threshold is None else threshold,
                    card.uncertain_margin)


def decide_for(card: Thresholds, score: float, evidence: Iterable[Evidence] = (),
               threshold: float | None = None) -> tuple[str, str]:
    """`decide` with the card's threshold (unless one is given) and band."""
    return decide(score, card.threshold if threshold is None else threshold,
                  card.uncertain_margin, evidence)
