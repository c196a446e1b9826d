"""The frozen-base feature cache on a local Ray: a set built on another (`prepare --base
--labels`) computes features only for its reviewed images and takes the rest from the
base set's cache, a fine-tune on its parent's shards computes none, and what is taken
equals what a full pass computes."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from detector.config import PrepareConfig, TrainConfig
from detector.data import labels as label_data
from detector.data import prepare, shards
from detector.data.sample import SampleSpec, write_sample
from detector.io import storage
from detector.training import features
from detector.training.train import READ_HERE_BELOW_BYTES, training_dataset

pytestmark = pytest.mark.ray

SIZE = 32
NAME = "resnet50v2_tiny_frozen"


def save_parent(tmp_path, weights_uri: str | None, seed: int = 0) -> str:
    """A published version of NAME whose weights are those at `weights_uri` (a frozen base
    keeps its initial weights through training), or seeded fresh ones."""
    import keras

    from detector.io.preprocess import PREPROCESS_VERSION
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, save_artifact

    keras.utils.set_random_seed(seed)
    model = build_model(NAME, image_size=SIZE, weights="none")
    if weights_uri:
        features.load_weights(model, weights_uri)
    card = ModelCard(name=NAME, architecture="resnet50v2", image_size=SIZE,
                     preprocess_version=PREPROCESS_VERSION)
    return save_artifact(model, card, str(tmp_path / f"parent-{seed}-{bool(weights_uri)}"))


def cache_rows(uri: str) -> dict[tuple[str, int, str], tuple[np.ndarray, int]]:
    """(split, view, sha256) -> (features, label) of every row of a cache."""
    rows = {}
    for split, view in features.split_views(2):
        table = pq.read_table(storage.join(uri, f"split={split}", f"view={view}"),
                              columns=["features", "label", "sha256"], partitioning=None)
        for vector, label, sha in zip(table["features"].to_numpy(), table["label"].to_pylist(),
                                      table["sha256"].to_pylist(), strict=True):
            key = (split, view, sha)
            assert key not in rows, key  # each image once per split and view
            rows[key] = (np.asarray(vector), label)
    return rows


def test_a_set_built_on_a_base_computes_features_only_for_its_reviewed_images(
        local_ray, tmp_path):
    write_sample(str(tmp_path / "bucket"), SampleSpec(per_class=40, size=SIZE, seed=5))
    base = str(tmp_path / "base")
    prepare.run(PrepareConfig(real=(str(tmp_path / "bucket" / "real"),),
                              fake=(str(tmp_path / "bucket" / "fake"),), out=base,
                              image_size=SIZE), progress=False)
    cfg = TrainConfig(data=base, model=(NAME,), out=str(tmp_path / "models"), weights="none",
                      workers=1, cpus_per_worker=1, augment="robust", views=2)
    said = []
    base_cache = features.ensure_cache(cfg, NAME, SIZE, say=said.append)
    base_record = features.read_record(base_cache)
    images = sum(sum(json.loads((tmp_path / "base" / "manifest.json").read_text())["counts"][s]
                     .values()) for s in ("val", "train"))
    assert (base_record["donor"], base_record["computed_images"]) == (None, images)
    # A run with other settings the key leaves out (learning rate, batch size) reuses it.
    said.clear()
    assert features.ensure_cache(dataclasses.replace(cfg, lr=1e-4, batch_size=8), NAME, SIZE,
                                 say=said.append) == base_cache
    assert said == [f"Feature cache for {NAME}: reusing {base_cache} "
                    f"({base_record['rows']['train']:,} training rows, 2 view(s))"], said

    # A reviewer labels new images by URI and relabels one base image by its hash.
    write_sample(str(tmp_path / "scanned"), SampleSpec(per_class=4, size=SIZE, seed=6))
    new = sorted(o.uri for o in storage.list_objects(str(tmp_path / "scanned")))
    train = pq.read_table(tmp_path / "base" / json.loads(
        (tmp_path / "base" / "manifest.json").read_text())["parts"]["train"][0]).to_pylist()
    relabelled = train[0]
    found = [{"uri": uri, "label": "ai-generated"} for uri in new]
    found.append({"sha256": relabelled["sha256"],
                  "label": "real" if relabelled["label"] else "ai-generated"})
    label_data.append(str(tmp_path / "labels"), map(label_data.Label.parse, found), "ana")
    built = str(tmp_path / "built")
    manifest = prepare.run(PrepareConfig(out=built, base=base, labels=str(tmp_path / "labels")),
                           progress=False)
    reviewed = features.reviewed_hashes(built, manifest)
    # The reviewed images of the validation and training splits (the test split is never
    # cached), the relabelled one among them.
    assert relabelled["sha256"] in reviewed
    assert 0 < len(reviewed) <= manifest["reviewed"]["written"] + 1

    # A fine-tune sees each reviewed training image --review-weight times an epoch: read
    # here, and through Ray Data (larger sets); from the shards, and from a feature cache
    # below.
    again = sorted(features.reviewed_hashes(built, manifest, ("train",)))
    assert again and set(again) <= reviewed
    train_images = sum(manifest["counts"]["train"].values())

    def assert_repeated(dataset) -> None:
        seen = Counter(row["sha256"] for row in dataset.iter_rows())
        assert {sha for sha, n in seen.items() if n == 3} == set(again)
        assert set(seen.values()) == {1, 3}
        assert sum(seen.values()) == train_images + 2 * len(again)

    fs, paths = shards.split_files(built, "train", manifest)
    for size in (0, READ_HERE_BELOW_BYTES):
        assert_repeated(training_dataset(fs, paths, ["label", "sha256"], size, (again, 3)))

    # Fine-tuning the version trained on the base (its base is the cache's) on the new set.
    parent = save_parent(tmp_path, storage.join(base_cache, features.WEIGHTS))
    tune = dataclasses.replace(cfg, data=built, init_from=parent)
    said.clear()
    cache = features.ensure_cache(tune, NAME, SIZE, say=said.append)
    record = features.read_record(cache)
    assert record["donor"] == base_cache and record["computed_images"] == len(reviewed)
    assert record["base"] == base_record["base"] and cache != base_cache
    assert any(f"come from {base_cache}, {len(reviewed)} computed" in line for line in said)
    fs, path, size = features.feature_files(cache, "train", view=1)
    assert_repeated(training_dataset(fs, [path], ["label", "sha256"], size, (again, 3)))

    # What was taken is what a full pass over the new set computes.
    full = str(tmp_path / "full")
    storage.write_bytes(storage.join(full, features.WEIGHTS),
                        storage.read_bytes(storage.join(cache, features.WEIGHTS)))
    key = features.key_for(tune, NAME, SIZE, manifest)
    features.extract(tune, NAME, SIZE, key, full, manifest, 0, None,
                     {"num_cpus": 1, "num_gpus": 0})
    taken, computed = cache_rows(cache), cache_rows(full)
    assert taken.keys() == computed.keys()
    for row, (vector, label) in computed.items():
        np.testing.assert_allclose(taken[row][0], vector, atol=1e-4, err_msg=str(row))
        assert taken[row][1] == label, row
    relabelled_rows = [r for r in taken if r[2] == relabelled["sha256"]]
    assert relabelled_rows and all(taken[r][1] != relabelled["label"] for r in relabelled_rows)

    # A fine-tune on the parent's own shards computes nothing; a parent with another base
    # takes nothing.
    same = features.ensure_cache(dataclasses.replace(cfg, init_from=parent), NAME, SIZE,
                                 say=said.append)
    assert features.read_record(same)["computed_images"] == 0
    assert features.read_record(same)["donor"] == base_cache
    # (The rule alone: a cache without a donor computing every image is the first one's.)
    import keras

    from detector.model.artifact import MODEL_FILE

    other = save_parent(tmp_path, None, seed=7)
    other_cfg = dataclasses.replace(cfg, init_from=other)
    other_base = features.base_digest(
        keras.models.load_model(storage.join(other, MODEL_FILE), compile=False),
        features.feature_layer(NAME))
    base_manifest = json.loads((tmp_path / "base" / "manifest.json").read_text())
    other_key = features.key_for(other_cfg, NAME, SIZE, base_manifest)
    assert other_base != base_record["base"]
    assert features.find_donor(base, base_manifest, other_key, other_base) is None
    assert features.find_donor(base, base_manifest, other_key, base_record["base"])["uri"] \
        in (base_cache, same)  # the same key with the base's weights finds one
