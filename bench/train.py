"""Training throughput: 1 vs 2 Ray Train workers, and input pipeline vs model step rate.

All in one run on the same shards:
- images/s of data-parallel training with 1 and 2 workers sharing the machine's cores
  (1 worker x all cores vs 2 workers x half; epochs after the first);
- a worker's input pipeline alone (Ray Data shard -> decoded uint8 batches), images/s;
- the model's training step alone on in-memory batches, images/s.
If the input pipeline is not well above the step rate, input bounds training.

    .venv/bin/python bench/train.py [--model resnet50v2_tiny] [--image-size 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from _measure import save_json

HERE = os.path.dirname(os.path.abspath(__file__))


def training_rate(shards: str, out: str, model: str, workers: int, epochs: int) -> float:
    from detector.config import TrainConfig
    from detector.train import STATE, build_trainer

    cores = max(workers, os.cpu_count() or 1)
    cfg = TrainConfig(data=shards, model=(model,), out=out, workers=workers, epochs=epochs,
                      cpus_per_worker=cores // workers, batch_size=32, weights="none",
                      patience=epochs)
    result = build_trainer(cfg, model, _image_size(shards)).fit()
    with result.checkpoint.as_directory() as directory, open(os.path.join(directory, STATE)) as f:
        history = json.load(f)["history"][1:]  # the first epoch pays graph tracing
    images = sum(h["train_images"] for h in history) * workers
    return images / sum(h["seconds"] for h in history)


def input_rate(shards: str, batch_size: int) -> float:
    from detector import data

    dataset = data.read_split(shards, "train").materialize()
    size = _image_size(shards)
    started, seen = time.perf_counter(), 0
    for _ in range(3):
        for batch in dataset.iterator().iter_batches(batch_size=batch_size,
                                                     batch_format="numpy",
                                                     local_shuffle_buffer_size=2048):
            seen += len(data.decode_pixels(batch["image"], size))
    return seen / (time.perf_counter() - started)


def step_rate(model_name: str, size: int, batch_size: int, steps: int = 30) -> float:
    from detector.fit import FitSettings, fit
    from detector.models import build_model

    model = build_model(model_name, image_size=size)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (batch_size, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, batch_size).astype(np.float32)
    batches = lambda: ((x, y) for _ in range(steps))  # noqa: E731
    state = fit(model, batches, lambda: iter([(x, y)]), FitSettings(epochs=3, patience=9))
    seconds = sum(h["seconds"] for h in state.history[1:])
    return 2 * steps * batch_size / seconds


def _image_size(shards: str) -> int:
    from detector import data

    return data.read_manifest(shards)["image_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50v2_tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "train.json"))
    args = parser.parse_args()

    import ray

    from detector import prepare
    from detector.config import PrepareConfig
    from detector.sample import SampleSpec, write_sample

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        write_sample(f"{tmp}/bucket", SampleSpec(per_class=args.per_class, size=args.image_size))
        shards = f"{tmp}/shards"
        prepare.run(PrepareConfig(real=(f"{tmp}/bucket/real",), fake=(f"{tmp}/bucket/fake",),
                                  out=shards, image_size=args.image_size), progress=False)
        results = {"model": args.model, "image_size": args.image_size}
        for workers in (1, 2):
            results[f"train_images_per_s_{workers}_workers"] = training_rate(
                shards, f"{tmp}/out-{workers}", args.model, workers, args.epochs)
        results["input_pipeline_images_per_s"] = input_rate(shards, 16)
        results["model_step_images_per_s"] = step_rate(args.model, args.image_size, 16)
    ray.shutdown()
    results["scaling_2_vs_1_workers"] = (results["train_images_per_s_2_workers"]
                                         / results["train_images_per_s_1_workers"])
    results["input_vs_step_rate"] = (results["input_pipeline_images_per_s"]
                                     / results["model_step_images_per_s"])
    for key, value in results.items():
        print(f"{key:34s} {value:.2f}" if isinstance(value, float) else f"{key:34s} {value}")
    bound = "input" if results["input_vs_step_rate"] < 1.5 else "compute"
    print(f"=> training here is {bound}-bound")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
