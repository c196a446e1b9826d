"""Ensembles: several trained model versions behind one artifact.

An ensemble is an artifact with a card and no weights of its own: `architecture` is
"ensemble" and `config["members"]` names each member's version URI and weight. Its raw
score is the weighted mean of the members' calibrated probabilities (and its attribution,
the weighted mean of the heads of the members that have one, when they name the same
generators: `generators_of`); like any model, it
gets its own calibration, threshold and uncertain band on the validation split and is
evaluated on the test split (`detector.training.ensemble.build`). `Predictor.from_uri`
loads one like a model, so
predict, serve and scan take an ensemble URI unchanged, and report its `name@id`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence

from detector.io import storage
from detector.model.artifact import ModelCard, load_card, publish_directory, resolve
from detector.verdicts import familiarity, residual

ARCHITECTURE = "ensemble"


def is_ensemble(card: ModelCard) -> bool:
    return card.architecture == ARCHITECTURE


def make_card(member_uris: Sequence[str], weights: Sequence[float] | None = None,
              name: str = "ensemble") -> ModelCard:
    """The card of an ensemble of these members (each resolved to its version now).
    Members must see the same pixels: same image size and preprocessing version."""
    members = [resolve(uri) for uri in member_uris]
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two --models")
    weights = [1.0] * len(members) if not weights else [float(w) for w in weights]
    if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--weights needs {len(members)} non-negative numbers, not all zero; "
                         f"got {list(weights)}")
    cards = [load_card(uri) for uri in members]
    if any(is_ensemble(card) for card in cards):
        raise ValueError("ensembles of ensembles are not supported: list their members")
    sizes = {(card.image_size, card.preprocess_version) for card in cards}
    if len(sizes) > 1:
        raise ValueError("members must share image size and preprocessing version, got "
                         + ", ".join(f"{c.name}@{c.id}: {c.image_size} px v"
                                     f"{c.preprocess_version}" for c in cards))
    total = sum(weights)
    return ModelCard(
        name=name, architecture=ARCHITECTURE, image_size=cards[0].image_size,
        preprocess_version=cards[0].preprocess_version, calibration={},
        domain=_domain(cards), generators=generators_of(cards),
        config={"members": [{"uri": uri, "model": f"{card.name}@{card.id}",
                             "weight": weight / total}
                            for uri, card, weight in zip(members, cards, weights, strict=True)]},
    )


def generators_of(cards: Sequence[ModelCard]) -> list[str]:
    """The ensemble's attribution classes: those of its members with a head, when they
    all name the same generators in the same order; otherwise none (averaging the heads of
    different classes would mean nothing)."""
    lists = {tuple(card.generators) for card in cards if card.generators}
    return list(lists.pop()) if len(lists) == 1 else []


def _domain(cards: Sequence[ModelCard]) -> dict:
    """What the members were trained on, together (see `detector.verdicts.familiarity`)."""
    merged = familiarity.merge(familiarity.Domain.from_card(card.domain) for card in cards)
    fitted = residual.same([card.domain for card in cards])  # members of the same shards
    return {**merged.to_card(), **({"residual": fitted} if fitted else {})} if merged else {}


def publish(member_uris: Sequence[str], out_uri: str, weights: Sequence[float] | None = None,
            name: str = "ensemble", **card_fields) -> str:
    """Publish an ensemble card as is (no evaluation: `build` is what users run; this is
    for callers that set threshold and calibration themselves). Returns its version URI."""
    card = dataclasses.replace(make_card(member_uris, weights, name), **card_fields)
    with tempfile.TemporaryDirectory() as tmp:
        return publish_directory(tmp, card, storage.join(out_uri, name))
