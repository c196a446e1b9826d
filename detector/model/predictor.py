"""One Predictor for every consumer: `detector predict`, Ray Data scans and Ray Serve.

It owns the model and its card and turns uint8 pixel batches into P(AI-generated).
Decoding stays in `detector.io.preprocess`, so callers can decode in parallel elsewhere.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from detector.io import preprocess, video
from detector.model import runtimes
from detector.model.artifact import ModelCard, load_card, resolve
from detector.model.ensemble import is_ensemble
from detector.verdicts import attribution, consistency, familiarity, provenance, residual
from detector.verdicts.calibration import Calibration
from detector.verdicts.verdict import classify_for, decide_for
from detector.verdicts.video import decide_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The outcome for one input: a score and verdict, or an error code."""

    score_ai: float | None
    verdict: str | None
    decided_by: str | None = None  # provenance | classifier (detector.verdicts.verdict)
    evidence: list[dict] = field(default_factory=list)  # detector.verdicts.provenance findings
    format: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    error_detail: str | None = None
    # Which generator made it (detector.verdicts.attribution): a name, `unknown`, or None
    generator: str | None = None
    generator_scores: list[dict] | None = None  # the attribution head's top 3
    generator_decided_by: str | None = None  # provenance | classifier


@dataclass(frozen=True)
class VideoPrediction(Prediction):
    """A video's outcome: its frames' scores summed up (`detector.verdicts.frames`)."""

    media: str = "video"
    duration_s: float | None = None
    frames_scored: int | None = None
    frame_scores: list[float] | None = None
    frame_times_s: list[float] | None = None
    worst_frame_s: float | None = None


class Predictor:
    """Scores batches of decoded images with a loaded model on one runtime."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], card: ModelCard,
                 batch_size: int = 32, runtime: str = "keras/float32"):
        self._forward = forward
        self.card = card
        self.batch_size = batch_size
        self.runtime = runtime  # "backend/precision", as resolved

    @classmethod
    def from_uri(cls, uri: str, batch_size: int = 32, backend: str = "auto",
                 precision: str = "float32", threads: int | None = None) -> Predictor:
        """Load the artifact at `uri` on the runtime `backend`/`precision` resolve to
        (see `detector.model.runtimes`); `threads`: the CPUs reserved for it (None: all)."""
        uri = resolve(uri)  # one version, even if training publishes another meanwhile
        card = load_card(uri)
        if is_ensemble(card):  # members load here, each on its runtime
            forward, runtime = members_forward(card, batch_size, backend, precision, threads)
            log.info("model %s@%s runs on %s", card.name, card.id, runtime)
            return cls(forward, card, batch_size=batch_size, runtime=runtime)
        choice = runtimes.resolve(card, backend, precision, uri)
        forward = runtimes.load(uri, choice, card, threads)
        log.info("model %s@%s runs on %s", card.name, card.id, choice)
        return cls(forward, card, batch_size=batch_size, runtime=str(choice))

    @classmethod
    def from_model(cls, model, card: ModelCard, batch_size: int = 32,
                   precision: str = "float32") -> Predictor:
        """A Predictor on an in-memory Keras model (training's own evaluation)."""
        return cls(runtimes.keras_forward(model, card.image_size, precision), card,
                   batch_size=batch_size, runtime=f"keras/{precision}")

    @property
    def image_size(self) -> int:
        return self.card.image_size

    def score(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N,) P(AI-generated), calibrated when the card
        carries a calibration and within the floor and ceiling (`calibration.SCORE_FLOOR`)
        always, in chunks of batch_size."""
        return self.score_and_attribute(pixels)[0]

    def score_and_attribute(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(scores as `score` gives them, P(generator | AI) float32 (N, G) in the order of
        `card.generators`, or None for a model without an attribution head), from one
        forward pass."""
        if len(pixels) == 0:
            return np.zeros((0,), dtype=np.float32), None
        chunks = [
            self._forward(np.ascontiguousarray(pixels[i : i + self.batch_size],
                                               dtype=np.float32))
            for i in range(0, len(pixels), self.batch_size)
        ]
        # Forwards give (n, K) rows (an ensemble's, (n,) means): column 0 is the score.
        raw = np.concatenate([np.asarray(c, dtype=np.float32).reshape(len(c), -1)
                              for c in chunks])
        calibration = self.card.calibration  # Platt scaling fitted on validation, if any
        fitted = Calibration(calibration["a"], calibration["b"]) if calibration \
            else Calibration()  # the identity still holds scores within the floor and ceiling
        attribution = raw[:, 1:] if raw.shape[1] > 1 and self.card.generators else None
        return fitted.apply(raw[:, 0]), attribution

    def predict_bytes(self, blobs: Sequence[bytes], consistency: bool = False
                      ) -> list[Prediction]:
        """Decode and score raw files; undecodable ones come back with an error code.
        `consistency`: also score re-encoded copies (see `detector.verdicts.consistency`)."""
        decoded: list[tuple[int, np.ndarray, preprocess.ImageInfo]] = []
        results: list[Prediction | None] = [None] * len(blobs)
        evidence = [provenance.inspect(blob) for blob in blobs]
        for i, blob in enumerate(blobs):
            if video.looks_like_video(blob[:16]):
                results[i] = self.predict_video(blob, evidence[i])
                continue
            try:
                pixels, info = preprocess.load_image(blob, self.image_size)
            except preprocess.ImageError as err:
                results[i] = Prediction(None, None, evidence=[e.to_dict() for e in evidence[i]],
                                        error=err.code, error_detail=err.detail)
                continue
            decoded.append((i, pixels, info))
            flag = familiarity.check(self.card.domain, info.format, info.width, info.height)
            evidence[i] += [flag] if flag else []
        if decoded:
            images = np.stack([pixels for _, pixels, _ in decoded])
            for (i, _, _), found in zip(decoded, residual.check(self.card.domain, images),
                                        strict=True):
                evidence[i] += [found] if found else []
            scores, heads = self.score_and_attribute(images)
            if consistency:
                self._check_consistency(images, scores, [evidence[i] for i, _, _ in decoded])
            for row, ((i, _, info), score) in enumerate(zip(decoded, scores, strict=True)):
                verdict, decided_by = decide_for(self.card, float(score), evidence[i])
                named = attribution.attribute_for(self.card, verdict, evidence[i],
                                                  None if heads is None else heads[row])
                results[i] = Prediction(
                    float(score), verdict, decided_by, [e.to_dict() for e in evidence[i]],
                    info.format, info.width, info.height, generator=named.generator,
                    generator_scores=named.scores, generator_decided_by=named.decided_by,
                )
        return results  # type: ignore[return-value]

    def predict_video(self, blob: bytes, evidence: list | None = None,
                      count: int = video.DEFAULT_FRAMES) -> VideoPrediction:
        """Sample `count` frames of a video, score them in batches and decide the video
        by the one verdict rule on its frames' summary (`detector.verdicts.frames`)."""
        evidence = list(provenance.inspect(blob) if evidence is None else evidence)
        try:
            sampled = video.sample_frames(blob, self.image_size, count)
        except video.VideoError as err:
            return VideoPrediction(None, None, evidence=[e.to_dict() for e in evidence],
                                   error=err.code, error_detail=err.detail)
        scores, heads = self.score_and_attribute(sampled.pixels)
        decided = decide_video(self.card, scores, sampled.times_s, heads, evidence)
        return VideoPrediction(**sampled.fields(), **decided.fields())

    def _check_consistency(self, images: np.ndarray, scores: np.ndarray,
                           evidence: list[list]) -> None:
        """Score every image's re-encoded copies; add a finding where verdicts disagree."""
        copy_scores = consistency.copy_scores(images, self.score)
        for score, variant_scores, found in zip(scores, copy_scores, evidence, strict=True):
            flip = consistency.finding(functools.partial(classify_for, self.card), float(score),
                                       variant_scores)
            if flip is not None:
                found.append(flip)


def members_forward(card: ModelCard, batch_size: int = 32, backend: str = "auto",
                    precision: str = "float32", threads: int | None = None
                    ) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(forward, runtime) for an ensemble card: each member loads on the runtime
    `backend`/`precision` resolve to for it; forward = the weighted mean of their
    calibrated probabilities, then (when the card names generators) the weighted mean of
    the attribution of the members whose head names those generators."""
    members = [(Predictor.from_uri(m["uri"], batch_size, backend, precision, threads),
                m["weight"]) for m in card.config["members"]]
    with_head = [bool(card.generators) and member.card.generators == card.generators
                 for member, _ in members]

    def forward(pixels: np.ndarray) -> np.ndarray:
        outputs = [(weight, *member.score_and_attribute(pixels)) for member, weight in members]
        score = sum(weight * scores for weight, scores, _ in outputs)
        heads = [(weight, named) for (weight, _, named), head in zip(outputs, with_head,
                                                                    strict=True) if head]
        if not heads:
            return score
        attribution = sum(w * named for w, named in heads) / sum(w for w, _ in heads)
        return np.column_stack([score, attribution])

    runtime = "ensemble(" + ", ".join(member.runtime for member, _ in members) + ")"
    return forward, runtime
