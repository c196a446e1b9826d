"""Bucket scans against a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detector import storage
from detector.config import ScanConfig
from detector.sample import SampleSpec, write_sample
from detector.scan import REPORT_SCHEMA, scan

pytestmark = pytest.mark.e2e

SIZE = 32
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    from detector.artifact import ModelCard, save_artifact
    from detector.models import build_model

    uri = str(tmp_path_factory.mktemp("scan-model") / "vit_tiny")
    save_artifact(build_model("vit_tiny", image_size=SIZE),
                  ModelCard(name="vit_tiny", architecture="vit", image_size=SIZE,
                            preprocess_version=1, threshold=0.5, uncertain_margin=0.0), uri)
    return uri


@pytest.fixture(scope="module")
def scan_bucket(s3_server, local_ray):
    """> 1,000 objects (S3 lists 1,000 per page) in nested prefixes with odd keys, plus
    corrupt, empty, non-image, oversized and excluded files."""
    import boto3

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
    return "s3://scan/photos"


def selected(prefix: str) -> list[str]:
    return [o.uri for o in storage.list_objects(prefix, ScanConfig.__dataclass_fields__[
        "include"].default)]


def read_report(uri: str) -> pa.Table:
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs)


def test_report_has_exactly_one_row_per_selected_object(scan_bucket, model_uri):
    from detector.predictor import Predictor

    out = "s3://scan/reports/full.parquet"
    summary = scan(ScanConfig(source=scan_bucket, model=model_uri, out=out, via="data",
                              max_bytes=MAX_BYTES), progress=False)
    expected = selected(scan_bucket)
    assert len(expected) > 1000
    report = read_report(out)
    assert report.schema.equals(REPORT_SCHEMA)
    uris = report.column("uri").to_pylist()
    assert sorted(uris) == sorted(expected) and len(set(uris)) == len(uris)
    assert not any(u.endswith("readme.txt") for u in uris)
    assert summary["objects"] == len(expected)

    rows = {r["uri"]: r for r in report.to_pylist()}
    assert rows["s3://scan/photos/odd/huge scan ß.png"]["error"] == "too-large"
    assert rows["s3://scan/photos/odd/empty.JPG"]["error"] == "empty"
    errors = {r["error"] for r in rows.values() if r["error"]}
    assert errors <= {"too-large", "empty", "truncated", "not-an-image", "corrupt"}
    for row in rows.values():
        assert (row["score_ai"] is None) == (row["error"] is not None) == (row["verdict"] is None)
        assert row["model"].startswith("vit_tiny@") and row["scanned_at"] is not None
    assert any("ü" in u for u in uris)

    sample_uris = [u for u in uris if rows[u]["error"] is None][:25]
    predicted = Predictor.from_uri(model_uri).predict_bytes(
        [storage.read_bytes(u) for u in sample_uris])
    np.testing.assert_allclose([rows[u]["score_ai"] for u in sample_uris],
                               [p.score_ai for p in predicted], atol=1e-6)

    frame = report.to_pandas()
    assert str(frame["scanned_at"].dtype).startswith("datetime64") and "UTC" in str(
        frame["scanned_at"].dtype)
    assert frame["score_ai"].dtype == np.float64 and frame["width"].dtype.name in ("Int32",
                                                                                  "float64")


def test_resume_scores_only_new_and_changed_objects(scan_bucket, model_uri, s3_server):
    import boto3

    out = "s3://scan/reports/resume.parquet"
    config = ScanConfig(source=scan_bucket, model=model_uri, out=out, via="data",
                        max_bytes=MAX_BYTES)
    first = scan(config, progress=False)
    s3 = boto3.client("s3")
    added = max(1, first["objects"] // 10)
    blob = storage.read_bytes(selected(scan_bucket)[0])
    for i in range(added):
        s3.put_object(Bucket="scan", Key=f"photos/new/added-{i:04d}.jpg", Body=blob)
    second = scan(ScanConfig(**{**config.__dict__, "resume": True}), progress=False)
    assert second["scanned"] == added  # only the new objects reached the model
    assert second["objects"] == first["objects"] + added
    report = read_report(out)
    assert report.num_rows == second["objects"]
    assert len(set(report.column("uri").to_pylist())) == report.num_rows


def scoring_actors() -> dict[int, str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]): line for line in ps.splitlines()
            if "ray::MapWorker" in line and "ScoreWithPredictor" in line}


def test_killed_scoring_actor_loses_no_rows(scan_bucket, model_uri):
    out = "s3://scan/reports/killed.parquet"
    result: dict = {}

    def run() -> None:
        result["summary"] = scan(ScanConfig(source=scan_bucket, model=model_uri, out=out,
                                            via="data", batch_size=8, actors=2,
                                            cpus_per_actor=1, max_bytes=MAX_BYTES),
                                 progress=False)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while not scoring_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # let it score some batches first
    actors = scoring_actors()
    assert actors, "no scoring actor found"
    # Decoding runs in its own tasks, not fused into the (possibly GPU) scoring actors.
    assert not any("decode_objects" in line for line in actors.values()), actors
    os.kill(next(iter(actors)), signal.SIGKILL)
    worker.join(timeout=600)
    assert "summary" in result
    report = read_report(out)
    uris = report.column("uri").to_pylist()
    assert sorted(uris) == sorted(selected(scan_bucket))


@pytest.fixture(scope="module")
def serve_app(local_ray, model_uri):
    """The detector Serve app on 127.0.0.1, allowed to scan the test bucket."""
    import requests
    from conftest import free_port
    from ray import serve

    from detector.serve import APP_NAME, ServeConfig, build_app_from_config

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(model_uri=model_uri, min_replicas=1, max_replicas=1,
                         scan_allow=("s3://scan/photos", "s3://scan/reports"))
    serve.run(build_app_from_config(config), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(1)
    yield url
    serve.shutdown()


def test_scan_via_serve_matches_data_and_the_http_endpoint(scan_bucket, model_uri, serve_app):
    import requests

    via_serve = "s3://scan/reports/via-serve.parquet"
    summary = scan(ScanConfig(source=scan_bucket, model=model_uri, out=via_serve,
                              max_bytes=MAX_BYTES), progress=False)
    assert summary["via"] == "serve"  # auto: the detector app is running
    rows = {r["uri"]: r for r in read_report(via_serve).to_pylist()}
    assert sorted(rows) == sorted(selected(scan_bucket))
    scored = [u for u, r in rows.items() if r["error"] is None][:10]
    for uri in scored:
        answer = requests.post(f"{serve_app}/v1/detect", data=storage.read_bytes(uri),
                               headers={"Content-Type": "application/octet-stream"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["score_ai"] == pytest.approx(rows[uri]["score_ai"], abs=1e-5)


def test_scans_start_over_http_within_the_allow_list(scan_bucket, serve_app):
    import requests

    refused = requests.post(f"{serve_app}/v1/scans", json={
        "source": "s3://other-bucket/private", "output": "s3://scan/reports/x.parquet"},
        timeout=30)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    sneaky = requests.post(f"{serve_app}/v1/scans", json={
        "source": "s3://scan/photos/../../etc", "output": "s3://scan/reports/x.parquet"},
        timeout=30)
    assert sneaky.status_code == 403
    assert requests.post(f"{serve_app}/v1/scans", json={"source": 1}, timeout=30).status_code \
        == 422
    assert requests.get(f"{serve_app}/v1/scans/nope", timeout=30).status_code == 404

    started = requests.post(f"{serve_app}/v1/scans", json={
        "source": f"{scan_bucket}/real/batch-01", "output": "s3://scan/reports/http.parquet"},
        timeout=30)
    assert started.status_code == 202, started.text
    status_url = f"{serve_app}{started.json()['status_url']}"
    deadline = time.monotonic() + 180
    while (state := requests.get(status_url, timeout=30).json())["status"] == "running":
        assert time.monotonic() < deadline, state
        time.sleep(1)
    assert state["status"] == "succeeded", state
    assert state["summary"]["objects"] == len(selected(f"{scan_bucket}/real/batch-01")) > 0
    assert state["summary"]["by_verdict"] and state["summary"]["via"] == "serve"
    assert read_report("s3://scan/reports/http.parquet").num_rows == state["summary"]["objects"]
