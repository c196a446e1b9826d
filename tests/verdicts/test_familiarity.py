"""Inputs outside the training data's formats and sizes (`verdicts.familiarity`)."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.unit


def test_the_domain_is_measured_and_merged_from_formats_and_longer_sides():
    from detector.verdicts.familiarity import Domain, measure, merge

    first = measure([("PNG", 320, 240), ("JPEG", 256, 256), ("PNG", 384, 512)])
    assert first == Domain(("JPEG", "PNG"), (256, 512))
    assert Domain.from_card(first.to_card()) == first  # as the card stores it
    second = measure(iter([("WEBP", 1024, 768)]))
    assert merge([first, None, second]) == Domain(("JPEG", "PNG", "WEBP"), (256, 1024))
    assert measure([]) is None and merge([None]) is None and Domain.from_card({}) is None


def test_a_format_or_size_never_seen_in_training_is_a_finding_that_says_why():
    from detector.verdicts.familiarity import SIZE_FACTOR, Domain, finding

    domain = Domain(("JPEG", "PNG", "WEBP"), (256, 512))
    assert finding(domain, "JPEG", 512, 384) is None
    assert finding(domain, "PNG", int(512 * SIZE_FACTOR), 100) is None  # within the margin
    assert finding(domain, "PNG", math.ceil(256 / SIZE_FACTOR), 64) is None
    avif = finding(domain, "AVIF", 300, 300)
    assert (avif.source, avif.kind, avif.strength) == ("familiarity", "unfamiliar", "info")
    assert avif.detail == "format AVIF was never seen in training (JPEG, PNG, WEBP)"
    large = finding(domain, "JPEG", 1024, 1024)
    assert large.detail \
        == "1024x1024 is over 1.5x the largest training image (longer side 512 px)"
    small = finding(domain, "HEIF", 120, 90)
    assert small.detail.startswith("format HEIF was never seen") and "120x90 is under" in \
        small.detail
    assert finding(None, "AVIF", 4000, 3000) is None  # a card from before: nothing known
    assert finding(domain, None, None, None) is None  # nothing decoded: errors say why


def test_unfamiliar_inputs_are_uncertain_and_provenance_still_decides():
    from detector.verdicts.familiarity import Domain, finding
    from detector.verdicts.provenance import Evidence
    from detector.verdicts.verdict import decide

    flag = finding(Domain(("PNG",), (32, 64)), "AVIF", 2048, 2048)
    for score in (1e-4, 0.5, 1 - 1e-4):
        assert decide(score, 0.5, 0.05, [flag]) == ("uncertain", "classifier")
    claim = Evidence("c2pa", "ai-source-type", "strong", "trainedAlgorithmicMedia")
    assert decide(1e-4, 0.5, 0.05, [claim, flag]) == ("ai-generated", "provenance")
    assert decide(1e-4, 0.5, 0.05, []) == ("real", "classifier")


def test_predict_flags_a_sample_image_far_larger_than_training_and_in_an_unseen_format(
        trained_tiny, sample_arrays):
    """The session's tiny model saw 48 px JPEG, PNG and WebP: the same kind of picture at
    that size decides by its score, at 4x the size or as AVIF it is `uncertain`, saying
    why; a card from before this change flags nothing."""
    from detector.data.sample import make_image
    from detector.model.predictor import Predictor
    from detector.verdicts.familiarity import Domain

    def encoded(size: int, fmt: str) -> bytes:
        pixels = make_image(1, np.random.default_rng(7), (size, size))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt)
        return buffer.getvalue()

    predictor = Predictor.from_uri(trained_tiny[0], backend="keras")
    assert predictor.card.domain == {}
    blobs = [encoded(48, "PNG"), encoded(192, "PNG"), encoded(48, "AVIF")]
    before = predictor.predict_bytes(blobs)
    assert all(p.evidence == [] and p.decided_by == "classifier" for p in before)
    seen = Domain(("JPEG", "PNG", "WEBP"), (48, 48)).to_card()
    predictor.card = dataclasses.replace(predictor.card, domain=seen)
    usual, large, avif = predictor.predict_bytes(blobs)
    assert (usual.verdict, usual.evidence) == (before[0].verdict, [])
    for flagged, why in ((large, "192x192 is over"), (avif, "format AVIF")):
        assert (flagged.verdict, flagged.decided_by) == ("uncertain", "classifier")
        assert [e["kind"] for e in flagged.evidence] == ["unfamiliar"]
        assert flagged.evidence[0]["detail"].startswith(why)
    assert [p.score_ai for p in (usual, large, avif)] == [p.score_ai for p in before]
