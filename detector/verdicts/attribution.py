"""Naming the generator: the attribution head's answer, or an honest `unknown`.

The head is a softmax over the generators seen in training, so it names one of them for
every image, including images from a generator it never saw. The open-set rule names a
generator only when the head's top probability reaches a threshold fitted on validation:
the lowest top probability among the `KEEP` share of correctly named validation images
that the head is surest of (so about 1 - KEEP of images it would name correctly become
`unknown` too: the price of an honest answer elsewhere). Anything below: `unknown`.

`attribute` is the one rule predict, serve and scan use: provenance that names the tool
first, then the head.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from detector.data.shards import UNKNOWN
from detector.verdicts.familiarity import unfamiliar
from detector.verdicts.provenance import Evidence, named_generator
from detector.verdicts.residual import unlike_real

KEEP = 0.95  # the share of correctly named validation images the threshold keeps named
TOP = 3  # generator scores reported beside the name


def fit_threshold(probabilities: np.ndarray, truth: Sequence[int]) -> dict:
    """The rule's record for the card, from validation AI images of known generators:
    (N, G) head outputs and each image's class index."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.int64)
    if not len(truth):
        return {}
    top = probabilities.max(axis=1)
    correct = np.argmax(probabilities, axis=1) == truth
    # "lower": a value some image has, at or below which at least KEEP of them lie.
    threshold = float(np.quantile(top[correct], 1 - KEEP, method="lower")) \
        if correct.any() else 1.0
    # Rounded down, so no image the quantile keeps falls below the stored threshold.
    return {"threshold": math.floor(threshold * 1e6) / 1e6, "keep": KEEP, "fitted_on": "val",
            "images": len(truth), "correct": int(correct.sum())}


def name(probabilities: np.ndarray, classes: Sequence[str], rule: dict
         ) -> tuple[str, list[dict]]:
    """(the generator's name or `unknown`, the top scores as [{generator, score}]) for one
    image's head output."""
    order = np.argsort(probabilities)[::-1][:TOP]
    scores = [{"generator": classes[i], "score": float(probabilities[i])} for i in order]
    sure = rule and probabilities[order[0]] >= rule["threshold"]
    return (classes[order[0]] if sure else UNKNOWN), scores


@dataclass(frozen=True)
class Attribution:
    """Which generator made an image, as predict, serve and scan report it."""

    generator: str | None = None  # a name, `unknown`, or None (a `real` verdict, no head)
    scores: list[dict] | None = None  # the head's top TOP, [{generator, score}]
    decided_by: str | None = None  # provenance | classifier | None


def attribute(verdict: str, evidence: Iterable[Evidence], probabilities: np.ndarray | None,
              classes: Sequence[str], rule: dict) -> Attribution:
    """The generator for an image given its verdict, provenance evidence and the head's
    output (None for a model without one).

    1. Decisive provenance that names the tool names the generator (decided_by
       `provenance`), whatever the head says.
    2. A `real` verdict names none.
    3. Otherwise the head's answer under the open-set rule (`name`), except that an image
       outside the training domain (`detector.verdicts.familiarity`) is `unknown`: the
       head never saw its like either; and so is an `uncertain` one whose fine-scale noise
       is unlike the real images' (`detector.verdicts.residual`): like neither the reals
       nor, by its score, the generators the classifier knows. A model without a head
       names none.
    """
    evidence = list(evidence)
    scores = None
    head = probabilities is not None and len(classes) > 0
    if head:
        named, scores = name(np.asarray(probabilities), classes, rule)
    tool = named_generator(evidence)
    if tool is not None:
        return Attribution(tool, scores, "provenance")
    if verdict == "real" or not head:
        return Attribution()
    unseen = unfamiliar(evidence) or (verdict == "uncertain" and unlike_real(evidence))
    return Attribution(UNKNOWN if unseen else named, scores, "classifier")


class Classes(Protocol):
    """What a model card carries for the rule: its head's classes and open-set rule."""

    generators: list[str]
    attribution: dict


def attribute_for(card: Classes, verdict: str, evidence: Iterable[Evidence],
                  probabilities: np.ndarray | None) -> Attribution:
    """`attribute` with the card's generators and open-set rule."""
    return attribute(verdict, evidence, probabilities, card.generators, card.attribution)
