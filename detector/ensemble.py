"""Ensembles: several trained model versions behind one artifact.

An ensemble is an artifact with a card and no weights of its own: `architecture` is
"ensemble" and `config["members"]` names each member's version URI and weight. Its raw
score is the weighted mean of the members' calibrated probabilities; like any model, it
gets its own calibration, threshold and uncertain band on the validation split and is
evaluated on the test split (`build`). `Predictor.from_uri` loads one like a model, so
predict, serve and scan take an ensemble URI unchanged, and report its `name@id`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from detector import storage
from detector.artifact import ModelCard, load_card, publish_directory, resolve

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
        config={"members": [{"uri": uri, "model": f"{card.name}@{card.id}",
                             "weight": weight / total}
                            for uri, card, weight in zip(members, cards, weights, strict=True)]},
    )


def members_forward(card: ModelCard, batch_size: int = 32, backend: str = "auto",
                    precision: str = "float32", threads: int | None = None
                    ) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(forward, runtime) for an ensemble card: each member loads on the runtime
    `backend`/`precision` resolve to for it; forward = the weighted mean of their
    calibrated probabilities."""
    from detector.predictor import Predictor

    members = [(Predictor.from_uri(m["uri"], batch_size, backend, precision, threads),
                m["weight"]) for m in card.config["members"]]

    def forward(pixels: np.ndarray) -> np.ndarray:
        return sum(weight * member.score(pixels) for member, weight in members)

    runtime = "ensemble(" + ", ".join(member.runtime for member, _ in members) + ")"
    return forward, runtime


def build(member_uris: Sequence[str], shards_uri: str, out_uri: str,
          weights: Sequence[float] | None = None, name: str = "ensemble",
          policy: str = "balanced", backend: str = "auto", precision: str = "float32"
          ) -> dict:
    """`detector ensemble`: calibrate, threshold and evaluate the ensemble on the shards
    like a trained model, publish it as OUT/<name>/<id>/ and add it to OUT/comparison.md.
    Returns its comparison row."""
    from detector import data
    from detector.evaluate import evaluate_model
    from detector.predictor import Predictor

    card = make_card(member_uris, weights, name)
    card.data_fingerprint = data.read_manifest(shards_uri)["fingerprint"]
    card.config["threshold_policy"] = policy
    forward, runtime = members_forward(card, backend=backend, precision=precision)
    predictor = Predictor(forward, card, runtime=runtime)
    report = evaluate_model(predictor, shards_uri, "test", policy=policy)  # fits on val
    card.metrics = report.headline()
    with tempfile.TemporaryDirectory() as tmp:
        report.write(tmp)
        version = publish_directory(tmp, card, storage.join(out_uri, name))
    row = {"model": name, "id": card.id, "artifact": version, **card.metrics,
           "members": [m["model"] for m in card.config["members"]], "runtime": runtime}
    _add_to_comparison(out_uri, row)
    return row


def publish(member_uris: Sequence[str], out_uri: str, weights: Sequence[float] | None = None,
            name: str = "ensemble", **card_fields) -> str:
    """Publish an ensemble card as is (no evaluation: `build` is what users run; this is
    for callers that set threshold and calibration themselves). Returns its version URI."""
    card = dataclasses.replace(make_card(member_uris, weights, name), **card_fields)
    with tempfile.TemporaryDirectory() as tmp:
        return publish_directory(tmp, card, storage.join(out_uri, name))


def _add_to_comparison(out_uri: str, row: dict) -> None:
    import json

    from detector.train import write_comparison

    existing = storage.join(out_uri, "comparison.json")
    rows = json.loads(storage.read_bytes(existing)) if storage.exists(existing) else []
    rows = [r for r in rows if r.get("model") != row["model"]] + [row]
    write_comparison(out_uri, rows)
