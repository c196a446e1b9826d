"""`detector demo` / `make demo`: the whole product end to end on sample data, locally.

sample bucket -> prepare (Ray Data) -> train two small models (Ray Train, 2 workers) ->
evaluate -> predict. Small models at 64 px keep it to a few minutes on 2 cores.
"""

from __future__ import annotations

import os
import time

from detector import storage

DEMO_MODELS = ("resnet50v2_tiny", "vit_tiny")
IMAGE_SIZE = 64


def run(workdir: str) -> int:
    from detector import cli, data
    from detector.config import PrepareConfig, TrainConfig
    from detector.sample import SampleSpec, write_sample
    from detector.train import train_models

    workdir = os.path.abspath(workdir)
    bucket, shards, models = (os.path.join(workdir, d) for d in ("bucket", "shards", "models"))
    started = time.perf_counter()

    _step("1/4 sample: synthetic real/fake images (same formats and sizes in both classes)")
    summary = write_sample(bucket, SampleSpec(per_class=300, size=IMAGE_SIZE, seed=7, corrupt=3))
    print(f"    wrote {summary['real']} real + {summary['fake']} fake "
          f"(+{summary['corrupt']} corrupt) under {bucket}")

    _step("2/4 prepare: Ray Data streams the bucket into Parquet shards")
    cli.init_ray()
    manifest = data.prepare(PrepareConfig(
        real=(storage.join(bucket, "real"),), fake=(storage.join(bucket, "fake"),),
        out=shards, image_size=IMAGE_SIZE,
    ), progress=False)
    cli.print_prepare_summary(manifest, shards)

    _step("3/4 train: both architectures, data-parallel on 2 Ray Train workers")
    result = train_models(TrainConfig(
        data=shards, model=DEMO_MODELS, out=models, workers=2, epochs=25, batch_size=16,
        lr=1e-3, weights="none", patience=8,
    ))
    print(result["comparison"])

    _step("4/4 predict: score a few files with the trained artifact (no cluster needed)")
    images = [o.uri for o in storage.list_objects(bucket)][::97][:6]
    cli.main(["predict", "--model", storage.join(models, DEMO_MODELS[0]), *images])

    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s. Artifacts: {models}/<model>/"
          " (model.keras, detector.json, metrics, plots); comparison: "
          f"{models}/comparison.md")
    return 0


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)
