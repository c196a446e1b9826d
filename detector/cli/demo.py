"""`detector demo` / `make demo`: the whole product end to end on sample data, locally.

sample bucket -> prepare (Ray Data) -> train two small models (Ray Train, 2 workers) ->
evaluate -> predict -> Serve endpoint with real HTTP calls -> a bucket scan started over
HTTP into a Parquet report. Small models at 64 px keep it to minutes on 2 cores.
"""

from __future__ import annotations

import os
import time

from detector.io import storage

DEMO_MODELS = ("resnet50v2_tiny", "vit_tiny")
IMAGE_SIZE = 64


def run(workdir: str) -> int:
    from detector.cli import common
    from detector.config import PrepareConfig, TrainConfig
    from detector.data import prepare
    from detector.data.sample import SampleSpec, write_sample
    from detector.training import ensemble
    from detector.training.train import train_models

    workdir = os.path.abspath(workdir)
    bucket, shards, models = (os.path.join(workdir, d) for d in ("bucket", "shards", "models"))
    started = time.perf_counter()

    _step("1/6 sample: synthetic real/fake images (same formats and sizes in both classes)")
    summary = write_sample(bucket, SampleSpec(per_class=300, size=IMAGE_SIZE, seed=7, corrupt=3))
    print(f"    wrote {summary['real']} real + {summary['fake']} fake "
          f"(+{summary['corrupt']} corrupt) under {bucket}")

    _step("2/6 prepare: Ray Data streams the bucket into Parquet shards")
    common.init_ray()
    manifest = prepare.run(PrepareConfig(
        real=(storage.join(bucket, "real"),), fake=(storage.join(bucket, "fake"),),
        out=shards, image_size=IMAGE_SIZE,
    ), progress=False)
    common.print_prepare_summary(manifest, shards)

    _step("3/6 train: both architectures, data-parallel on 2 Ray Train workers, with "
          "--augment robust (random JPEG, blur, rescale, mirror on both classes)")
    result = train_models(TrainConfig(
        data=shards, model=DEMO_MODELS, out=models, workers=2, epochs=25, batch_size=32,
        lr=1e-3, weights="none", patience=8, int8=True, augment="robust",
    ))
    print(result["comparison"])
    common.print_exports(result["models"])
    row = ensemble.build([storage.join(models, name) for name in DEMO_MODELS], shards, models,
                         backend="keras")
    print(f"ensemble of both ({row['model']}@{row['id']}, added to comparison.md): test ROC "
          f"AUC {row['roc_auc']:.4f}, accuracy {row['accuracy']:.4f}")
    first = result["models"][0]
    print(f"\n    robustness of {first['model']} on re-saved and resized test images "
          "(robustness.md):")
    table = storage.read_bytes(storage.join(first["artifact"], "robustness.md")).decode()
    print("".join(f"    {line}\n" for line in table.splitlines()), end="")

    runtime = _fast_runtime(result["models"][0])
    _step(f"4/6 predict {' '.join(runtime)}: score a few files with the trained artifact "
          "(no cluster needed)")
    model_uri = storage.join(models, DEMO_MODELS[0])
    images = [o.uri for o in storage.list_objects(bucket)][::97][:6]
    common.predict_files(model_uri, images, backend=runtime[1], precision=runtime[3])

    _step("5/6 serve: the HTTP endpoint on Ray Serve, a few real requests")
    url = _serve(model_uri, bucket, workdir, runtime)
    for path in images[:4]:
        print(f"    POST /v1/detect {os.path.basename(path)} -> {_post(url, path)}")

    _step("6/6 scan: the whole bucket into a Parquet report, through the Serve replicas")
    report = os.path.join(workdir, "report")
    common.print_scan_summary(_scan_over_http(url, bucket, report))
    print(f"    report: {report} (a Parquet dataset, one row per object: pandas.read_parquet(it))")

    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s. Artifacts: "
          f"{models}/<model>/<id>/ (model.keras, detector.json, metrics, plots; "
          f"`detector models list {models}`); comparison: {models}/comparison.md")
    return 0


def _fast_runtime(trained: dict) -> list[str]:
    """The runtime flags predict, serve and the scan use: OpenVINO int8 when training
    published it (an int8 model that lost accuracy is refused), else OpenVINO float32."""
    precision = "int8" if "int8" in trained["exports"] else "float32"
    return ["--backend", "openvino", "--precision", precision]


def _serve(model_uri: str, bucket: str, workdir: str, runtime: list[str]) -> str:
    from detector.serving.app import ServeConfig, run

    port = _free_port()
    backend, precision = runtime[1], runtime[3]
    print(f"    Model replicas run {backend}/{precision}; the scan below scores through them")
    run(ServeConfig(model_uri=model_uri, max_replicas=1, scan_allow=(bucket, workdir),
                    backend=backend, precision=precision), port=port, blocking=False)
    return f"http://127.0.0.1:{port}"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, path: str) -> str:
    import requests

    with open(path, "rb") as handle:
        answer = requests.post(f"{url}/v1/detect", data=handle.read(), timeout=60,
                               headers={"Content-Type": "application/octet-stream"})
    body = answer.json()
    if answer.status_code != 200:
        return f"{answer.status_code} {body['error']}: {body['detail']}"
    return f"200 score_ai={body['score_ai']:.4f} verdict={body['verdict']} " \
           f"decided_by={body['decided_by']}"


def _scan_over_http(url: str, bucket: str, report: str) -> dict:
    import requests

    started = requests.post(f"{url}/v1/scans", json={"source": bucket, "output": report},
                            timeout=60).json()
    print(f"    POST /v1/scans -> {started['id']}; polling {started['status_url']}")
    while True:
        state = requests.get(f"{url}{started['status_url']}", timeout=60).json()
        if state["status"] != "running":
            break
        if progress := state["progress"]:  # the total grows until the listing is done
            listing = " (listing still running)" if progress["listing"] == "running" else ""
            print(f"    {progress['done']}/{progress['total']} objects{listing}")
        time.sleep(2)
    if state["status"] != "succeeded":
        raise RuntimeError(f"scan failed: {state['error']}")
    return state["summary"]


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)
