"""A video's score from its sampled frames' scores, and when its frames disagree.

The video's `score_ai` is the score that at least AI_SHARE of its frames reach (the
median at one half), so under the one verdict rule (`detector.verdicts.verdict`) a video
is `ai-generated` exactly when at least that share of its frames is confidently AI (at or
above the threshold's band). A video of which a smaller share, but at least MIXED_SHARE,
is confidently AI holds a generated segment among real ones, or fools the model in
places: it gets a `frames` finding and is `uncertain`, with the times of those frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from detector.verdicts.provenance import Evidence

AI_SHARE = 0.5  # of the frames confidently AI makes the video ai-generated
MIXED_SHARE = 0.2  # of the frames confidently AI, below AI_SHARE, makes it uncertain
SOURCE, KIND = "frames", "mixed"


@dataclass(frozen=True)
class FrameSummary:
    """What a video's frames say together."""

    score_ai: float
    worst_frame_s: float  # the time of the frame scored most likely AI
    finding: Evidence | None  # a `frames`/`mixed` finding, or None


def summarize(scores: Sequence[float], times_s: Sequence[float],
              verdict_of: Callable[[float], str]) -> FrameSummary:
    """The video's score, its worst frame and whether its frames disagree, from the
    frames' calibrated scores and times (`verdict_of(score)`: the classifier's verdict)."""
    scores = np.asarray(scores, dtype=np.float64)
    reach = max(1, math.ceil(AI_SHARE * len(scores)))  # frames that must reach the score
    score = float(np.sort(scores)[::-1][reach - 1])
    confident = [i for i, s in enumerate(scores) if verdict_of(float(s)) == "ai-generated"]
    share = len(confident) / len(scores)
    finding = None
    if share >= MIXED_SHARE and verdict_of(score) != "ai-generated":
        at = ", ".join(f"{times_s[i]:.1f}" for i in confident[:8])
        more = f" and {len(confident) - 8} more" if len(confident) > 8 else ""
        finding = Evidence(SOURCE, KIND, "info", f"{len(confident)} of {len(scores)} frames "
                           f"are confidently AI (at {at}{more} s), fewer than "
                           f"{AI_SHARE:.0%}: part of the video may be generated")
    return FrameSummary(score, float(times_s[int(np.argmax(scores))]), finding)


def mixed(evidence) -> bool:
    """True when `evidence` holds a `frames` disagreement."""
    return any(e.source == SOURCE and e.kind == KIND for e in evidence)
