"""Frozen-base feature cache: the base's pooled features, computed once, the head trained on them.

A model whose base is frozen (ResNet50V2, as in the notebook) recomputes the same base
forward pass on every image in every epoch, and that pass is nearly all of an epoch's
work. This module computes the base's output (the registry's `feature_layer`) once, as a
Ray Data pass on actors with the workers' resources: the validation split plainly and
the training split as K independently augmented views. The features are stored as
Parquet beside the shards, under a key of everything that changes them, and reused by
later runs with the same key. Training then fits only the head on them; the published
artifact is still the whole model, evaluated end to end on pixels.

Layout: SHARDS/_features/<key>/{model.weights.h5, split=val/view=0/, split=train/view=K/,
_cache.json}.
`_cache.json` is written last: a cache without it is incomplete, and is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.data import shards
from detector.data.augment import AUGMENT_VERSION, robust_augment
from detector.io import storage
from detector.io.preprocess import PREPROCESS_VERSION
from detector.io.threads import configure_gpus, limit_threads, reserved_threads
from detector.model.architectures import build_model, get_spec
from detector.training.attribution import generator_classes

FEATURES_VERSION = 1  # bump when the pass changes what it stores
CACHE_DIR = "_features"
RECORD = "_cache.json"
WEIGHTS = "model.weights.h5"  # the model (frozen base + initial head) the features came from
BATCH_ROWS = 64


def feature_layer(name: str) -> str | None:
    """The layer whose output the head of model `name` reads, when its base is frozen."""
    spec = get_spec(name)
    frozen = spec.defaults.get("freeze_base", True)
    return spec.feature_layer if frozen else None


def split(model, layer: str):
    """(features, head): `model` cut after `layer`. The head is built from the model's own
    layers, so training it trains `model` (the head must be a chain, as the registry's are)."""
    import keras

    names = [each.name for each in model.layers]
    cut = names.index(layer)
    features = keras.Model(model.input, model.get_layer(layer).output, name=f"{model.name}_base")
    inputs = keras.Input(tuple(features.output.shape[1:]), name="features")
    x = inputs
    for each in model.layers[cut + 1:]:
        x = each(x)
    return features, keras.Model(inputs, x, name=f"{model.name}_head")


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached features depend on."""

    fingerprint: str  # the shards' content
    model: str
    image_size: int
    weights: str  # imagenet | none (then `seed` decides them) | a weights file's URI
    seed: int
    preprocess_version: int
    augment: str
    views: int
    augment_version: int = 0  # augment.AUGMENT_VERSION when augment is not "none"
    version: int = FEATURES_VERSION

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def key_for(cfg, name: str, image_size: int, manifest: dict) -> CacheKey:
    """The cache key of training `name` with TrainConfig `cfg` on shards with `manifest`."""

    return CacheKey(
        fingerprint=manifest["fingerprint"], model=name, image_size=image_size,
        weights=cfg.weights, seed=cfg.seed, preprocess_version=PREPROCESS_VERSION,
        augment=cfg.augment, views=views_of(cfg),
        augment_version=AUGMENT_VERSION if cfg.augment != "none" else 0,
    )


def views_of(cfg) -> int:
    """Augmented views per training image: one when nothing is augmented."""
    return max(1, cfg.views) if cfg.augment != "none" else 1


def cache_uri(shards_uri: str, key: CacheKey) -> str:
    return storage.join(shards_uri, CACHE_DIR, key.digest())


def read_record(uri: str) -> dict | None:
    """The cache's record, or None when the cache at `uri` is missing or incomplete."""
    record_uri = storage.join(uri, RECORD)
    if not storage.exists(record_uri):
        return None
    return json.loads(storage.read_bytes(record_uri))


def ensure_cache(cfg, name: str, image_size: int, say=print) -> str:
    """The URI of the feature cache for this training run, computing it when absent."""
    manifest = shards.read_manifest(cfg.data)
    key = key_for(cfg, name, image_size, manifest)
    uri = cache_uri(cfg.data, key)
    record = read_record(uri)
    if record is not None and record.get("key") == dataclasses.asdict(key):
        say(f"Feature cache for {name}: reusing {uri} ({record['rows']['train']:,} training "
            f"rows, {key.views} view(s))")
        return uri
    storage.delete_tree(uri)  # an interrupted pass: its parts are not to be trusted
    say(f"Feature cache for {name}: computing {uri} ({key.views} view(s) of the training "
        "split, and the validation split)")
    rows = compute(cfg, name, image_size, key, uri, manifest)
    record = {"key": dataclasses.asdict(key), "rows": rows, "shards": cfg.data,
              "feature_layer": feature_layer(name)}
    storage.write_bytes(storage.join(uri, RECORD), json.dumps(record, indent=2).encode())
    return uri


def compute(cfg, name: str, image_size: int, key: CacheKey, uri: str, manifest: dict) -> dict:
    """Run the feature pass into `uri`: the initial weights first, then one pass of actors
    over the validation and training splits together (one pool, started once)."""
    import pyarrow as pa
    import ray

    resources = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker}
    generators = len(generator_classes(manifest))  # the head is part of the weights
    ray.get(ray.remote(_write_initial_weights).options(**resources).remote(
        name, image_size, cfg.weights, cfg.seed, storage.join(uri, WEIGHTS), generators))
    columns = ["image", "label", "sha256"] + (["generator"] if generators else [])
    splits = []
    for split_name in ("val", "train"):
        dataset = shards.read_split(cfg.data, split_name, columns=columns, manifest=manifest)
        splits.append(dataset.add_column(
            "split", lambda t, s=split_name: pa.array([s] * t.num_rows), batch_format="pyarrow"))
    features = splits[0].union(splits[1]).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={
            "weights_uri": storage.join(uri, WEIGHTS), "name": name, "image_size": image_size,
            "augment": cfg.augment, "views": key.views, "seed": cfg.seed,
            "cpus": cfg.cpus_per_worker, "gpus": cfg.gpus_per_worker,
            "generators": generators,
        },
        batch_size=BATCH_ROWS, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.workers)),
        **resources,
    )
    fs, path = storage.resolve(uri)
    features.write_parquet(path, filesystem=fs, partition_cols=["split", "view"])
    return {"val": sum(manifest["counts"]["val"].values()),
            "train": sum(manifest["counts"]["train"].values()) * key.views}


def feature_files(uri: str, split_name: str, view: int = 0) -> tuple[Any, str, int]:
    """Where one split (and view) of a cache lies: (filesystem, directory, bytes)."""
    directory = storage.join(uri, f"split={split_name}", f"view={view}")
    size = sum(item.size for item in storage.list_objects(directory))
    fs, path = storage.resolve(directory)
    return fs, path, size


def _write_initial_weights(name: str, image_size: int, weights: str, seed: int,
                           uri: str, generators: int = 0) -> None:
    """Build the model as a training run would (seeded) and store its weights: the feature
    actors and the training workers all load these, so the base is the same everywhere."""
    import keras

    configure_gpus()
    keras.utils.set_random_seed(seed)
    overrides = {"weights": weights} if get_spec(name).pretrained else {}
    model = build_model(name, image_size=image_size, generators=generators, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        model.save_weights(local)
        with open(local, "rb") as handle:
            storage.write_bytes(uri, handle.read())


def load_weights(model, uri: str) -> None:
    """Load weights stored at `uri` (any storage) into `model`."""
    with storage.local_copy(uri) as path:
        model.load_weights(path)


class FeatureExtractor:
    """Ray Data actor: shard rows -> the frozen base's features, `views` rows per image."""

    def __init__(self, weights_uri: str, name: str, image_size: int, augment: str,
                 views: int, seed: int, cpus: float, gpus: float, generators: int = 0):
        import tensorflow as tf

        configure_gpus()
        threads = reserved_threads(cpus, gpus)
        if threads:
            limit_threads(threads)
        model = build_model(name, image_size=image_size, weights="none", generators=generators)
        load_weights(model, weights_uri)
        base, _ = split(model, feature_layer(name))
        self._forward = tf.function(lambda x: base(x, training=False))
        self.image_size, self.augment, self.views, self.seed = image_size, augment, views, seed

    def __call__(self, batch: dict) -> dict:
        """Validation rows once, as they are; training rows `views` times, augmented when
        asked (a batch may hold rows of both splits)."""
        pixels = shards.decode_pixels(batch["image"], self.image_size)
        train = np.asarray(batch["split"]) == "train"
        carried = [c for c in ("label", "generator") if c in batch]  # as the rows have them
        out = {"features": [], **{c: [] for c in carried}, "split": [], "view": []}
        for view in range(self.views):
            rows = np.arange(len(pixels)) if view == 0 else np.flatnonzero(train)
            if not len(rows):
                break
            shown = pixels[rows]
            if self.augment == "robust":
                shown = np.stack([
                    self._augmented(pixels[i], batch["sha256"][i], view) if train[i]
                    else pixels[i] for i in rows])
            out["features"].append(np.asarray(self._forward(shown.astype(np.float32)),
                                              np.float32))
            for column in carried:
                values = np.asarray(batch[column])[rows]
                if column == "generator":  # "" for null: every part then has one string type
                    values = np.array([v if isinstance(v, str) else "" for v in values])
                out[column].append(values)
            out["split"].append(np.asarray(batch["split"])[rows])
            out["view"].append(np.full(len(rows), view, dtype=np.int32))
        return {column: np.concatenate(parts) for column, parts in out.items()}

    def _augmented(self, pixels: np.ndarray, sha256: str, view: int) -> np.ndarray:

        # The same draw for the same image and view on every run: the cache is reproducible.
        rng = np.random.default_rng([self.seed, view, int(str(sha256)[:15], 16)])
        return robust_augment(pixels, rng)
