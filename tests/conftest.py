"""Shared fixtures: sample images made by the project itself, tiny trained models."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every Ray a test starts (ray.init, `ray start`, AutoscalingCluster) inherits this. A
# Python worker costs 2-3 CPU seconds to start on a loaded 2-core machine, and the suite
# started about 450 of them; a raylet prestarts one per CPU when its first driver connects
# (useless to `ray job submit` jobs, whose working_dir needs workers of their own). It
# changes which process runs a task, never what runs.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

import numpy as np
import pytest
from ray_cluster import free_port

TINY_SIZE = 48


# Under pytest-xdist (`make test`: --dist loadfile --no-loadscope-reorder) modules are
# handed out in collection order, so the longest start first and the short ones fill in
# around them, instead of one long module starting last and running alone. Seconds per
# module measured with --durations on 2 cores of the AVX2-only EPYC (only the order
# matters; unlisted modules take under a minute there).
MODULE_SECONDS = {
    "training/test_train_job.py": 2100, "scanning/test_scan_s3.py": 1900,
    "serving/test_serve.py": 760, "training/test_retrain.py": 435,
    "cluster/test_cluster.py": 340, "training/test_feature_cache.py": 200,
    "data/test_prepare_s3.py": 180, "model/test_explain.py": 160, "io/test_console.py": 115,
    "training/test_attribution.py": 110, "data/test_labels.py": 90,
    "model/test_artifact_predictor.py": 80, "cluster/test_autoscaling.py": 65,
    "verdicts/test_provenance.py": 55, "model/test_runtimes.py": 50,
}


def pytest_collection_modifyitems(config, items):
    def seconds(item) -> int:
        return MODULE_SECONDS.get(item.nodeid.split("::")[0].removeprefix("tests/"), 0)

    items.sort(key=seconds, reverse=True)  # stable: a module's tests stay in their order


def pytest_runtest_setup(item):
    """`@pytest.mark.requires_bf16`: skipped, naming what is missing, on a CPU without
    native bfloat16 (AMX or AVX512-BF16), where the product refuses bfloat16. Simulate
    such a CPU anywhere with ONEDNN_MAX_CPU_ISA=AVX2."""
    if item.get_closest_marker("requires_bf16"):
        from detector.model.runtimes import bf16_hardware, cpu_features

        if not bf16_hardware(gpu_ok=False):
            has = ", ".join(k for k, v in cpu_features().items() if v) or "none of them"
            pytest.skip(f"needs a CPU with AMX or AVX512-BF16 (this one has: {has})")


@pytest.fixture(scope="session")
def sample_arrays():
    """(train_x, train_y, test_x, test_y): `detector sample` images decoded through the one
    preprocessing path at their native size (cropping, never shrinking, keeps traces)."""
    from detector.data.sample import encode, make_image
    from detector.io.preprocess import load_image

    def make(seed: int, per_class: int):
        xs, ys = [], []
        for label in (0, 1):
            for i in range(per_class):
                rng = np.random.default_rng([seed, label, i])
                pixels = make_image(label, rng, (TINY_SIZE, TINY_SIZE))
                blob = encode(pixels, ("JPEG", "PNG", "WEBP")[i % 3], rng)
                xs.append(load_image(blob, TINY_SIZE)[0])
                ys.append(label)
        return np.stack(xs), np.array(ys, dtype=np.float32)

    return (*make(100, 160), *make(200, 60))


@pytest.fixture(scope="session")
def trained_tiny(sample_arrays, tmp_path_factory):
    """A resnet50v2_tiny trained briefly on sample data, saved as an artifact: (uri, state)."""
    import keras

    from detector.io.preprocess import PREPROCESS_VERSION
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, save_artifact
    from detector.training.fit import FitSettings, fit

    train_x, train_y, test_x, test_y = sample_arrays
    keras.utils.set_random_seed(int(os.environ.get("DETECTOR_TEST_SEED", "0")))
    model = build_model("resnet50v2_tiny", image_size=TINY_SIZE)
    state = fit(model, batches(train_x, train_y, 16, seed=1), batches(test_x, test_y, 64),
                FitSettings(epochs=12, lr=1e-3, patience=12, lr_patience=4))
    card = ModelCard(name="resnet50v2_tiny", architecture="resnet50v2", image_size=TINY_SIZE,
                     preprocess_version=PREPROCESS_VERSION)
    uri = str(tmp_path_factory.mktemp("artifact") / "model")
    save_artifact(model, card, uri)
    return uri, state


def batches(x, y, size, seed=None):
    def generate():
        order = np.random.default_rng(seed).permutation(len(x)) if seed is not None else \
            np.arange(len(x))
        for i in range(0, len(x), size):
            idx = order[i : i + size]
            yield x[idx], y[idx]

    return generate


def serve_s3(port: int):
    """moto's S3 app served by threads on 127.0.0.1:`port`; `.shutdown()` stops it.

    moto's own ThreadedMotoServer answers every AWS service, and finds the one a request
    is for under a lock, listing moto's package directory each time: every S3 request of
    a scan's workers waited in line for that. Only S3 is ever asked for here. Its log line
    per request is off too (a test that counts requests turns the "werkzeug" logger on)."""
    import logging
    import threading

    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", port, create_backend_app("s3"), threaded=True,
                         request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="s3-server").start()
    return server


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1; AWS_* variables point at it, so
    boto3, pyarrow (through detector.io.storage) and Ray workers started afterwards use it."""
    port = free_port()
    server = serve_s3(port)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test, named after it."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """An in-process local Ray per test module (after the S3 server, so its workers
    inherit the endpoint). address="local" never joins a cluster someone else started.
    Logical CPUs exceed the 2 cores on purpose: Train workers and Ray Data tasks must be
    schedulable side by side."""
    import ray

    # A raylet keeps one idle task worker per CPU and ends the rest: each scan of a module
    # then started its listing and decoding workers anew (2-3 CPU s each). One driver runs
    # a module's scans here, so kept workers serve the next scan; in a `ray start` cluster
    # a job's workers end with it, and kept ones would only idle (~1.3% of a core each).
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, _system_config={"num_workers_soft_limit": 12})
    yield ray
    ray.shutdown()
