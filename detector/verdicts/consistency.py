"""Re-encode checks: a verdict that flips when the image is re-saved as JPEG 75 or shrunk
to half size and back is not one to act on.

Asked for with `--consistency` (predict, scan) or `?consistency=true` (HTTP): the same
image, perturbed as re-uploads perturb it, is scored too (3 forward passes instead of
one); when the classifier's verdicts disagree, the verdict is `uncertain` (see
`detector.verdicts.verdict`) and the evidence says which copy said what.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detector.data.augment import ROBUSTNESS_CHECKS
from detector.verdicts.provenance import Evidence

CHECKS = ("jpeg75", "resize0.5")  # the re-save and the resize re-uploads most often do
SOURCE, KIND = "consistency", "disagreement"


def variants(pixels: np.ndarray) -> list[np.ndarray]:
    """The perturbed copies of one model-ready uint8 image, in CHECKS order."""
    return [ROBUSTNESS_CHECKS[check](pixels) for check in CHECKS]


def copy_scores(images: np.ndarray, score) -> np.ndarray:
    """`score` (uint8 batch -> scores) of every image's copies in one batch: one row of
    CHECKS per image."""
    copies = np.stack([copy for image in images for copy in variants(image)])
    return np.asarray(score(copies)).reshape(len(images), len(CHECKS))


def finding(verdict_of, score: float, variant_scores: Sequence[float]) -> Evidence | None:
    """Evidence of disagreement between the original's classifier verdict and its copies'
    (`verdict_of(score) -> verdict`), or None when they all agree."""
    original = verdict_of(score)
    flipped = [(check, s, verdict_of(s)) for check, s in zip(CHECKS, variant_scores,
                                                             strict=True)
               if verdict_of(s) != original]
    if not flipped:
        return None
    copies = ", ".join(f"{check}: {verdict} ({s:.2f})" for check, s, verdict in flipped)
    return Evidence(SOURCE, KIND, "info", f"original: {original} ({score:.2f}); {copies}")


def disagrees(evidence) -> bool:
    """True when `evidence` holds a consistency disagreement."""
    return any(e.source == SOURCE and e.kind == KIND for e in evidence)
