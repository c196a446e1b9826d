"""Training speed: the frozen-base feature cache against recomputing the base, or scaling.

`--mode cache` (default; ResNet50V2 at 224 px, weights none), in one run on the same shards
and settings, one worker with every core (and a GPU where one is visible: this is also the
GPU check for training and the feature pass; `bench/gpu.py` measures inference):
- seconds per epoch after the first, recomputing the base (--no-feature-cache) and on
  cached features, and their ratio;
- the whole run (Ray Train's fit, epochs included), the cached one with its feature pass,
  and their ratio; the feature pass's images/s.

`--mode incremental` (ResNet50V2 at 224 px, weights none): the feature cache of a fine-tune
on a set built on the base with `prepare --base --labels` (`--reviewed` new labelled
images), taking the base cache's rows and computing the reviewed images alone, against a
full feature pass over the same new set, in one run.

`--mode scaling` (resnet50v2_tiny at 64 px): images/s of data-parallel training with 1 and
2 workers sharing the cores, a worker's input pipeline alone, and the model's training
step alone on in-memory batches (if input is not well above the step rate, it bounds).

    .venv/bin/python bench/train.py [--mode cache|incremental|scaling] [--model M]
        [--image-size N] [--reviewed N]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import numpy as np
from _measure import save_json

HERE = os.path.dirname(os.path.abspath(__file__))


def training_rate(shards: str, out: str, model: str, workers: int, epochs: int) -> float:
    from detector.config import TrainConfig
    from detector.training.train import STATE, build_trainer

    cores = max(workers, os.cpu_count() or 1)
    cfg = TrainConfig(data=shards, model=(model,), out=out, workers=workers, epochs=epochs,
                      cpus_per_worker=cores // workers, batch_size=32, weights="none",
                      patience=epochs)
    result = build_trainer(cfg, model, _image_size(shards)).fit()
    with result.checkpoint.as_directory() as directory, open(os.path.join(directory, STATE)) as f:
        history = json.load(f)["history"][1:]  # the first epoch pays graph tracing
    images = sum(h["train_images"] for h in history) * workers
    return images / sum(h["seconds"] for h in history)


def cache_vs_recompute(shards: str, out: str, model: str, epochs: int, gpus: float = 0.0
                       ) -> dict:
    """Both paths with the same settings; times from the runs' own histories and clocks."""
    from detector.config import TrainConfig
    from detector.training import features
    from detector.training.train import STATE, build_trainer

    cores = os.cpu_count() or 1
    results = {}
    for cached in (False, True):
        cfg = TrainConfig(data=shards, model=(model,), out=f"{out}-{int(cached)}", workers=1,
                          epochs=epochs, cpus_per_worker=cores, gpus_per_worker=gpus,
                          batch_size=32,
                          weights="none", patience=epochs, lr_patience=epochs,
                          feature_cache=cached)
        size = _image_size(shards)
        started = time.perf_counter()
        cache = features.ensure_cache(cfg, model, size, say=lambda _: None) if cached else None
        pass_seconds = time.perf_counter() - started
        result = build_trainer(cfg, model, size, cache, say=lambda _: None).fit()
        whole = time.perf_counter() - started
        with result.checkpoint.as_directory() as directory, \
                open(os.path.join(directory, STATE)) as handle:
            history = json.load(handle)["history"]
        name = "cached" if cached else "recomputed"
        later = history[1:]
        results[f"{name}_seconds_per_epoch"] = sum(h["seconds"] for h in later) / len(later)
        results[f"{name}_whole_run_seconds"] = whole
        # What the published model would be: the epoch of lowest validation loss.
        best = min(history, key=lambda h: h["val_loss"])
        results[f"{name}_best_val_accuracy"] = best["val_accuracy"]
        results[f"{name}_best_epoch"] = best["epoch"]
        results[f"{name}_val_accuracy_by_epoch"] = [round(h["val_accuracy"], 4)
                                                   for h in history]
        if cached:
            from detector.data import shards as shard_sets

            manifest = shard_sets.read_manifest(shards)
            images = sum(manifest["counts"]["train"].values()) + sum(
                manifest["counts"]["val"].values())
            results["feature_pass_seconds"] = pass_seconds
            results["feature_pass_images_per_s"] = images / pass_seconds
    results["epoch_speedup"] = (results["recomputed_seconds_per_epoch"]
                                / results["cached_seconds_per_epoch"])
    results["whole_run_speedup"] = (results["recomputed_whole_run_seconds"]
                                    / results["cached_whole_run_seconds"])
    return results


def incremental_vs_full(tmp: str, shards: str, model: str, reviewed: int, gpus: float
                        ) -> dict:
    """A fine-tune's cache on `prepare --base` shards: incremental against a full pass
    (both include the fixed costs: the parent's weights, the actors' start)."""
    import dataclasses

    from detector.config import PrepareConfig, TrainConfig
    from detector.data import labels as label_data
    from detector.data import prepare
    from detector.data.sample import SampleSpec, write_sample
    from detector.io import storage
    from detector.io.preprocess import PREPROCESS_VERSION
    from detector.model.architectures import build_model, get_spec
    from detector.model.artifact import ModelCard, save_artifact
    from detector.training import features

    cores = os.cpu_count() or 1
    size = _image_size(shards)
    cfg = TrainConfig(data=shards, model=(model,), out=f"{tmp}/models", workers=1,
                      cpus_per_worker=cores, gpus_per_worker=gpus, weights="none")
    base_cache = features.ensure_cache(cfg, model, size, say=lambda _: None)
    # The parent: the model whose base the base cache holds (a frozen base keeps it).
    parent = f"{tmp}/parent"
    built = build_model(model, image_size=size, weights="none")
    features.load_weights(built, storage.join(base_cache, features.WEIGHTS))
    save_artifact(built, ModelCard(name=model, architecture=get_spec(model).family,
                                   image_size=size, preprocess_version=PREPROCESS_VERSION),
                  parent)
    write_sample(f"{tmp}/scanned", SampleSpec(per_class=max(1, reviewed // 2), size=size,
                                              seed=99))
    found = [label_data.Label.parse({"uri": o.uri, "label": "ai-generated"})
             for o in storage.list_objects(f"{tmp}/scanned")]
    label_data.append(f"{tmp}/labels", found, "bench")
    manifest = prepare.run(PrepareConfig(out=f"{tmp}/built", base=shards,
                                         labels=f"{tmp}/labels"), progress=False)
    tune = dataclasses.replace(cfg, data=f"{tmp}/built", init_from=parent)
    started = time.perf_counter()
    cache = features.ensure_cache(tune, model, size, say=lambda _: None)
    incremental = time.perf_counter() - started
    record = features.read_record(cache)
    # The baseline: the same call with no donor to take from (the base cache's record set
    # aside, the incremental cache removed), i.e. a full pass with the same fixed costs.
    storage.delete_tree(cache)
    donor_record = storage.join(base_cache, features.RECORD)
    kept = storage.read_bytes(donor_record)
    storage.delete_tree(donor_record)
    started = time.perf_counter()
    features.ensure_cache(tune, model, size, say=lambda _: None)
    full = time.perf_counter() - started
    storage.write_bytes(donor_record, kept)
    images = sum(sum(manifest["counts"][s].values()) for s in ("val", "train"))
    return {"images_cached": images, "images_computed": record["computed_images"],
            "incremental_seconds": incremental, "full_pass_seconds": full,
            "incremental_speedup": full / incremental}


def input_rate(shards: str, batch_size: int) -> float:
    from detector.data import shards as shard_sets

    dataset = shard_sets.read_split(shards, "train").materialize()
    size = _image_size(shards)
    started, seen = time.perf_counter(), 0
    for _ in range(3):
        for batch in dataset.iterator().iter_batches(batch_size=batch_size,
                                                     batch_format="numpy",
                                                     local_shuffle_buffer_size=2048):
            seen += len(shard_sets.decode_pixels(batch["image"], size))
    return seen / (time.perf_counter() - started)


def step_rate(model_name: str, size: int, batch_size: int, steps: int = 30) -> float:
    from detector.model.architectures import build_model
    from detector.training.fit import FitSettings, fit

    model = build_model(model_name, image_size=size)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (batch_size, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, batch_size).astype(np.float32)
    batches = lambda: ((x, y) for _ in range(steps))  # noqa: E731
    state = fit(model, batches, lambda: iter([(x, y)]), FitSettings(epochs=3, patience=9))
    seconds = sum(h["seconds"] for h in state.history[1:])
    return 2 * steps * batch_size / seconds


def _image_size(shards: str) -> int:
    from detector.data import shards as shard_sets

    return shard_sets.read_manifest(shards)["image_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="cache", choices=("cache", "incremental", "scaling"))
    parser.add_argument("--reviewed", type=int, default=60,
                        help="labelled new images (--mode incremental)")
    parser.add_argument("--model", help="default: resnet50v2 (cache), resnet50v2_tiny")
    parser.add_argument("--image-size", type=int, help="default: 224 (cache), 64")
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--epochs", type=int, help="default: 10 (cache), 4")
    parser.add_argument("--json", help="default: bench/results/train-MODE.json")
    parser.add_argument("--gpus", type=float, default=None, help="GPUs for the worker and "
                        "the feature actor (default: 1 where an NVIDIA device is visible)")
    args = parser.parse_args()
    gpus = args.gpus if args.gpus is not None else float(bool(glob.glob("/dev/nvidia[0-9]*")))
    cache_mode = args.mode in ("cache", "incremental")
    model = args.model or ("resnet50v2" if cache_mode else "resnet50v2_tiny")
    size = args.image_size or (224 if cache_mode else 64)
    epochs = args.epochs or (10 if cache_mode else 4)

    import ray

    from detector.config import PrepareConfig
    from detector.data import prepare
    from detector.data.sample import SampleSpec, write_sample

    ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=int(gpus + 0.999),
             include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        write_sample(f"{tmp}/bucket", SampleSpec(per_class=args.per_class, size=size))
        shards = f"{tmp}/shards"
        prepare.run(PrepareConfig(real=(f"{tmp}/bucket/real",), fake=(f"{tmp}/bucket/fake",),
                                  out=shards, image_size=size), progress=False)
        results = {"model": model, "image_size": size, "epochs": epochs,
                   "cores": os.cpu_count(), "gpus": gpus}
        if args.mode == "incremental":
            results |= incremental_vs_full(tmp, shards, model, args.reviewed, gpus)
        elif cache_mode:
            results |= cache_vs_recompute(shards, f"{tmp}/out", model, epochs, gpus)
        else:
            for workers in (1, 2):
                results[f"train_images_per_s_{workers}_workers"] = training_rate(
                    shards, f"{tmp}/out-{workers}", model, workers, epochs)
            results["input_pipeline_images_per_s"] = input_rate(shards, 16)
            results["model_step_images_per_s"] = step_rate(model, size, 16)
    ray.shutdown()
    if not cache_mode:
        results["scaling_2_vs_1_workers"] = (results["train_images_per_s_2_workers"]
                                             / results["train_images_per_s_1_workers"])
        results["input_vs_step_rate"] = (results["input_pipeline_images_per_s"]
                                         / results["model_step_images_per_s"])
    for key, value in results.items():
        print(f"{key:34s} {value:.3f}" if isinstance(value, float) else f"{key:34s} {value}")
    if args.mode == "incremental":
        print(f"=> the fine-tune's cache computed {results['images_computed']} of "
              f"{results['images_cached']} images: {results['incremental_speedup']:.1f}x "
              "faster than a full pass")
    elif cache_mode:
        print(f"=> an epoch on cached features is {results['epoch_speedup']:.1f}x faster; "
              f"the whole {epochs}-epoch run {results['whole_run_speedup']:.1f}x "
              "(feature pass included)")
    else:
        bound = "input" if results["input_vs_step_rate"] < 1.5 else "compute"
        print(f"=> training here is {bound}-bound")
    save_json(args.json or os.path.join(HERE, "results", f"train-{args.mode}.json"), results)


if __name__ == "__main__":
    main()
