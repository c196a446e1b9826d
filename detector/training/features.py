"""Frozen-base feature cache: the base's pooled features, computed once, the head trained on them.

A model whose base is frozen (ResNet50V2, as in the notebook) recomputes the same base
forward pass on every image in every epoch, and that pass is nearly all of an epoch's
work. This module computes the base's output (the registry's `feature_layer`) once, as a
Ray Data pass on actors with the workers' resources: the validation split plainly and
the training split as K independently augmented views. The features are stored as
Parquet beside the shards, under a key of everything that changes them, and reused by
later runs with the same key. Training then fits only the head on them; the published
artifact is still the whole model, evaluated end to end on pixels.

The cache is incremental: rows carry their image's sha256, and a new cache takes the rows
of a donor, a complete cache of the same base (the same weights, by digest) and settings,
instead of recomputing them. The donor is a cache of these same shards (a fine-tune on the
shards its parent trained on computes nothing) or of the set these shards were built on
(`prepare --base`: only the reviewed images are new).

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
import pyarrow as pa
import pyarrow.compute as pc

from detector.data import shards
from detector.data.augment import AUGMENT_VERSION, robust_augment
from detector.data.labels import REVIEW_SOURCE
from detector.io import parquet, storage
from detector.io.preprocess import PREPROCESS_VERSION
from detector.io.threads import configure_gpus, limit_threads, reserved_threads
from detector.model.architectures import build_model, get_spec
from detector.model.artifact import MODEL_FILE
from detector.training.attribution import generator_classes

FEATURES_VERSION = 2  # bump when the pass changes what it stores (2: rows carry sha256)
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
    # imagenet | none (then `seed` decides them) | a weights file's URI | a fine-tune's
    # parent version (its base and head are the initial weights)
    weights: str
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
        weights=cfg.init_from or cfg.weights, seed=cfg.seed,
        preprocess_version=PREPROCESS_VERSION,
        augment=cfg.augment, views=views_of(cfg),
        augment_version=AUGMENT_VERSION if cfg.augment != "none" else 0,
    )


def base_weights(cfg) -> str:
    """The `--weights` a run builds its model with: none for a fine-tune, whose parent's
    weights replace them (nothing is fetched to be overwritten)."""
    return "none" if cfg.init_from else cfg.weights


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
    record = compute(cfg, name, image_size, key, uri, manifest, say)
    storage.write_bytes(storage.join(uri, RECORD), json.dumps(record, indent=2).encode())
    return uri


def compute(cfg, name: str, image_size: int, key: CacheKey, uri: str, manifest: dict,
            say=print) -> dict:
    """Fill the cache at `uri`: the initial weights first; then a donor's rows where one
    fits, and one pass of actors over the images it lacks (the validation and training
    splits together: one pool, started once). Returns the cache's record."""
    import ray

    resources = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker}
    generators = len(generator_classes(manifest))  # the head is part of the weights
    base = ray.get(ray.remote(_write_initial_weights).options(**resources).remote(
        name, image_size, base_weights(cfg), cfg.seed, storage.join(uri, WEIGHTS),
        generators, cfg.init_from))
    donor = find_donor(cfg.data, manifest, key, base)
    fresh = None  # which images to compute: all of them without a donor
    if donor is not None:
        fresh = set() if donor["fingerprint"] == manifest["fingerprint"] else \
            reviewed_hashes(cfg.data, manifest)
        for split_name, view in split_views(key.views):
            copy_rows(storage.join(donor["uri"], f"split={split_name}", f"view={view}"),
                      storage.join(uri, f"split={split_name}", f"view={view}"), fresh)
    if fresh is None or fresh:
        extract(cfg, name, image_size, key, uri, manifest, generators, fresh, resources)
    rows = {"val": sum(manifest["counts"]["val"].values()),
            "train": sum(manifest["counts"]["train"].values()) * key.views}
    stored = dict.fromkeys(rows, 0)
    for split_name, view in split_views(key.views):
        stored[split_name] += count_rows(uri, split_name, view)
    if stored != rows:  # a donor that does not hold what its record says, or a lost part
        raise RuntimeError(f"feature cache {uri} holds {stored} rows where the shards make "
                           f"{rows}: delete it and train again")
    images = sum(sum(manifest["counts"][s].values()) for s in ("val", "train"))
    computed = images if fresh is None else len(fresh)
    if donor is not None:
        say(f"Feature cache for {name}: the features of {images - computed:,} images come "
            f"from {donor['uri']}, {computed:,} computed")
    return {"key": dataclasses.asdict(key), "rows": rows, "shards": cfg.data,
            "feature_layer": feature_layer(name), "base": base,
            "donor": donor["uri"] if donor else None, "computed_images": computed}


def split_views(views: int) -> list[tuple[str, int]]:
    """The cache's (split, view) directories: the validation split once, the training
    split `views` times."""
    return [("val", 0)] + [("train", view) for view in range(views)]


# A donor must agree on everything the features depend on but the shards (it is of other
# shards) and how the weights were named (a parent's base is its initial weights' base).
DONOR_FIELDS = ("model", "image_size", "seed", "preprocess_version", "augment", "views",
                "augment_version", "version")


def find_donor(shards_uri: str, manifest: dict, key: CacheKey, base: str) -> dict | None:
    """A complete cache whose rows this one may take ({uri, fingerprint}), or None: of
    these shards, or of the set they were built on (`prepare --base`), with the same
    settings and a base of the same weights, made from the shards as they are now."""
    wanted = {field: getattr(key, field) for field in DONOR_FIELDS}
    candidates = [(shards_uri, manifest["fingerprint"])]
    built_on = (manifest.get("sources") or {}).get("base")
    if built_on and storage.exists(storage.join(built_on, shards.MANIFEST)):
        candidates.append((built_on, shards.read_manifest(built_on)["fingerprint"]))
    for candidate, fingerprint in candidates:
        for item in storage.list_objects(storage.join(candidate, CACHE_DIR)):
            if not item.uri.endswith("/" + RECORD):
                continue
            record = json.loads(storage.read_bytes(item.uri))
            its = record.get("key") or {}
            if (record.get("base") == base and its.get("fingerprint") == fingerprint
                    and {field: its.get(field) for field in DONOR_FIELDS} == wanted):
                return {"uri": item.uri[: -len(RECORD) - 1], "fingerprint": fingerprint}
    return None


def reviewed_hashes(shards_uri: str, manifest: dict,
                    splits: tuple[str, ...] = ("val", "train")) -> set[str]:
    """The sha256 of every image of source `review` in `splits` of a set built on
    another: the only rows not copied unchanged from the base (`detector.data.extend`).
    As many as there are labels, never as many as images."""
    import pyarrow.parquet as pq

    found: set[str] = set()
    for split_name in splits:  # part by part: memory stays that of one
        for part in shards.part_uris(shards_uri, split_name, manifest):
            fs, path = storage.resolve(part)
            found.update(pq.read_table(path, filesystem=fs, columns=["sha256"],
                                       filters=[("source_name", "==", REVIEW_SOURCE)])
                         ["sha256"].to_pylist())
    return found


def copy_rows(source: str, destination: str, dropped: set[str]) -> None:
    """Copy a donor's (split, view) directory into this cache, less the rows of `dropped`
    images, as a Ray Data pass (the driver never holds the rows)."""
    if not _has_files(source):
        return
    fs, path = storage.resolve(source)
    rows = parquet.read_parquet([path], fs, partitioning=None)
    if dropped:
        hashes = pa.array(sorted(dropped), pa.string())
        rows = rows.map_batches(lambda t: t.filter(pc.invert(pc.is_in(t["sha256"], hashes))),
                                batch_format="pyarrow")
    out_fs, out_path = storage.resolve(destination)
    rows.write_parquet(out_path, filesystem=out_fs)


def count_rows(uri: str, split_name: str, view: int) -> int:
    """Rows stored in one (split, view) directory of a cache, from the Parquet footers."""
    import pyarrow.dataset as ds

    directory = storage.join(uri, f"split={split_name}", f"view={view}")
    if not _has_files(directory):
        return 0
    fs, path = storage.resolve(directory)
    return ds.dataset(path, filesystem=fs, format="parquet").count_rows()


def _has_files(directory: str) -> bool:
    """Whether anything is stored under `directory` (a split with no rows writes none)."""
    return next(iter(storage.list_objects(directory)), None) is not None


def extract(cfg, name: str, image_size: int, key: CacheKey, uri: str, manifest: dict,
            generators: int, only: set[str] | None, resources: dict) -> None:
    """The feature pass over the shards' images (those of `only` when given), written
    into `uri` by split and view."""
    import ray

    columns = ["image", "label", "sha256"] + (["generator"] if generators else [])
    hashes = None if only is None else pa.array(sorted(only), pa.string())
    splits = []
    for split_name in ("val", "train"):
        dataset = shards.read_split(cfg.data, split_name, columns=columns, manifest=manifest)
        if hashes is not None:
            dataset = dataset.map_batches(lambda t: t.filter(pc.is_in(t["sha256"], hashes)),
                                          batch_format="pyarrow")
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


def feature_files(uri: str, split_name: str, view: int = 0) -> tuple[Any, str, int]:
    """Where one split (and view) of a cache lies: (filesystem, directory, bytes)."""
    directory = storage.join(uri, f"split={split_name}", f"view={view}")
    size = sum(item.size for item in storage.list_objects(directory))
    fs, path = storage.resolve(directory)
    return fs, path, size


def _write_initial_weights(name: str, image_size: int, weights: str, seed: int,
                           uri: str, generators: int = 0, init_from: str | None = None) -> str:
    """Build the model as a training run would (seeded; a fine-tune's is its parent) and
    store its weights: the feature actors and the training workers all load these, so
    the base is the same everywhere. Returns the digest of the base's weights."""
    import keras

    configure_gpus()
    keras.utils.set_random_seed(seed)
    overrides = {"weights": weights} if get_spec(name).pretrained else {}
    model = build_model(name, image_size=image_size, generators=generators, **overrides)
    if init_from:
        with storage.local_copy(storage.join(init_from, MODEL_FILE)) as path:
            model.load_weights(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        model.save_weights(local)
        with open(local, "rb") as handle:
            storage.write_bytes(uri, handle.read())
    return base_digest(model, feature_layer(name))


def base_digest(model, layer: str) -> str:
    """A digest of the weights of `model` up to `layer`: equal digests, equal features."""
    digest = hashlib.blake2b(digest_size=16)
    for weight in split(model, layer)[0].weights:
        digest.update(np.ascontiguousarray(np.asarray(weight.numpy(), np.float32)).tobytes())
    return digest.hexdigest()


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
        # Any batch size on one trace: batches of a block vary, and each new size would
        # trace and optimise the base's graph again.
        self._forward = tf.function(
            lambda x: base(x, training=False),
            input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
        self.image_size, self.augment, self.views, self.seed = image_size, augment, views, seed

    def __call__(self, batch: dict) -> dict:
        """Validation rows once, as they are; training rows `views` times, augmented when
        asked (a batch may hold rows of both splits)."""
        pixels = shards.decode_pixels(batch["image"], self.image_size)
        train = np.asarray(batch["split"]) == "train"
        carried = [c for c in ("label", "generator", "sha256") if c in batch]
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
