"""The model artifact: a directory at any URI holding `model.keras` + `detector.json`.

`detector.json` is written last and is the commit marker: a directory without it is
not an artifact, so a crashed upload is never mistaken for a model.

Versions are immutable: training publishes each model to `OUT/<name>/<id>/` and then
moves the pointer `OUT/<name>/latest.json` (written last). A model URI is either a version
(or any artifact directory), used as is, or a name, which `resolve` turns into the version
its pointer names, once, so that everything one process loads comes from one version.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from detector.io import storage
from detector.model.architectures import import_builders

MODEL_FILE = "model.keras"
CARD_FILE = "detector.json"
POINTER_FILE = "latest.json"
LABELS = {"0": "real", "1": "ai-generated"}
# Exports beside the Keras model (detector.model.export writes them, runtimes load them)
ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.xml"  # + model_int8.bin beside it
INT8_FILES = (INT8_FILE, "model_int8.bin")


@dataclass
class ModelCard:
    """Everything needed to use a model correctly, saved beside it as detector.json."""

    name: str
    architecture: str
    image_size: int
    preprocess_version: int
    threshold: float = 0.5
    uncertain_margin: float = 0.1  # fitted on validation by training; see calibration.py
    # Platt scaling of the raw score and its fit record (empty: none); see calibration.py
    calibration: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=lambda: dict(LABELS))
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    # The training data's formats and sizes (empty: unknown; see verdicts/familiarity.py),
    # and `residual`, the real training images' noise (see verdicts/residual.py)
    domain: dict[str, Any] = field(default_factory=dict)
    # The attribution head's classes, in the order of its outputs (empty: no head), and
    # the open-set rule fitted on validation (see verdicts/attribution.py)
    generators: list[str] = field(default_factory=list)
    attribution: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # The version this one was fine-tuned from ({id, name, uri}; empty: trained from scratch)
    parent: dict[str, Any] = field(default_factory=dict)
    # kind ("onnx", "int8") -> parity record of that export against Keras; see export.py
    exports: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def save_artifact(
    model,
    card: ModelCard,
    uri: str,
    extra_files: Callable[[str], None] | None = None,
) -> str:
    """Write the model, its card and any evaluation files (`extra_files(dir)`) to `uri`."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, MODEL_FILE))
        if extra_files is not None:
            extra_files(tmp)
        with open(os.path.join(tmp, CARD_FILE), "w") as handle:
            handle.write(card.to_json())
        storage.publish_dir(tmp, uri, commit_file=CARD_FILE)
    return uri


def publish_version(model, card: ModelCard, name_uri: str,
                    extra_files: Callable[[str], None] | None = None,
                    candidate: bool = False) -> str:
    """Save a new immutable version at `name_uri/<card.id>`, then point `latest.json` at
    it -- unless it is a `candidate` and the name has a latest already (`detector promote`
    moves it then). Returns the version's URI. Readers of `name_uri` see the old version
    until the pointer moves, and never a version without its card."""
    version = save_artifact(model, card, storage.join(name_uri, card.id), extra_files)
    if not (candidate and storage.exists(storage.join(name_uri, POINTER_FILE))):
        point(name_uri, card)
    return version


def publish_directory(local_dir: str, card: ModelCard, name_uri: str) -> str:
    """Like `publish_version`, for a finished local artifact directory whose card is
    `card` (written into it here, last)."""
    with open(os.path.join(local_dir, CARD_FILE), "w") as handle:
        handle.write(card.to_json())
    version = storage.join(name_uri, card.id)
    storage.publish_dir(local_dir, version, commit_file=CARD_FILE)
    point(name_uri, card)
    return version


def point(name_uri: str, card: ModelCard, promotion: dict | None = None) -> None:
    """Move `name_uri`'s `latest.json` to the version `card` describes (one whole write:
    readers see the old pointer or the new). `promotion`: how it got there, when a gate
    (or a forced promotion) moved it rather than publishing."""
    pointer = {"id": card.id, "name": card.name, "created_at": card.created_at,
               "metrics": {k: card.metrics.get(k) for k in HEADLINE if k in card.metrics},
               **({"promotion": promotion} if promotion else {})}
    storage.write_bytes(storage.join(name_uri, POINTER_FILE), json.dumps(pointer).encode())


def name_of(version_uri: str) -> str | None:
    """`OUT/<name>` for a version `OUT/<name>/<id>`, or None when it is not one."""
    parent = version_uri.rstrip("/").rsplit("/", 1)[0]
    return parent if storage.exists(storage.join(parent, POINTER_FILE)) else None


def new_identity() -> dict[str, str]:
    """A fresh id and creation time, for a card that describes a new version."""
    return {"id": uuid.uuid4().hex[:12],
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


HEADLINE = ("accuracy", "roc_auc", "tpr_at_1pct_fpr", "ece")


def resolve(uri: str) -> str:
    """The version `uri` names: an artifact directory as is, a model name (`OUT/<name>`)
    through its `latest.json`."""
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, CARD_FILE)):
        return uri
    pointer = storage.join(uri, POINTER_FILE)
    if storage.exists(pointer):
        return storage.join(uri, json.loads(storage.read_bytes(pointer))["id"])
    raise FileNotFoundError(f"no model artifact at {uri} ({CARD_FILE} missing, and no "
                            f"{POINTER_FILE} naming a version)")


def list_versions(name_uri: str) -> list[dict]:
    """Every version under `OUT/<name>`, oldest first: id, created_at, headline metrics,
    threshold and its policy, calibration (method, validation ECE before and after), the
    generators it names, the version it was fine-tuned from, and whether `latest.json`
    points at it."""
    name_uri = name_uri.rstrip("/")
    pointer = storage.join(name_uri, POINTER_FILE)
    latest = json.loads(storage.read_bytes(pointer))["id"] if storage.exists(pointer) else None
    root = name_uri if storage.is_s3(name_uri) else storage.resolve(name_uri)[1].rstrip("/")
    versions = []
    for item in storage.list_objects(name_uri, patterns=[CARD_FILE]):
        directory, _, rest = item.uri[len(root) + 1:].partition("/")
        if rest != CARD_FILE:  # OUT/<name>/<id>/detector.json only
            continue
        card = ModelCard.from_json(storage.read_bytes(item.uri).decode())
        versions.append({"id": card.id, "name": card.name, "created_at": card.created_at,
                         "uri": storage.join(name_uri, directory), "latest": card.id == latest,
                         **{k: card.metrics.get(k) for k in HEADLINE},
                         # what a reviewer needs to trust it
                         "threshold": card.threshold,
                         "threshold_policy": card.metrics.get("threshold_policy"),
                         "calibration": card.calibration.get("method"),
                         "ece_before": card.calibration.get("ece_before"),
                         "ece_after": card.calibration.get("ece_after"),
                         "generators": list(card.generators),
                         "parent": card.parent.get("id")})
    return sorted(versions, key=lambda v: v["created_at"])


def load_card(uri: str) -> ModelCard:
    """The card of the version `uri` names (see `resolve`)."""
    card_uri = storage.join(resolve(uri), CARD_FILE)
    return ModelCard.from_json(storage.read_bytes(card_uri).decode())


def load_artifact(uri: str):
    """Return (keras.Model, ModelCard). The model loads with safe_mode=True."""
    import keras

    import_builders()  # registers the custom layers for deserialisation

    uri = resolve(uri)
    card = load_card(uri)
    with storage.local_copy(storage.join(uri, MODEL_FILE)) as path:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    return model, card


def kind_for(precision: str) -> str:
    """The export a precision runs from: the int8 model, or the float32 ONNX."""
    return "int8" if precision == "int8" else "onnx"


def files_of(kind: str) -> tuple[str, ...]:
    return (ONNX_FILE,) if kind == "onnx" else INT8_FILES
