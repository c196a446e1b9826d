"""Inputs unlike anything in training: the classifier's score on them is not one to act on.

A detector trained on 512 px JPEGs that is handed a 1024 px AVIF scores it anyway, and
with a confident-looking number (measured: 5.2e-27 for a 1024x1024 Gemini image from a
model trained on smaller ones). What it learned are traces at the sizes and compressions
it saw; an image decoded from a format it never saw, or resampled by far more or far less
than any training image was, carries traces it has no experience of.

So the training data's domain goes on the model card (`domain`: the formats and the range
of longer sides of the shard set's images, see `detector.data.prepare`), and an image
outside it gets an `unfamiliar` finding. The verdict rule (`detector.verdicts.verdict`)
then answers `uncertain` instead of the classifier's verdict, and the finding says why.
Provenance still decides: a generator's own claim does not depend on the pixels.
A card without a domain (trained before this) flags nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from detector.verdicts.provenance import Evidence

SOURCE, KIND = "familiarity", "unfamiliar"
# How far beyond the training range an image's longer side may lie before its traces are
# resampled unlike any training image's: 1/1.5 of the smallest, 1.5x the largest.
SIZE_FACTOR = 1.5


@dataclass(frozen=True)
class Domain:
    """What the model was trained on: decoded formats, and the range of longer sides."""

    formats: tuple[str, ...]
    long_side: tuple[int, int]

    @classmethod
    def from_card(cls, domain: Mapping | None) -> Domain | None:
        """The domain a card records (`ModelCard.domain`), or None when it has none."""
        if not domain or "formats" not in domain:  # none, or only verdicts.residual's model
            return None
        return cls(tuple(domain["formats"]), tuple(domain["long_side"]))  # type: ignore[arg-type]

    def to_card(self) -> dict:
        return {"formats": list(self.formats), "long_side": list(self.long_side)}


def measure(images: Iterable[tuple[str, int, int]]) -> Domain | None:
    """The domain of (format, width, height) rows; None for no rows."""
    formats: set[str] = set()
    smallest, largest = None, None
    for fmt, width, height in images:
        formats.add(fmt)
        side = max(width, height)
        smallest = side if smallest is None else min(smallest, side)
        largest = side if largest is None else max(largest, side)
    if smallest is None:
        return None
    return Domain(tuple(sorted(formats)), (smallest, largest))


def merge(domains: Iterable[Domain | None]) -> Domain | None:
    """One domain covering all of `domains` (running totals over parts of a data set)."""
    known = [d for d in domains if d is not None]
    if not known:
        return None
    return Domain(tuple(sorted({f for d in known for f in d.formats})),
                  (min(d.long_side[0] for d in known), max(d.long_side[1] for d in known)))


def finding(domain: Domain | None, fmt: str | None, width: int | None,
            height: int | None) -> Evidence | None:
    """An `unfamiliar` finding when a decoded image lies outside `domain`, else None."""
    if domain is None or fmt is None or width is None or height is None:
        return None
    reasons = []
    if fmt not in domain.formats:
        reasons.append(f"format {fmt} was never seen in training ({', '.join(domain.formats)})")
    side = max(width, height)
    smallest, largest = domain.long_side
    if side > largest * SIZE_FACTOR:
        reasons.append(f"{width}x{height} is over {SIZE_FACTOR:g}x the largest training image "
                       f"(longer side {largest} px)")
    elif side * SIZE_FACTOR < smallest:
        reasons.append(f"{width}x{height} is under 1/{SIZE_FACTOR:g} of the smallest training "
                       f"image (longer side {smallest} px)")
    if not reasons:
        return None
    return Evidence(SOURCE, KIND, "info", "; ".join(reasons))


def check(card_domain: Mapping | None, fmt: str | None, width: int | None,
          height: int | None) -> Evidence | None:
    """`finding` for a model card's recorded domain (`ModelCard.domain`)."""
    return finding(Domain.from_card(card_domain), fmt, width, height)


def unfamiliar(evidence: Iterable[Evidence]) -> bool:
    """True when `evidence` holds an `unfamiliar` finding."""
    return any(e.source == SOURCE and e.kind == KIND for e in evidence)
