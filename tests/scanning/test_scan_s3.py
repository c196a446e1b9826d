"""Bucket scans against a real S3 endpoint (moto's server on 127.0.0.1) on a real local Ray:
exactly one row per object through every failure we can cause here."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.dataset as pads
import pytest
from artifacts import save_exported
from PIL import Image
from ray_cluster import free_port, processes

from detector.config import ScanConfig
from detector.data.sample import SampleSpec, write_sample
from detector.io import storage
from detector.scanning import report
from detector.scanning.scan import scan

pytestmark = pytest.mark.e2e

SIZE = 32
MAX_BYTES = 200_000
PART = 150  # objects per partition: several parts per listing range


def make_model(path: str, seed: int) -> str:
    """An untrained vit_tiny with its ONNX export, as training publishes one: scans load it
    on OpenVINO, as they load a trained model."""
    import keras

    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard

    keras.utils.set_random_seed(seed)
    return save_exported(build_model("vit_tiny", image_size=SIZE),
                         ModelCard(name="vit_tiny", architecture="vit", image_size=SIZE,
                                   preprocess_version=1, threshold=0.5, uncertain_margin=0.0),
                         path)


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("scan-model") / "vit_tiny"), seed=1)


@pytest.fixture(scope="module")
def seen_model_uri(model_uri, tmp_path_factory):
    """model_uri's weights, with a card recording what training saw: JPEG and PNG with
    longer sides of 32 to 64 px (see detector.verdicts.familiarity)."""
    copy = tmp_path_factory.mktemp("seen-model") / "vit_tiny"
    shutil.copytree(model_uri, copy)
    card = json.loads((copy / "detector.json").read_text())
    card["domain"] = {"formats": ["JPEG", "PNG"], "long_side": [32, 64]}
    (copy / "detector.json").write_text(json.dumps(card))
    return str(copy)


@pytest.fixture(scope="module")
def other_model_uri(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("scan-model-b") / "vit_tiny"), seed=2)


@pytest.fixture(scope="module")
def scan_bucket(s3_server, local_ray):
    """> 1,000 objects (S3 lists 1,000 per page) in nested prefixes with odd keys, plus
    corrupt, empty, non-image, oversized and excluded files, and files with provenance."""
    import boto3
    import provenance_fixtures as fx

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="scan")
    write_sample("s3://scan/photos", SampleSpec(per_class=520, size=SIZE, seed=9, corrupt=2))
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="PNG")
    assert len(big.getvalue()) > MAX_BYTES
    s3.put_object(Bucket="scan", Key="photos/odd/huge scan ß.png", Body=big.getvalue())
    s3.put_object(Bucket="scan", Key="photos/odd/readme.txt", Body=b"not selected")
    s3.put_object(Bucket="scan", Key="photos/odd/empty.JPG", Body=b"")
    s3.put_object(Bucket="scan", Key="photos/odd/signed ai.jpg", Body=fx.c2pa_signed(
        fx.photo(), "image/jpeg", fx.AI, fx.test_chain()))
    s3.put_object(Bucket="scan", Key="photos/odd/camera.jpg", Body=fx.camera_jpeg())
    s3.put_object(Bucket="scan", Key="photos/odd/comfy.webp", Body=fx.comfyui_webp())
    s3.put_object(Bucket="scan", Key="photos/odd/stealth.png", Body=fx.stealth_png())
    s3.put_object(Bucket="scan", Key="photos/top level.png",
                  Body=storage.read_bytes(selected("s3://scan/photos/real")[0]))
    return "s3://scan/photos"


def selected(prefix: str) -> list[str]:
    """What a scan with the default rules reads: every object but known non-image and
    video extensions (the rules' own tests check them against explicit lists)."""
    from detector.io.selection import Selection

    return [o.uri for o in storage.list_objects(prefix) if Selection().reason(o.uri) is None]


def config(source: str, model: str, out: str, **overrides) -> ScanConfig:
    settings = {"via": "data", "max_bytes": MAX_BYTES, "partition_size": PART, **overrides}
    return ScanConfig(source=source, model=model, out=out, **settings)


def dataset(out: str) -> pads.Dataset:
    fs, path = storage.resolve(out)
    return pads.dataset(path, filesystem=fs, format="parquet")


FULL = "s3://scan/reports/full"


@pytest.fixture(scope="module")
def full_scan(scan_bucket, model_uri) -> dict:
    """One scan of the whole bucket as it was made, with the default settings: its report
    at FULL is read, and copied as the first scan of a resumed one (tests that change the
    bucket run after this)."""
    return scan(config(scan_bucket, model_uri, FULL), progress=False)


def copy_report(source: str, target: str) -> None:
    """A committed report copied object by object, as a user would move one."""
    import boto3

    s3 = boto3.client("s3")
    bucket, prefix = source.removeprefix("s3://").split("/", 1)
    target_prefix = target.removeprefix(f"s3://{bucket}/")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            s3.copy_object(Bucket=bucket, CopySource={"Bucket": bucket, "Key": item["Key"]},
                           Key=target_prefix + item["Key"][len(prefix):])


def test_report_is_a_committed_dataset_with_one_row_per_selected_object(scan_bucket,
                                                                        model_uri, full_scan):
    from detector.model.predictor import Predictor

    out, summary = FULL, full_scan
    expected = selected(scan_bucket)
    assert len(expected) > 1000
    table = dataset(out).to_table()  # what pyarrow.dataset / pandas readers see
    assert table.schema.equals(report.REPORT_SCHEMA, check_metadata=False)
    uris = table.column("uri").to_pylist()
    assert sorted(uris) == sorted(expected) and len(set(uris)) == len(uris)
    assert not any(u.endswith("readme.txt") for u in uris)

    manifest = report.read_manifest(out)
    assert summary["objects"] == manifest["objects"] == len(expected)
    assert manifest["scanned"] == len(expected) and manifest["reused"] == 0
    assert manifest["model"].startswith("vit_tiny@") and manifest["threshold"] == 0.5
    assert sum(p["rows"] for p in manifest["parts"]) == len(expected)
    assert len(manifest["parts"]) >= len(expected) // PART
    assert sum(manifest["by_verdict"].values()) + sum(manifest["by_error"].values()) \
        == len(expected)
    fs, path = storage.resolve(out)
    import pyarrow.parquet as pq
    for part in manifest["parts"]:
        meta = pq.ParquetFile(f"{path}/{part['file']}", filesystem=fs).metadata
        assert meta.num_row_groups == 1 and meta.num_rows == part["rows"] <= PART

    rows = {r["uri"]: r for r in table.to_pylist()}
    assert rows["s3://scan/photos/odd/huge scan ß.png"]["error"] == "too-large"
    assert rows["s3://scan/photos/odd/empty.JPG"]["error"] == "empty"
    errors = {r["error"] for r in rows.values() if r["error"]}
    assert errors <= {"too-large", "empty", "truncated", "not-an-image", "corrupt"}
    for row in rows.values():
        assert (row["score_ai"] is None) == (row["error"] is not None) == \
            (row["verdict"] is None) == (row["decided_by"] is None)
        assert row["model"] == manifest["model"] and row["scanned_at"] is not None
    signed, camera = rows["s3://scan/photos/odd/signed ai.jpg"], rows["s3://scan/photos/odd/camera.jpg"]
    assert (signed["verdict"], signed["decided_by"]) == ("ai-generated", "provenance")
    assert [(e["source"], e["kind"], e["strength"]) for e in signed["evidence"]] == \
        [("c2pa", "ai-source-type", "strong")]
    assert camera["decided_by"] == "classifier"
    assert [e["strength"] for e in camera["evidence"]] == ["weak"]
    for key, source in (("comfy.webp", "exif"), ("stealth.png", "stealth")):
        row = rows[f"s3://scan/photos/odd/{key}"]
        assert (row["verdict"], row["decided_by"]) == ("ai-generated", "provenance")
        assert [(e["source"], e["strength"]) for e in row["evidence"]] == [(source, "strong")]
    assert sum(1 for r in rows.values() if r["evidence"]) == 4
    # A binary model names no generator (null columns); only a file's own metadata does.
    assert {u.rsplit("/", 1)[-1]: (r["generator"], r["generator_decided_by"])
            for u, r in rows.items() if r["generator"] or r["generator_scores"]} == \
        {"comfy.webp": ("ComfyUI", "provenance")}
    assert manifest["by_generator"] == {"ComfyUI": 1}
    assert any("ü" in u for u in uris)

    sample_uris = [u for u in uris if rows[u]["error"] is None][:25]
    predicted = Predictor.from_uri(model_uri).predict_bytes(
        [storage.read_bytes(u) for u in sample_uris])
    np.testing.assert_allclose([rows[u]["score_ai"] for u in sample_uris],
                               [p.score_ai for p in predicted], atol=1e-6)

    frame = table.to_pandas()
    assert str(frame["scanned_at"].dtype) == "datetime64[us, UTC]"
    assert frame["score_ai"].dtype == np.float64 and frame["size_bytes"].dtype == np.int64


def test_resume_rescans_new_and_changed_objects_and_everything_for_another_model(
        scan_bucket, model_uri, other_model_uri, full_scan):
    import boto3

    out = "s3://scan/reports/resume"
    copy_report(FULL, out)  # the first scan: the full one, made with the same settings
    first = full_scan
    s3 = boto3.client("s3")
    good = next(r["uri"] for r in dataset(out).to_table().to_pylist() if r["error"] is None)
    blob = storage.read_bytes(good)
    added = 7
    for i in range(added):
        s3.put_object(Bucket="scan", Key=f"photos/real/batch-03/added-{i:04d}.jpg", Body=blob)
    changed = selected(f"{scan_bucket}/fake")[5]
    old_etag = next(r["etag"] for r in dataset(out).to_table().to_pylist() if r["uri"] == changed)
    s3.put_object(Bucket="scan", Key=changed[len("s3://scan/"):], Body=blob)

    second = scan(config(scan_bucket, model_uri, out, resume=True), progress=False)
    assert second["scanned"] == added + 1  # only new and overwritten objects hit the model
    assert second["objects"] == first["objects"] + added == second["scanned"] + second["reused"]
    table = dataset(out).to_table()
    assert table.num_rows == second["objects"] == len(set(table.column("uri").to_pylist()))
    row = next(r for r in table.to_pylist() if r["uri"] == changed)
    assert row["etag"] != old_etag and row["error"] is None

    third = scan(config(scan_bucket, other_model_uri, out, resume=True), progress=False)
    assert third["scanned"] == third["objects"] == second["objects"] and third["reused"] == 0
    models = set(dataset(out).to_table().column("model").to_pylist())
    assert models == {third["model"]} != {second["model"]}
    assert dataset(out).count_rows() == third["objects"]  # stale parts are gone


def scan_in_thread(cfg: ScanConfig) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = scan(cfg, progress=False)
        except Exception as exc:
            result["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    return worker, result


def wait_for(check, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.parametrize("stage", ["ScoreWithPredictor", "PartWriter", "ListingGate"])
def test_a_killed_actor_of_the_scan_loses_no_rows(scan_bucket, model_uri, stage):
    """Ray Data replaces a lost stage actor and retries its work; the listing gate comes
    back by itself (with empty books, which can only admit more)."""
    out = f"s3://scan/reports/killed-{stage.lower()}"
    earlier = set(processes(stage))  # an earlier scan's actors may still be shutting down
    worker, result = scan_in_thread(config(scan_bucket, model_uri, out, batch_size=8,
                                           actors=2, cpus_per_actor=1))
    wait_for(lambda: set(processes(stage)) - earlier, what=f"a {stage} actor of this scan")
    time.sleep(4)  # let it work a while first
    actors = {pid: line for pid, line in processes(stage).items() if pid not in earlier}
    assert actors, f"this scan's {stage} actor is gone before it could be killed"
    if stage == "ScoreWithPredictor":
        # Decoding runs in its own tasks, not fused into the (possibly GPU) scoring actors.
        assert not any("decode_objects" in line for line in actors.values()), actors
    os.kill(next(iter(actors)), signal.SIGKILL)
    worker.join(timeout=600)
    assert "summary" in result, result
    uris = dataset(out).to_table().column("uri").to_pylist()
    assert sorted(uris) == sorted(selected(scan_bucket))
    assert result["summary"]["objects"] == len(uris)


def committed_rows(out: str) -> tuple[int, int]:
    names = report.part_files(out)
    return len(names), sum(m["rows"] for m in report.part_metadata(out, names).values())


def test_a_killed_driver_resumes_without_scoring_committed_partitions_again(
        scan_bucket, model_uri, s3_server, tmp_path):
    out = "s3://scan/reports/driver-killed"
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen(
            [sys.executable, "-m", "detector", "scan", scan_bucket, "--model", model_uri,
             "--out", out, "--via", "data", "--max-bytes", str(MAX_BYTES),
             "--partition-size", "100", "--batch-size", "8"],
            stdout=sink, stderr=subprocess.STDOUT, env=os.environ | {"RAY_ADDRESS": ""})
    try:
        wait_for(lambda: committed_rows(out)[0] >= 2 or driver.poll() is not None,
                 timeout=300, what="two committed parts")
        assert driver.poll() is None, log.read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    # Its private Ray dies with it; wait until no part appears any more, then count.
    before = (-1, -1)
    while (now := committed_rows(out)) != before:
        before = now
        time.sleep(5)
    _, rows = now
    total = len(selected(scan_bucket))
    assert 0 < rows < total
    assert not storage.exists(f"{out}/_manifest.json")  # never committed: not a report

    summary = scan(config(scan_bucket, model_uri, out, resume=True, partition_size=100),
                   progress=False)
    assert summary["reused"] == rows and summary["scanned"] == total - rows
    uris = dataset(out).to_table().column("uri").to_pylist()
    assert sorted(uris) == sorted(selected(scan_bucket))


@pytest.fixture(scope="module")
def serve_app(local_ray, model_uri):
    """The detector Serve app on 127.0.0.1, serving `model_uri`, allowed to scan the test
    bucket."""
    import requests
    from ray import serve

    from detector.serving.app import APP_NAME, ServeConfig, build_app_from_config

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(model_uri=model_uri, min_replicas=1, max_replicas=1, num_cpus=1,
                      scan_allow=("s3://scan/photos", "s3://scan/reports"),
                      max_running_scans=1, keep_finished_scans_s=3)
    serve.run(build_app_from_config(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(1)
    yield url
    serve.shutdown()


def test_scan_via_serve_matches_data_and_the_http_endpoint(scan_bucket, model_uri, serve_app):
    import requests

    out = "s3://scan/reports/via-serve"
    summary = scan(dataclasses.replace(config(scan_bucket, model_uri, out), via="auto"),
                   progress=False)
    assert summary["via"] == "serve"  # auto: the app serves this very model
    rows = {r["uri"]: r for r in dataset(out).to_table().to_pylist()}
    assert sorted(rows) == sorted(selected(scan_bucket))
    scored = [u for u, r in rows.items() if r["error"] is None][:10]
    for uri in scored:
        answer = requests.post(f"{serve_app}/v1/detect", data=storage.read_bytes(uri),
                               headers={"Content-Type": "application/octet-stream"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["score_ai"] == pytest.approx(rows[uri]["score_ai"], abs=1e-5)
    signed = rows["s3://scan/photos/odd/signed ai.jpg"]
    answer = requests.post(f"{serve_app}/v1/detect", data=storage.read_bytes(signed["uri"]),
                           headers={"Content-Type": "image/jpeg"}, timeout=30).json()
    assert (answer["verdict"], answer["decided_by"], answer["evidence"]) == \
        (signed["verdict"], signed["decided_by"], signed["evidence"])


def test_an_ensemble_scans_and_serves_as_predict_scores_it(scan_bucket, model_uri,
                                                           other_model_uri, serve_app,
                                                           tmp_path):
    """An ensemble URI goes where a model URI goes: a scan's rows and an app's answers
    equal `Predictor.predict_bytes` on it, and both name the ensemble's version."""
    import requests
    from ray import serve

    from detector.model.ensemble import publish
    from detector.model.predictor import Predictor
    from detector.serving.app import ServeConfig, build_app_from_config

    name = str(tmp_path / "models" / "ensemble")
    publish([model_uri, other_model_uri], str(tmp_path / "models"), weights=[2, 1])
    predictor = Predictor.from_uri(name)
    label = f"ensemble@{predictor.card.id}"
    out = "s3://scan/reports/ensemble"
    prefix = f"{scan_bucket}/real/batch-01"
    summary = scan(config(prefix, name, out), progress=False)
    assert summary["model"] == label
    rows = [r for r in dataset(out).to_table().to_pylist() if r["error"] is None][:8]
    blobs = [storage.read_bytes(r["uri"]) for r in rows]
    expected = [p.score_ai for p in predictor.predict_bytes(blobs)]
    assert [r["score_ai"] for r in rows] == pytest.approx(expected, abs=1e-5)
    assert {r["model"] for r in dataset(out).to_table().to_pylist()} == {label}

    serve.run(build_app_from_config(ServeConfig(
        model_uri=name, max_replicas=1, num_cpus=0.5, ingress_num_cpus=0.25)),
        name="ensemble", route_prefix="/ensemble")
    try:
        for blob, score in zip(blobs[:4], expected, strict=False):
            answer = requests.post(f"{serve_app}/ensemble/v1/detect", data=blob, timeout=60,
                                   headers={"Content-Type": "application/octet-stream"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["score_ai"] == pytest.approx(score, abs=1e-5)
            assert answer.json()["model"] == label
    finally:
        serve.delete("ensemble")


ATTRIBUTION = "s3://scan/attribution"
FAMILIES = ("upsampler", "decoder-grid", "lowpass-tint")


@pytest.fixture(scope="module")
def attribution_bucket(scan_bucket) -> str:
    """Sample images of three families and real ones, and files whose metadata names the
    tool that made them (ChatGPT's C2PA claim, A1111 parameters, a ComfyUI graph)."""
    import boto3
    import provenance_fixtures as fx

    write_sample(ATTRIBUTION, SampleSpec(per_class=12, size=SIZE, seed=21, generators=3))
    s3 = boto3.client("s3")
    for key, blob in (("chatgpt.png", fx.chatgpt_image(fx.test_chain())),
                      ("a1111.png", fx.a1111_png()),
                      ("comfy.webp", fx.comfyui_webp())):
        s3.put_object(Bucket="scan", Key=f"attribution/named/{key}", Body=blob)
    return ATTRIBUTION


@pytest.fixture(scope="module")
def head_model(attribution_bucket, tmp_path_factory) -> str:
    """A vit_tiny with an attribution head over three sample families, exported to OpenVINO
    int8 too. Untrained: its threshold and open-set rule sit midway between the middle two
    of its outputs on the bucket's images, so its answers mix `real`, named generators and
    `unknown`, which is what the paths must agree on. Its card holds the residual model of
    real images (verdicts/residual.py) fitted on the scan bucket's, as training fits one,
    so the paths must agree on which images it keeps from a `real` verdict too."""
    import keras

    from detector.io.preprocess import ImageError, load_image
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard
    from detector.model.predictor import Predictor
    from detector.verdicts import residual

    def middle(values: np.ndarray) -> float:
        low, high = np.sort(values)[len(values) // 2 - 1 : len(values) // 2 + 1]
        return float((low + high) / 2)

    keras.utils.set_random_seed(3)
    model = build_model("vit_tiny", image_size=SIZE, generators=len(FAMILIES))
    pixels = np.stack([load_image(storage.read_bytes(o.uri), SIZE)[0]
                       for o in storage.list_objects(attribution_bucket)])
    decoded = []
    for uri in selected("s3://scan/photos/real"):
        with contextlib.suppress(ImageError):  # the bucket's corrupt and empty files
            decoded.append(load_image(storage.read_bytes(uri), SIZE)[0])
        if len(decoded) == 200:
            break
    reals = residual.features(np.stack(decoded))
    card = ModelCard(name="vit_tiny_heads", architecture="vit", image_size=SIZE,
                     preprocess_version=1, uncertain_margin=0.0, generators=list(FAMILIES),
                     domain={"residual": residual.fit(reals[:150], reals[150:])})
    scores, heads = Predictor.from_model(model, card).score_and_attribute(pixels)
    card.threshold = middle(scores)
    card.attribution = {"threshold": middle(heads.max(axis=1))}
    path = str(tmp_path_factory.mktemp("head-model") / "vit_tiny_heads")
    save_exported(model, card, path, int8=True, pixels=pixels)
    assert card.exports["int8"]["attribution"]["max_abs_diff"] < 0.2, card.exports
    return path


@pytest.mark.parametrize("backend, precision, via", [("keras", "float32", "data"),
                                                     ("openvino", "int8", "serve")])
def test_the_same_image_gets_the_same_generator_in_predict_http_and_a_scan(
        attribution_bucket, head_model, serve_app, backend, precision, via):
    """On Keras and on OpenVINO int8, a scan's rows (scored by its own actors, or by the
    Serve replicas whose heads travel back with the scores), the HTTP answer and predict
    name the same generator with the same top scores; the file's own metadata names it
    first; the summary counts images by generator."""
    import requests
    from ray import serve

    from detector.model.predictor import Predictor
    from detector.serving.app import ServeConfig, build_app_from_config

    serve.run(build_app_from_config(ServeConfig(
        model_uri=head_model, backend=backend, precision=precision, max_replicas=1,
        num_cpus=0.5, ingress_num_cpus=0.25)), name="heads", route_prefix="/heads")
    try:
        out = f"s3://scan/reports/attribution-{precision}"
        summary = scan(config(attribution_bucket, head_model, out, via=via, serve_app="heads",
                              backend=backend, precision=precision), progress=False)
        assert summary["via"] == via
        rows = sorted(dataset(out).to_table().to_pylist(), key=lambda r: r["uri"])
        assert rows and all(r["error"] is None for r in rows)
        predictor = Predictor.from_uri(head_model, backend=backend, precision=precision)
        assert predictor.runtime == f"{backend}/{precision}"
        expected = predictor.predict_bytes([storage.read_bytes(r["uri"]) for r in rows])
        for row, want in zip(rows, expected, strict=True):
            answer = requests.post(f"{serve_app}/heads/v1/detect", timeout=60,
                                   data=storage.read_bytes(row["uri"]),
                                   headers={"Content-Type": "application/octet-stream"})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            for got in (row, body):
                assert (got["verdict"], got["generator"], got["generator_decided_by"]) == \
                    (want.verdict, want.generator, want.generator_decided_by), row["uri"]
                assert [(e["source"], e["kind"]) for e in got["evidence"]] == \
                    [(e["source"], e["kind"]) for e in want.evidence], row["uri"]
                assert [s["generator"] for s in got["generator_scores"] or []] == \
                    [s["generator"] for s in want.generator_scores or []]
                assert [s["score"] for s in got["generator_scores"] or []] == pytest.approx(
                    [s["score"] for s in want.generator_scores or []], abs=1e-5)
    finally:
        serve.delete("heads")
    named = {r["uri"].rsplit("/", 1)[-1]: r["generator"] for r in rows
             if r["generator_decided_by"] == "provenance"}
    assert named == {"chatgpt.png": "OpenAI", "a1111.png": "AUTOMATIC1111",
                     "comfy.webp": "ComfyUI"}
    by_head = [r["generator"] for r in rows if r["generator_decided_by"] == "classifier"]
    assert set(by_head) & set(FAMILIES) and "unknown" in by_head, by_head  # both answers
    assert all(r["generator"] is None for r in rows if r["verdict"] == "real")
    # The sample's fakes are unlike the reals: none of them is called real.
    unlike = [r for r in rows if any(e["kind"] == "unlike-real" for e in r["evidence"])]
    assert {r["uri"] for r in unlike} >= {r["uri"] for r in rows if "/fake/" in r["uri"]}
    assert all(r["verdict"] != "real" for r in unlike)
    counts = {g: by_head.count(g) for g in set(by_head)}
    assert summary["by_generator"] == dict(sorted(
        {**counts, **dict.fromkeys(named.values(), 1)}.items()))


def test_scan_never_labels_rows_with_a_model_it_did_not_use(scan_bucket, other_model_uri,
                                                            serve_app):
    """The app serves model A; a scan asked for model B scores with B or refuses."""
    from detector.model.artifact import load_card

    source = f"{scan_bucket}/real/batch-02"
    with pytest.raises(ValueError, match=r"serves model .* not "):
        scan(dataclasses.replace(config(source, other_model_uri, "s3://scan/reports/pin-x"),
                                 via="serve"), progress=False)
    out = "s3://scan/reports/pinned"
    summary = scan(dataclasses.replace(config(source, other_model_uri, out), via="auto"),
                   progress=False)
    card = load_card(other_model_uri)
    assert summary["via"] == "data" and summary["model"] == f"vit_tiny@{card.id}"
    assert set(dataset(out).to_table().column("model").to_pylist()) == {summary["model"]}


def serve_replicas() -> list[int]:
    return [pid for pid, line in processes("ServeReplica").items() if "Model" in line]


def test_scan_via_serve_survives_a_killed_model_replica(scan_bucket, model_uri, serve_app):
    out = "s3://scan/reports/replica-killed"
    progress: list[dict] = []
    cfg = dataclasses.replace(config(scan_bucket, model_uri, out), via="serve", batch_size=8)
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = scan(cfg, progress=False, on_progress=progress.append)
        except Exception as exc:
            result["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    wait_for(lambda: progress and progress[-1]["done"] >= 100, what="100 scored rows")
    replicas = serve_replicas()
    assert replicas
    os.kill(replicas[0], signal.SIGKILL)
    worker.join(timeout=600)
    assert "summary" in result, result
    uris = dataset(out).to_table().column("uri").to_pylist()
    assert sorted(uris) == sorted(selected(scan_bucket))
    assert result["summary"]["via"] == "serve"


def test_scan_reads_keys_from_a_manifest(scan_bucket, model_uri, s3_server):
    keys = selected(f"{scan_bucket}/fake/batch-01")[:40]
    missing = "s3://scan/photos/fake/batch-01/gone.png"
    csv = "uri,size,etag\n" + "".join(f'"{k}",,\n' for k in [*keys, missing])
    storage.write_bytes("s3://scan/inventory/keys.csv", csv.encode())
    out = "s3://scan/reports/from-manifest"
    summary = scan(config("", model_uri, out, manifest="s3://scan/inventory/keys.csv",
                          partition_size=16), progress=False)
    rows = {r["uri"]: r for r in dataset(out).to_table().to_pylist()}
    assert sorted(rows) == sorted([*keys, missing]) and summary["objects"] == len(keys) + 1
    assert rows[missing]["error"] == "vanished"
    assert all(rows[k]["size_bytes"] > 0 for k in keys)


def test_scans_start_over_http_within_the_allow_list(scan_bucket, serve_app):
    import requests

    refused = requests.post(f"{serve_app}/v1/scans", json={
        "source": "s3://other-bucket/private", "output": "s3://scan/reports/x"}, timeout=30)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    sneaky = requests.post(f"{serve_app}/v1/scans", json={
        "source": "s3://scan/photos/../../etc", "output": "s3://scan/reports/x"}, timeout=30)
    assert sneaky.status_code == 403
    assert requests.post(f"{serve_app}/v1/scans", json={"source": 1}, timeout=30).status_code \
        == 422
    assert requests.get(f"{serve_app}/v1/scans/nope", timeout=30).status_code == 404

    huge = requests.post(f"{serve_app}/v1/scans", data=b"{" + b" " * 100_000 + b"}",
                         timeout=30)
    assert huge.status_code == 413 and huge.json()["error"] == "too-large"

    request = {"source": f"{scan_bucket}/real/batch-01", "output": "s3://scan/reports/http"}
    started = requests.post(f"{serve_app}/v1/scans", json=request, timeout=30)
    assert started.status_code == 202, started.text
    # The app allows one running scan: a second is refused, not queued.
    busy = requests.post(f"{serve_app}/v1/scans", json=request, timeout=30)
    assert busy.status_code == 429 and busy.json()["error"] == "too-many-scans", busy.text
    status_url = f"{serve_app}{started.json()['status_url']}"
    state = wait_for_scan(status_url)
    assert state["status"] == "succeeded", state
    listed = requests.get(f"{serve_app}/v1/scans", timeout=30).json()["scans"]
    assert [s["id"] for s in listed] == [started.json()["id"]] and listed[0] == state
    assert state["summary"]["objects"] == len(selected(f"{scan_bucket}/real/batch-01")) > 0
    assert state["summary"]["by_verdict"] and state["summary"]["via"] == "serve"
    assert state["progress"]["done"] == state["progress"]["listed"] == state["summary"]["objects"]
    assert state["progress"]["partitions_committed"] == state["summary"]["parts"]
    assert dataset("s3://scan/reports/http").count_rows() == state["summary"]["objects"]
    assert json.loads(storage.read_bytes("s3://scan/reports/http/_manifest.json"))["via"] \
        == "serve"

    # Finished scans are kept 3 s here (an hour by default), then their actor is removed
    # when the next scan starts; the report stays.
    time.sleep(3.5)
    again = requests.post(f"{serve_app}/v1/scans", json={**request, "output":
                                                          "s3://scan/reports/http-2"}, timeout=30)
    assert again.status_code == 202, again.text
    assert requests.get(status_url, timeout=30).status_code == 404
    listed = requests.get(f"{serve_app}/v1/scans", timeout=30).json()["scans"]
    assert [s["id"] for s in listed] == [again.json()["id"]]  # the reaped one is gone
    assert wait_for_scan(f"{serve_app}{again.json()['status_url']}")["status"] == "succeeded"
    assert dataset("s3://scan/reports/http").count_rows() == state["summary"]["objects"]


def wait_for_scan(status_url: str, timeout: float = 180) -> dict:
    import requests

    deadline = time.monotonic() + timeout
    while (state := requests.get(status_url, timeout=30).json())["status"] == "running":
        assert time.monotonic() < deadline, state
        time.sleep(1)
    return state


def test_clear_errors_for_an_empty_prefix_and_a_missing_bucket(scan_bucket, model_uri):
    with pytest.raises(ValueError, match="no objects under s3://scan/nothing"):
        scan(config("s3://scan/nothing", model_uri, "s3://scan/reports/none"), progress=False)
    with pytest.raises(FileNotFoundError, match="no such bucket: no-such-bucket"):
        scan(config("s3://no-such-bucket/x", model_uri, "s3://scan/reports/none"),
             progress=False)
    with pytest.raises(ValueError, match="not-included"):
        scan(config(f"{scan_bucket}/odd", model_uri, "s3://scan/reports/none",
                    include=("*.tiff",)), progress=False)



def test_a_scan_that_cannot_be_scheduled_fails_with_the_missing_resources(scan_bucket,
                                                                          model_uri,
                                                                          local_ray):
    """A cluster without an autoscaler (the module's, joined as `detector scan` joins a
    running cluster through RAY_ADDRESS) cannot add nodes: an actor larger than any node
    ends the scan at once, naming what is free; work that waits for a resource no node
    has (a GPU) ends it after --stall-timeout, naming what waits. Neither hangs."""
    address = local_ray.get_runtime_context().gcs_address

    def scan(*flags: str) -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "detector", "scan", f"{scan_bucket}/real/batch-01",
             "--model", model_uri, "--out", "s3://scan/reports/stalled", "--via", "data",
             *flags], capture_output=True, text=True, timeout=300,
            env=os.environ | {"RAY_ADDRESS": address})
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
        return result, time.monotonic() - started

    too_big, seconds = scan("--cpus-per-actor", "64")
    assert "--cpus-per-actor 64 and a decode task (0.5 CPU) fit on no node" in too_big.stderr
    assert "cannot add nodes" in too_big.stderr and seconds < 60, seconds
    no_gpu, _ = scan("--gpus-per-actor", "1", "--stall-timeout", "5")
    assert "nothing could be scheduled" in no_gpu.stderr and "'GPU': 1.0" in no_gpu.stderr


def test_consistency_scan_makes_flipping_rows_uncertain_like_predict(scan_bucket, model_uri,
                                                                      tmp_path):
    """`--consistency`: a card whose threshold (no band) sits between an image's score and
    its re-encoded copy's makes that copy flip; flipping rows are uncertain with the
    copies' verdicts in `evidence`, as `Predictor.predict_bytes(consistency=True)` decides."""
    import dataclasses

    from detector.io.preprocess import ImageError, load_image
    from detector.model.artifact import load_artifact, save_artifact
    from detector.model.predictor import Predictor
    from detector.verdicts import consistency

    prefix = f"{scan_bucket}/real/batch-01"
    uris = selected(prefix)
    blobs = [storage.read_bytes(uri) for uri in uris]
    model, card = load_artifact(model_uri)
    predictor = Predictor.from_uri(model_uri, backend="keras")
    # The threshold goes between some image's score and its copy's, so that copy flips.
    moves = []
    for uri, blob in zip(uris, blobs, strict=True):
        try:
            pixels = load_image(blob, card.image_size)[0]
        except ImageError:
            continue
        scores = predictor.score(np.stack([pixels, *consistency.variants(pixels)]))
        moves.append((float(np.abs(scores[1:] - scores[0]).max()), uri, scores))
    _, flipping, scores = max(moves, key=lambda m: m[0])
    moved = scores[1:][np.argmax(np.abs(scores[1:] - scores[0]))]
    strict = save_artifact(model, dataclasses.replace(  # on Keras, as the scores above
        card, threshold=float(scores[0] + moved) / 2, uncertain_margin=0.0, exports={}),
        str(tmp_path / "strict"))
    out = "s3://scan/reports/consistency"
    summary = scan(config(prefix, strict, out, consistency=True), progress=False)
    rows = {r["uri"]: r for r in dataset(out).to_table().to_pylist()}
    assert len(rows) == len(uris) == summary["objects"]
    flagged = [r for r in rows.values()
               if any(e["source"] == "consistency" for e in r["evidence"])]
    assert flipping in {r["uri"] for r in flagged}, "the copy that flips was not caught"
    for row in flagged:
        assert (row["verdict"], row["decided_by"]) == ("uncertain", "classifier"), row
    expected = Predictor.from_uri(strict, backend="keras").predict_bytes(blobs,
                                                                        consistency=True)
    same = sum(rows[uri]["verdict"] == p.verdict for uri, p in zip(uris, expected, strict=True))
    assert same >= len(uris) - 2  # only scores within float noise of the threshold may differ
    report_plan = json.loads(storage.read_bytes(f"{out}/_manifest.json"))
    assert report_plan["consistency"] == ["jpeg75", "resize0.5"]


def test_group_duplicates_lists_near_copies_in_the_summary(scan_bucket, model_uri):
    """`--group-duplicates`: resized and re-encoded copies of one image are one group in
    the summary and in OUT/_near_duplicates.parquet; distinct images are in none."""
    from detector.data.sample import make_image
    from detector.scanning.scan import NEAR_DUPLICATES

    rng = np.random.default_rng(21)
    for k in range(6):
        image = Image.fromarray(make_image(k % 2, rng, (160, 120)))
        for j, (size, fmt) in enumerate([((160, 120), "PNG"), ((80, 60), "JPEG")][:1 + k % 2]):
            buffer = io.BytesIO()
            image.resize(size).save(buffer, fmt)
            storage.write_bytes(f"s3://scan/dups/img-{k}-{j}.{fmt.lower()}", buffer.getvalue())
    out = "s3://scan/reports/dups"
    summary = scan(config("s3://scan/dups", model_uri, out, group_duplicates=True),
                   progress=False)
    near = summary["near_duplicates"]
    assert (near["groups"], near["images"]) == (3, 6), near  # k = 1, 3, 5 have a copy
    import pyarrow.parquet as pq

    listing = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{NEAR_DUPLICATES}")))
    groups = {}
    for row in listing.to_pylist():
        groups.setdefault(row["group"], set()).add(row["uri"].rsplit("/", 1)[1].rsplit("-", 1)[0])
    assert sorted(groups.values(), key=sorted) == [{"img-1"}, {"img-3"}, {"img-5"}]
    rows = dataset(out).to_table()
    assert rows.num_rows == 9 and all(len(h) == 16 for h in rows.column("phash").to_pylist())
    assert "near_duplicates" not in scan(config("s3://scan/dups", model_uri, out),
                                         progress=False)
    assert not storage.exists(f"{out}/{NEAR_DUPLICATES}")  # a stale listing is removed


# ----------------------------------------------------------------- selection by content


def mixed_upload_bucket() -> tuple[dict[str, bytes], dict[str, str | None]]:
    """What an upload bucket holds: images under extension-less (UUID-like) keys and
    upper-case extensions, HEIC from phones, AVIF, MPO, APNG, a JSON sidecar beside every
    image, videos (MP4, MOV, a WebM under a bare key, one cut short, an audio-only MP4),
    and broken or non-image files. Returns (key -> bytes, key -> the error code its row
    must have: None for a scored image or video; keys without a row are left out)."""
    from video_fixtures import audio_only, make_video

    from detector.io.preprocess import register_formats

    register_formats()  # HEIC is written with pillow-heif, as the tests' fixtures are

    def encode(fmt: str, seed: int, **params) -> bytes:
        rng = np.random.default_rng(seed)
        frames = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
                  for _ in range(2)]
        buffer = io.BytesIO()
        if fmt in ("MPO", "APNG"):
            frames[0].save(buffer, "MPO" if fmt == "MPO" else "PNG", save_all=True,
                           append_images=frames[1:])
        else:
            frames[0].save(buffer, fmt, **params)
        return buffer.getvalue()

    images = {"3f2a9c1b": encode("JPEG", 1), "upload-77": encode("PNG", 2),
              "a1b2c3d4": encode("HEIF", 3), "IMG_0001.JPG": encode("JPEG", 4),
              "IMG_0002.HEIC": encode("HEIF", 5), "pic.avif": encode("AVIF", 6),
              "stereo.mpo": encode("MPO", 7), "anim.png": encode("APNG", 8)}
    objects = dict(images)
    for key in images:
        objects[f"{key}.json"] = json.dumps({"uploader": "u1", "key": key}).encode()
    videos = {"clip.mp4": make_video("mp4", (1,) * 12 + (0,) * 12),
              "CLIP2.MOV": make_video("mov", (0,) * 24), "5c0ffee1": make_video("webm")}
    objects |= videos
    objects["cut.mp4"] = videos["clip.mp4"][: len(videos["clip.mp4"]) * 2 // 3]
    objects["voice.mp4"] = audio_only()
    broken_jpeg, broken_png = images["IMG_0001.JPG"], images["upload-77"]
    objects["broken.jpg"] = broken_jpeg[: len(broken_jpeg) // 2]
    objects["9e8d7c6b"] = broken_png[: len(broken_png) // 2]
    objects["notes"] = b"not an image, and named like one of the uploads"
    expected = {key: None for key in [*images, *videos]}
    expected |= {"broken.jpg": "truncated", "9e8d7c6b": "truncated", "notes": "not-an-image",
                 "cut.mp4": "truncated", "voice.mp4": "not-a-video"}
    return objects, expected


@pytest.mark.parametrize("where", ["s3", "local"])
def test_every_object_in_an_upload_bucket_is_accounted_for(where, s3_server, local_ray,
                                                           seen_model_uri, tmp_path, capsys):
    """Each image and video is scored whatever its key, each broken or non-image file
    that was read gets its error code, and the sidecars not read are counted by reason.
    The formats the model never saw in training (HEIF, AVIF, MPO) are `uncertain`, saying
    why, as predict answers; each video is one row decided by its frames, as predict
    decides it."""
    import boto3
    import pandas as pd

    from detector.cli.common import print_scan_summary
    from detector.model.predictor import Predictor

    objects, expected = mixed_upload_bucket()
    if where == "s3":
        boto3.client("s3").create_bucket(Bucket="uploads")
        for key, body in objects.items():
            boto3.client("s3").put_object(Bucket="uploads", Key=f"in/{key}", Body=body)
        source, out = "s3://uploads/in", "s3://uploads/report"
    else:
        (tmp_path / "in").mkdir()
        for key, body in objects.items():
            (tmp_path / "in" / key).write_bytes(body)
        source, out = str(tmp_path / "in"), str(tmp_path / "report")
    summary = scan(config(source, seen_model_uri, out), progress=False)
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in dataset(out).to_table().to_pylist()}
    assert {key: row["error"] for key, row in rows.items()} == expected
    scored = [k for k, code in expected.items() if code is None]
    videos = [k for k in scored if rows[k]["media"] == "video"]
    images = [k for k in scored if k not in videos]
    assert sorted(videos) == ["5c0ffee1", "CLIP2.MOV", "clip.mp4"]
    assert {rows[k]["media"] for k in ("cut.mp4", "voice.mp4")} == {"video"}
    assert {rows[k]["format"] for k in images} == {"JPEG", "PNG", "HEIF", "AVIF", "MPO"}
    assert {rows[k]["format"] for k in videos} == {"H264", "VP9"}
    predicted = Predictor.from_uri(seen_model_uri).predict_bytes([objects[k] for k in scored])
    for key, expected_row in zip(scored, predicted, strict=True):
        row, unseen = rows[key], rows[key]["format"] not in ("JPEG", "PNG", "H264", "VP9")
        assert (row["verdict"], row["evidence"]) == (expected_row.verdict,
                                                     expected_row.evidence), key
        assert row["score_ai"] == pytest.approx(expected_row.score_ai, abs=1e-5), key
        assert [e["kind"] for e in row["evidence"] if e["source"] != "frames"] == \
            (["unfamiliar"] if unseen else []), key
        assert row["verdict"] == "uncertain" or not unseen, key
        if key in videos:
            assert row["frames_scored"] == expected_row.frames_scored == 16, key
            assert row["frame_scores"] == pytest.approx(expected_row.frame_scores, abs=1e-5)
            assert row["frame_times_s"] == expected_row.frame_times_s, key
            assert row["duration_s"] == pytest.approx(expected_row.duration_s), key
            assert row["worst_frame_s"] == expected_row.worst_frame_s, key
        else:
            assert row["frame_scores"] is None and row["duration_s"] is None, key
    assert summary["objects"] == len(expected)
    assert summary["by_media"] == {"image": len(images) + 2, "video": len(videos) + 2}
    not_scanned = summary["not_scanned"]
    assert not_scanned["total"] == len(objects) - len(expected) == 8
    assert not_scanned["by_reason"] == {"excluded-by-rule": {
        "count": 8, "by_extension": {"json": 8}, "examples": not_scanned["by_reason"][
            "excluded-by-rule"]["examples"]}}
    manifest = json.loads(storage.read_bytes(f"{out}/_manifest.json"))
    assert manifest["not_scanned"] == not_scanned and manifest["video"] == "scan"
    if where == "local":
        frame = pd.read_parquet(out)
        assert len(frame) == frame["uri"].nunique() == len(expected)
    print_scan_summary(summary, explain=True)
    printed = capsys.readouterr().out
    assert f"by media:   image={len(images) + 2}, video={len(videos) + 2}" in printed
    assert "not read:   8 objects: excluded-by-rule 8 (json 8)" in printed
    assert "    excluded-by-rule: " in printed  # --explain-selection names the first few


def test_listing_stays_a_window_ahead_of_the_writer(model_uri, local_ray, tmp_path,
                                                     monkeypatch):
    """Listing 600 local objects takes milliseconds and scoring them seconds: without the
    gate every partition is listed before the first is written (so the driver held a 2M
    bucket's keys). Scaled down (blocks of 8 KB, ~60 keys, for 2 MB; of 16 rows for 256;
    a window of 150 objects), listing waits for the writer, as the parts' own times show."""
    import detector.scanning.scan as scan_module

    monkeypatch.setattr(scan_module, "BLOCK_BYTES", 8 * 1024)
    monkeypatch.setattr(scan_module, "ROWS_PER_BLOCK", 16)
    source = tmp_path / "bucket"
    write_sample(str(source), SampleSpec(per_class=300, size=SIZE, seed=21))
    out = str(tmp_path / "report")
    summary = scan(config(str(source), model_uri, out, partition_size=50, listed_ahead=150,
                          batch_size=16), progress=False)
    assert summary["objects"] == 600
    manifest = report.read_json(out, report.MANIFEST)
    # Admitted and not yet written: the window, plus what the two listing tasks (real/,
    # fake/) held in their unsent blocks while they waited, plus a partition for each time
    # the gate opened after its patience (a busy machine) -- and never the whole bucket.
    ahead = manifest["listed_ahead"]
    assert ahead["window"] == 150
    assert 150 <= ahead["most"] <= 150 + ahead["most_held"] + 50 * ahead["forced"], ahead
    assert ahead["most"] < 600, ahead
    parts = sorted(manifest["parts"], key=lambda p: p["listed_at"])
    listed = 0
    for part in parts:
        listed += part["rows"]
        committed = sum(p["rows"] for p in parts if p["committed_at"] < part["listed_at"])
        # Ahead of the committed parts: at most the above, plus partitions written in
        # part. Without the gate it is the whole bucket.
        assert listed - committed <= 3 * 150, (part, listed, committed)
    assert committed >= 150
