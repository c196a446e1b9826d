"""A video's verdict from its sampled frames' scores: the one rule predict, serve and a
scan all apply, so the same video gets the same answer everywhere.

The frames' scores make the video's score and any `frames` finding
(`detector.verdicts.frames`); the one verdict rule (`detector.verdicts.verdict`) decides
on that score and the container's provenance; the attribution head's output for the
frame scored most likely AI names the generator (`detector.verdicts.attribution`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detector.verdicts import frames
from detector.verdicts.attribution import Attribution, attribute_for
from detector.verdicts.provenance import Evidence
from detector.verdicts.verdict import classify_for, decide_for


@dataclass(frozen=True)
class VideoVerdict:
    """What a video's frames and provenance decide."""

    score_ai: float
    verdict: str
    decided_by: str
    evidence: list[Evidence]  # the container's findings, then a `frames` finding if any
    named: Attribution
    worst_frame_s: float
    frame_scores: list[float]  # each frame's score, rounded as answers and reports give it
    frame_times_s: list[float]

    def fields(self) -> dict:
        """The decision as predict's answer, the HTTP answer and a report row give it."""
        named = self.named
        return {"score_ai": self.score_ai, "verdict": self.verdict,
                "decided_by": self.decided_by,
                "evidence": [e.to_dict() for e in self.evidence],
                "generator": named.generator, "generator_scores": named.scores,
                "generator_decided_by": named.decided_by, "frame_scores": self.frame_scores,
                "frame_times_s": self.frame_times_s, "worst_frame_s": self.worst_frame_s}


def decide_video(card, scores: Sequence[float], times_s: Sequence[float],
                 heads: Sequence[np.ndarray] | np.ndarray | None,
                 evidence: Sequence[Evidence], threshold: float | None = None
                 ) -> VideoVerdict:
    """The verdict of a video whose frames at `times_s` scored `scores` (calibrated), with
    the attribution head's outputs per frame (`heads`, or None without a head), under
    the card's threshold unless `threshold` is given."""
    summary = frames.summarize(scores, times_s,
                               functools.partial(classify_for, card, threshold=threshold))
    evidence = [*evidence, *([summary.finding] if summary.finding else [])]
    verdict, decided_by = decide_for(card, summary.score_ai, evidence, threshold)
    worst = int(np.argmax(np.asarray(scores)))
    named = attribute_for(card, verdict, evidence,
                          None if heads is None else np.asarray(heads[worst]))
    return VideoVerdict(summary.score_ai, verdict, decided_by, evidence, named,
                        summary.worst_frame_s, [round(float(s), 6) for s in scores],
                        [round(float(t), 3) for t in times_s])
