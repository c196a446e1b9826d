"""Ray Train: data-parallel training of each requested model, then evaluation.

Driver side (`train_models`): one data-parallel Ray Train trainer per model, each worker reading its
own shard of the training split from Ray Data; afterwards one Ray task (on a worker, with
the workers' resources) turns the best checkpoint into the final artifact. Worker side
(`train_loop_per_worker`): MultiWorkerMirroredStrategy around `detector.training.fit.fit`.

Checkpoints (current weights, best weights, loop state, optimizer state) are reported
after the first epoch, the last, and every epoch that ends CHECKPOINT_INTERVAL_S or more
after the previous one (each epoch, where epochs take longer), so a failed worker or a
killed job continues from its last checkpoint as if never stopped; `--resume` continues
only a run of the same shards and settings (`start_run`). A model with a frozen base
trains its head on features cached once (`detector.training.features`); its checkpoints
then hold the head alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector.config import TrainConfig, to_dict
from detector.data import shards
from detector.data.augment import robust_augment
from detector.io import console, parquet, storage
from detector.io.preprocess import PREPROCESS_VERSION
from detector.io.threads import configure_gpus, limit_threads, reserved_threads
from detector.model.architectures import build_model, get_spec
from detector.model.artifact import MODEL_FILE, ModelCard, load_card, publish_version, resolve
from detector.model.export import ExportRefused, export_from_shards
from detector.model.predictor import Predictor
from detector.model.runtimes import training_policy, with_dtype_policy
from detector.training import evaluate, features
from detector.training.attribution import generator_classes, labels_with_generators
from detector.training.evaluate import parse_policy
from detector.training.fit import EpochEnd, FitSettings, FitState, fit
from detector.verdicts import familiarity, residual

CURRENT_WEIGHTS = "current.weights.h5"
BEST_WEIGHTS = "best.weights.h5"
STATE = "state.json"
OPTIMIZER = "optimizer.npz"  # Adam's step count and moments: a resume continues them
RUNS_DIR = "_ray_runs"
SHUFFLE_BUFFER_ROWS = 2048
# Ray Train's controller takes one report per worker each time it polls them (every 2 s
# by default) and a worker's next report waits for that: epochs shorter than the poll
# (fine-tuning on a few hundred images) would each wait up to 2 s. Polls are one small
# RPC per worker; a user's own RAY_TRAIN_HEALTH_CHECK_INTERVAL_S still wins.
REPORT_POLL_S = "0.25"
# Each worker's BatchNorm layers normalise that worker's share of a step's batch alone. At
# 8 images a worker, resnet50v2_tiny on 2 workers reached 0.75 test accuracy on the sample
# data (val loss rising for the first epochs); at 16, 0.93 with everything else the same.
MIN_BATCH_NORM_SHARE = 16
# Writing a checkpoint and having Ray Train register it took 0.9 s on 2 cores, as long as
# an epoch of the sample data: epochs shorter than this are checkpointed once per interval,
# not each, so a lost worker costs at most this much training.
CHECKPOINT_INTERVAL_S = 30.0


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import keras
    import ray.train
    import tensorflow as tf

    cfg = TrainConfig(**loop_config["train_config"])
    configure_gpus()
    threads = reserved_threads(cfg.cpus_per_worker, cfg.gpus_per_worker)
    if threads:
        limit_threads(threads)  # not every core of the host; before the first model
    name, image_size = loop_config["model"], loop_config["image_size"]
    classes = loop_config.get("generators") or []  # the attribution head's, if any
    cache = loop_config.get("feature_cache")  # train the head on cached features
    relay = loop_config.get("relay")  # lines for the person running the job (console.py)
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    keras.utils.set_random_seed(cfg.seed)
    # TF_CONFIG is set on every worker (detector.training.backend); the strategy
    # all-reduces gradients between them.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model(name, image_size=image_size,
                            **_build_overrides(name, cfg, classes))
        if cfg.mixed_precision:  # same float32 weights, so checkpoints load either way
            model = with_dtype_policy(model, training_policy(cfg.gpus_per_worker))
        # What the optimizer trains: the head alone (its layers are the model's own) when
        # the frozen base's features come from the cache, else the whole model.
        trained = features.split(model, features.feature_layer(name))[1] if cache else model

    if cache:  # the weights the cached features were computed with
        features.load_weights(model, storage.join(cache, features.WEIGHTS))
    # Checkpoints hold the weights of what trains: with the cache, the head alone (a few
    # MB instead of the base's ~95 MB per epoch); the base is in the cache.
    state, best_weights, optimizer_state = None, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trained.load_weights(os.path.join(directory, CURRENT_WEIGHTS))
            with open(os.path.join(directory, STATE)) as handle:
                state = FitState.from_dict(json.load(handle))
            best_weights = _read_weights(trained, os.path.join(directory, BEST_WEIGHTS))
            optimizer_state = _read_optimizer(os.path.join(directory, OPTIMIZER))
        if rank == 0:
            console.say(relay, f"Resuming {name} from its checkpoint after epoch {state.epoch}")
    elif cfg.init_from:  # a fine-tune's first start: the parent's weights
        with storage.local_copy(storage.join(cfg.init_from, MODEL_FILE)) as path:
            model.load_weights(path)

    per_worker_batch = worker_batch(cfg.batch_size, world)
    rng = np.random.default_rng([cfg.seed, rank, state.epoch if state else 0])
    epochs_started = [state.epoch if state else 0]

    def batches(split: str, train: bool):
        def generate():
            if cache and train:  # epoch e reads augmented view e mod K of every image
                view = epochs_started[0] % features.views_of(cfg)
                shard = ray.train.get_dataset_shard(train_view(view))
                epochs_started[0] += 1
            else:
                shard = ray.train.get_dataset_shard(split)
            # drop_last keeps every worker at the same step count, which the all-reduce needs.
            for batch in shard.iter_batches(
                batch_size=per_worker_batch, batch_format="numpy", drop_last=train,
                # A fresh order every epoch, within a bounded buffer (memory stays flat).
                local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS if train else None,
                local_shuffle_seed=int(rng.integers(2**31)) if train else None,
            ):
                labels = labels_with_generators(batch["label"], batch["generator"], classes) \
                    if classes else batch["label"]
                if cache:
                    yield batch["features"], labels
                    continue
                pixels = shards.decode_pixels(batch["image"], image_size)
                if train and cfg.augment == "robust":
                    pixels = np.stack([robust_augment(p, rng) for p in pixels])
                yield pixels, labels

        return generate

    last_checkpoint: list[float | None] = [None]  # when this attempt last checkpointed

    def on_epoch_end(end: EpochEnd) -> None:
        metrics = {k: v for k, v in end.metrics.items() if isinstance(v, int | float)}
        if rank != 0:
            ray.train.report(metrics)
            return
        console.say(relay, epoch_line(name, cfg.epochs, end))
        now = time.monotonic()
        if not checkpoint_due(end, last_checkpoint[0], now):
            ray.train.report(metrics)
            return
        last_checkpoint[0] = now
        with tempfile.TemporaryDirectory() as directory:
            trained.save_weights(os.path.join(directory, CURRENT_WEIGHTS))
            _save_best(trained, end.best_weights, os.path.join(directory, BEST_WEIGHTS))
            np.savez(os.path.join(directory, OPTIMIZER), *end.optimizer_state)
            with open(os.path.join(directory, STATE), "w") as handle:
                json.dump(end.state.to_dict(), handle)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    settings = FitSettings(
        epochs=cfg.epochs, lr=cfg.lr, patience=cfg.patience, lr_patience=cfg.lr_patience,
        max_steps_per_epoch=cfg.max_steps_per_epoch,
    )
    fit(
        trained, batches("train", True), batches("val", False), settings,
        strategy=strategy, state=state, on_epoch_end=on_epoch_end, best_weights=best_weights,
        optimizer_state=optimizer_state,
    )


def worker_batch(batch_size: int, workers: int) -> int:
    """Images per worker and step: the global --batch-size split across the workers."""
    return max(1, batch_size // workers)


def epoch_line(name: str, epochs: int, end: EpochEnd) -> str:
    """One line per epoch for the person running the job."""
    m = end.metrics
    return (f"  {name} epoch {m['epoch']}/{epochs}: loss {m['loss']:.4f}  val_loss "
            f"{m['val_loss']:.4f}  val_acc {m['val_accuracy']:.3f}  lr {m['lr']:.1e}  "
            f"{m['seconds']:.1f} s{'  *' if end.improved else ''}")


def train_view(view: int) -> str:
    """The name of the Ray Train dataset holding cached view `view` of the training split."""
    return f"train_view{view}"


def _read_optimizer(path: str):
    """The optimizer variables saved in a checkpoint; None in checkpoints from before
    they were saved (Adam then restarts, as it always did)."""
    if not os.path.exists(path):
        return None
    with np.load(path) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


def checkpoint_due(end: EpochEnd, last: float | None, now: float) -> bool:
    """Whether this epoch ends in a checkpoint: the first of an attempt (a storage path
    that cannot be written fails the run at once), the final one, and otherwise one at
    least CHECKPOINT_INTERVAL_S after the last."""
    return last is None or end.final or now - last >= CHECKPOINT_INTERVAL_S


def _save_best(model, best_weights: list | None, path: str) -> None:
    """The best epoch's weights (the current ones before any epoch improved) to `path`."""
    if best_weights is None:
        model.save_weights(path)
        return
    current = model.get_weights()
    model.set_weights(best_weights)
    model.save_weights(path)
    model.set_weights(current)


def _read_weights(model, path: str):
    """Weights stored in `path` as a list, leaving `model` as it was."""
    if not os.path.exists(path):
        return None
    current = model.get_weights()
    model.load_weights(path)
    stored = model.get_weights()
    model.set_weights(current)
    return stored


def _build_overrides(name: str, cfg: TrainConfig, generators: list[str]) -> dict:
    """build_model's settings for training `name`: its base weights
    (`features.base_weights`), its head's classes."""
    weights = {"weights": features.base_weights(cfg)} if get_spec(name).pretrained else {}
    return weights | {"generators": len(generators)}


def build_trainer(cfg: TrainConfig, name: str, image_size: int, feature_cache: str | None = None,
                  say=print, relay: Any = None):
    """The Ray Train trainer for one model (data-parallel, TensorFlow's multi-worker
    strategy: `detector.training.backend`), reading the prepared shards, or the frozen
    base's cached features at `feature_cache` (see `detector.training.features`)."""
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from detector.training.backend import MultiWorkerConfig

    # Read by the trainer in this process and passed on to its controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
    run_name = f"train-{name}"
    storage_path = storage.join(cfg.out, RUNS_DIR)
    start_run(cfg, name, image_size, storage.join(storage_path, run_name), say)
    fs, path = storage.resolve(storage_path)
    if not storage.is_s3(storage_path):
        os.makedirs(path, exist_ok=True)
    manifest = shards.read_manifest(cfg.data)
    classes = generator_classes(manifest)
    extra = ["generator"] if classes else []
    # Reviewed images repeated in the training split (--review-weight): their hashes, as
    # many as there are labels, find their rows in the shards and in a feature cache alike.
    reviewed = sorted(features.reviewed_hashes(cfg.data, manifest, ("train",))) \
        if cfg.review_weight > 1 else []
    repeat = (reviewed, cfg.review_weight)
    if reviewed:
        say(f"{name}: {len(reviewed)} reviewed training images, each seen "
            f"{cfg.review_weight}x per epoch")
    if feature_cache:
        views = features.views_of(cfg)
        datasets = {"val": _feature_dataset(feature_cache, "val", columns=extra)}
        datasets |= {train_view(k): _feature_dataset(feature_cache, "train", k, extra, repeat)
                     for k in range(views)}
    else:
        datasets = {"train": _shard_dataset(cfg.data, "train", manifest, extra, repeat),
                    "val": _shard_dataset(cfg.data, "val", manifest, extra)}
    if classes:
        say(f"{name}: an attribution head over {len(classes)} generators "
            f"({', '.join(classes)})")
    return DataParallelTrainer(
        train_loop_per_worker,
        backend_config=MultiWorkerConfig(),
        train_loop_config={"train_config": to_dict(cfg), "model": name, "image_size": image_size,
                           "feature_cache": feature_cache, "relay": relay,
                           "generators": classes},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}
            if cfg.gpus_per_worker > 0 else {"CPU": cfg.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )


# The settings a checkpoint's weights and optimizer state depend on: `--resume` continues
# a run only when all of them (and the shards' fingerprint) are what they were. Epochs,
# patience, workers and resources may change between a run and its resume.
RUN_SETTINGS = ("weights", "augment", "views", "lr", "batch_size", "seed", "init_from")
# Settings added after runs were recorded: in the key only when not their default, so
# runs recorded before them still resume.
LATER_RUN_SETTINGS = ("review_weight",)


def run_key(cfg: TrainConfig, name: str, image_size: int) -> dict:
    """What identifies a training run for `--resume`."""
    settings = to_dict(cfg)
    key = {"fingerprint": shards.read_manifest(cfg.data)["fingerprint"], "model": name,
           "image_size": image_size}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    key |= {setting: settings[setting] for setting in LATER_RUN_SETTINGS
            if settings[setting] != defaults[setting]}
    return key | {setting: settings[setting] for setting in RUN_SETTINGS} | {
        "views": features.views_of(cfg),
        # Checkpoints on the cache hold the head alone: not a run to continue without it.
        "feature_cache": bool(cfg.feature_cache and features.feature_layer(name))}


def start_run(cfg: TrainConfig, name: str, image_size: int, run_uri: str, say=print) -> None:
    """Keep the run at `run_uri` for Ray Train to resume, or clear it for a fresh run.

    `--resume` keeps it only when its record shows the same shards and settings; anything
    else starts fresh with one line saying why, so re-applying a train job after the
    shards changed trains on them instead of republishing the old weights."""
    key = run_key(cfg, name, image_size)
    record_uri = run_uri + RUN_RECORD_SUFFIX
    previous = json.loads(storage.read_bytes(record_uri)) if storage.exists(record_uri) else None
    if cfg.resume and previous == key:
        return
    if cfg.resume and previous is None:
        say(f"--resume: no earlier run of {name} under {cfg.out}; starting fresh")
    elif cfg.resume:
        changed = sorted(k for k in key.keys() | previous.keys()
                         if previous.get(k) != key.get(k))
        say(f"--resume: the checkpointed run of {name} had other {', '.join(changed)}; "
            "starting fresh")
    storage.delete_tree(run_uri)
    storage.write_bytes(record_uri, json.dumps(key, indent=2).encode())


RUN_RECORD_SUFFIX = ".run.json"  # beside Ray Train's run directory, not inside it
# Splits below the first size are read here and handed to Ray as one table (Ray Data's
# own read starts read tasks in new worker processes: seconds per split and model, longer
# than a tiny split takes to train on); below the second they are read by Ray Data once
# into the object store, so epochs after the first do not pay Parquet reads again; larger
# ones stream from storage every epoch.
READ_HERE_BELOW_BYTES = 64 << 20
MATERIALIZE_BELOW_BYTES = 1 << 30


def _shard_dataset(shards_uri: str, split: str, manifest: dict, extra: list[str],
                   repeat: tuple[list[str], int] = ((), 1)):
    rows = sum(manifest["counts"][split].values())
    fs, paths = shards.split_files(shards_uri, split, manifest)
    return training_dataset(fs, paths, ["image", "label", *extra],
                            rows * 3 * manifest["image_size"] ** 2, repeat)


def _feature_dataset(cache_uri: str, split: str, view: int = 0, columns: list[str] = (),
                     repeat: tuple[list[str], int] = ((), 1)):
    fs, path, size = features.feature_files(cache_uri, split, view)
    return training_dataset(fs, [path], ["features", "label", *columns], size, repeat)


def training_dataset(fs, paths: list[str], columns: list[str], size_bytes: int,
                     repeat: tuple[list[str], int] = ((), 1)):
    """The Ray dataset Ray Train feeds the workers from, for Parquet `paths` holding
    about `size_bytes` (see READ_HERE_BELOW_BYTES). `repeat` = (hashes, k): the rows of
    those images k times (the reviewed images of a fine-tune, --review-weight)."""
    import ray

    if size_bytes < READ_HERE_BELOW_BYTES:
        dataset = ray.data.from_arrow(pa.concat_tables(
            pq.read_table(path, filesystem=fs, columns=columns, partitioning=None)
            for path in paths))
    else:
        dataset = parquet.read_parquet(paths, fs, columns=columns, partitioning=None)
        if size_bytes < MATERIALIZE_BELOW_BYTES:
            dataset = dataset.materialize()
    hashes, times = repeat
    if not hashes or times < 2:
        return dataset
    wanted = pc.field("sha256").isin(list(hashes))
    again = pa.concat_tables(pq.read_table(path, filesystem=fs, columns=columns,
                                           partitioning=None, filters=wanted)
                             for path in paths)
    if not again.num_rows:
        return dataset
    # Extra copies as blocks among the others in a random order: the shuffle buffer mixes
    # what is near, so copies appended at the end would crowd the last steps of an epoch.
    return dataset.union(ray.data.from_arrow([again] * (times - 1))).randomize_block_order()


def finalize(cfg: TrainConfig, name: str, image_size: int, checkpoint_dir: str,
             feature_cache: str | None = None) -> dict:
    """Best checkpoint -> an evaluated new version OUT/<name>/<id>/, then the pointer
    OUT/<name>/latest.json moved to it. Returns its metrics."""
    manifest = shards.read_manifest(cfg.data)
    with open(os.path.join(checkpoint_dir, STATE)) as handle:
        state = FitState.from_dict(json.load(handle))
    classes = generator_classes(manifest)
    model = build_model(name, image_size=image_size, **_build_overrides(name, cfg, classes))
    if feature_cache:  # the cache's base, then the best head trained on its features
        features.load_weights(model, storage.join(feature_cache, features.WEIGHTS))
        features.split(model, features.feature_layer(name))[1].load_weights(
            os.path.join(checkpoint_dir, BEST_WEIGHTS))
    else:
        model.load_weights(os.path.join(checkpoint_dir, BEST_WEIGHTS))
    card = ModelCard(
        name=name,
        architecture=_family(name),
        image_size=image_size,
        preprocess_version=PREPROCESS_VERSION,
        data_fingerprint=manifest["fingerprint"],
        domain=training_domain(cfg.data, manifest),
        generators=classes,
        config=to_dict(cfg) | {"best_epoch": state.best_epoch, "epochs_run": state.epoch},
        parent=parent_of(cfg),
    )
    report = evaluate.evaluate_model(Predictor.from_model(model, card), cfg.data,
                                     history=state.history, policy=cfg.threshold_policy)
    card.threshold = report.threshold
    card.metrics = report.headline()

    refusals = []

    def files(directory: str) -> None:
        report.write(directory)
        # The card is written after this: its parity record names a file already there.
        try:
            card.exports = export_from_shards(model, card, directory, cfg.data, cfg.int8)
        except ExportRefused as refused:  # the model itself is good: publish it without
            card.exports = refused.kept
            refusals.append(str(refused))

    version = publish_version(model, card, storage.join(cfg.out, name), extra_files=files,
                              candidate=bool(cfg.init_from))
    return {"model": name, "id": card.id, "artifact": version, **card.metrics,
            "parent": card.parent.get("id"),
            "best_epoch": state.best_epoch, "epochs": state.epoch,
            "exports": sorted(card.exports), "export_refused": refusals[0] if refusals else None}


def parent_of(cfg: TrainConfig) -> dict:
    """The card's record of the version a fine-tune started from ({}: from scratch)."""
    if not cfg.init_from:
        return {}
    parent = load_card(cfg.init_from)
    return {"id": parent.id, "name": parent.name, "uri": cfg.init_from}


def fine_tune_from(cfg: TrainConfig, image_size: int, classes: list[str], say=print
                   ) -> TrainConfig:
    """`cfg` with `--init-from` resolved to one version (a name's latest moves on; the
    run and its card record the version it really started from), after checking the
    version fits: the same model, input size and generators. A frozen base trains on the
    features of the parent's base, cached like any (`detector.training.features`)."""
    uri = resolve(cfg.init_from)
    parent = load_card(uri)
    wanted = {"--model": (list(cfg.model), [parent.name]),
              "image size": (image_size, parent.image_size),
              "generators": (classes, list(parent.generators)),
              "preprocessing version": (PREPROCESS_VERSION, parent.preprocess_version)}
    for what, (asked, its) in wanted.items():
        if asked != its:
            raise ValueError(f"--init-from {uri} is {parent.name}@{parent.id}: its {what} is "
                             f"{its}, this run's {asked}. A fine-tune continues the same "
                             "model on data prepared the same way; train from scratch "
                             "otherwise")
    say(f"Fine-tuning {parent.name} from version {parent.id} ({cfg.epochs} epochs at lr "
        f"{cfg.lr:g}); the new version is a candidate: `detector promote` moves latest")
    return dataclasses.replace(cfg, init_from=uri)


def training_domain(shards_uri: str, manifest: dict) -> dict:
    """The train split's source formats and sizes (see `detector.verdicts.familiarity`)
    and its real images' residual spectra (`detector.verdicts.residual`), for the card;
    read part by part, so memory stays that of one."""
    domain = familiarity.measure(shards.source_shapes(shards_uri, "train", manifest))
    card = domain.to_card() if domain else {}
    fitted = residual.fit(real_residuals(shards_uri, "train", manifest),
                          real_residuals(shards_uri, "val", manifest))
    return {**card, "residual": fitted} if card and fitted else card


# Real images per split the residual model is fitted on: plenty for its few numbers
# (residual.FEATURES means and covariances), and a bounded pass on any data set.
RESIDUAL_FIT_IMAGES = 4000


def real_residuals(shards_uri: str, split: str, manifest: dict,
                   limit: int = RESIDUAL_FIT_IMAGES) -> np.ndarray:
    """Residual spectrum features of the first `limit` real images of a split (parts in
    the manifest's order; splits are by content hash, so any prefix is a fair sample)."""
    fs, paths = shards.split_files(shards_uri, split, manifest)
    rows, have = [], 0
    for path in paths:
        table = pq.read_table(path, filesystem=fs, columns=["image"], partitioning=None,
                              filters=pc.field("label") == 0).slice(0, limit - have)
        if table.num_rows:
            rows.append(residual.features(shards.decode_pixels(table["image"].to_pylist(),
                                                               manifest["image_size"])))
        have += table.num_rows
        if have >= limit:
            break
    return np.concatenate(rows) if rows else np.zeros((0, residual.FEATURES))


def _family(name: str) -> str:
    return get_spec(name).family


def settle(cfg: TrainConfig, say=print) -> tuple[TrainConfig, int]:
    """(`cfg` with local paths absolute and `--init-from` resolved, the input size), or a
    ValueError for settings that cannot train: checked before any Ray or TensorFlow work
    starts."""
    parse_policy(cfg.threshold_policy)  # a typo fails now, not after hours of training
    if cfg.review_weight < 1:
        raise ValueError(f"--review-weight {cfg.review_weight}: give 1 or more")
    # Paths as the user typed them, relative to this directory; the workers run elsewhere.
    cfg = dataclasses.replace(cfg, data=storage.absolute(cfg.data),
                              out=storage.absolute(cfg.out),
                              init_from=cfg.init_from and storage.absolute(cfg.init_from))
    manifest = shards.read_manifest(cfg.data)
    image_size = cfg.image_size or manifest["image_size"]
    if image_size != manifest["image_size"]:
        raise ValueError(
            f"--image-size {image_size} differs from the shards' {manifest['image_size']}: "
            "re-run `detector prepare --image-size` instead of resizing prepared pixels"
        )
    if cfg.init_from:
        cfg = fine_tune_from(cfg, image_size, generator_classes(manifest), say)
    share = worker_batch(cfg.batch_size, cfg.workers)
    for name in cfg.model:
        if get_spec(name).batch_norm and share < MIN_BATCH_NORM_SHARE:
            say(f"Note: {name} normalises each worker's {share} images a step on their own "
                f"(--batch-size {cfg.batch_size} over {cfg.workers} workers); below "
                f"{MIN_BATCH_NORM_SHARE} its BatchNorm statistics are noisy: raise "
                f"--batch-size to {MIN_BATCH_NORM_SHARE * cfg.workers} or more")
    return cfg, image_size


def train_models(cfg: TrainConfig) -> dict:
    """Train every model in `cfg.model` one after another; write the comparison table."""
    import ray

    cfg, image_size = settle(cfg)
    results = []
    # Evaluation runs where training ran (a worker with the same resources), not on the
    # head node, which on a real cluster has no GPU and should do no work.
    finalize_task = ray.remote(_finalize_task).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker
    )
    for name in cfg.model:
        cache = None
        if cfg.feature_cache and features.feature_layer(name):
            cache = features.ensure_cache(cfg, name, image_size)
        with console.Relay() as relay:  # epoch lines from rank 0, printed here
            result = build_trainer(cfg, name, image_size, cache, relay=relay.handle).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training {name} reported no checkpoint: {result.error}")
        results.append(ray.get(finalize_task.remote(cfg, name, image_size,
                                                    result.checkpoint.path, cache)))
    comparison = write_comparison(cfg.out, results)
    return {"models": results, "comparison": comparison}


def _finalize_task(cfg: TrainConfig, name: str, image_size: int, checkpoint_path: str,
                   feature_cache: str | None) -> dict:
    if not storage.is_s3(cfg.out):
        return finalize(cfg, name, image_size, checkpoint_path, feature_cache)
    with tempfile.TemporaryDirectory() as local:  # checkpoint paths on S3 lack the scheme
        storage.download_dir(f"s3://{checkpoint_path}", local)
        return finalize(cfg, name, image_size, local, feature_cache)


COMPARISON_COLUMNS = (
    ("model", "Model"), ("id", "Version"), ("accuracy", "Accuracy"), ("precision", "Precision"),
    ("recall", "Recall"), ("f1", "F1"), ("roc_auc", "ROC AUC"), ("specificity", "Specificity"),
    ("tpr_at_1pct_fpr", "TPR@1%FPR"), ("ece", "ECE"), ("threshold", "Threshold"),
    ("attribution_accuracy", "Attribution acc."), ("attribution_macro_f1", "Attribution F1"),
    ("best_epoch", "Best epoch"),
)


def write_comparison(out_uri: str, results: list[dict]) -> str:
    """The notebook's model comparison table, as Markdown and JSON beside the artifacts."""
    header = "| " + " | ".join(title for _, title in COMPARISON_COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COMPARISON_COLUMNS)]
    for result in results:
        cells = [_cell(result.get(key)) for key, _ in COMPARISON_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    storage.write_bytes(storage.join(out_uri, "comparison.md"), table.encode())
    storage.write_bytes(
        storage.join(out_uri, "comparison.json"), json.dumps(results, indent=2).encode()
    )
    return table


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
