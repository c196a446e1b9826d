"""Building an ensemble: calibrate, threshold and evaluate it on the shards like a trained
model, then publish it beside its members (the ensemble itself, its card and its forward
pass, is `detector.model.ensemble`)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence

from detector.data import shards
from detector.io import storage
from detector.model.artifact import publish_directory
from detector.model.ensemble import make_card
from detector.model.predictor import Predictor, members_forward
from detector.training.evaluate import evaluate_model
from detector.training.train import write_comparison


def build(member_uris: Sequence[str], shards_uri: str, out_uri: str,
          weights: Sequence[float] | None = None, name: str = "ensemble",
          policy: str = "balanced", backend: str = "auto", precision: str = "float32"
          ) -> dict:
    """`detector ensemble`: calibrate, threshold and evaluate the ensemble on the shards
    like a trained model, publish it as OUT/<name>/<id>/ and add it to OUT/comparison.md.
    Returns its comparison row."""
    card = make_card(member_uris, weights, name)
    card.data_fingerprint = shards.read_manifest(shards_uri)["fingerprint"]
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


def _add_to_comparison(out_uri: str, row: dict) -> None:
    existing = storage.join(out_uri, "comparison.json")
    rows = json.loads(storage.read_bytes(existing)) if storage.exists(existing) else []
    rows = [r for r in rows if r.get("model") != row["model"]] + [row]
    write_comparison(out_uri, rows)
