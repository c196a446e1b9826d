"""The learning loop as users run it, on a `ray start --head` cluster with `ray job submit`:
a model that never saw one generator family scans a bucket of it, a reviewer labels its
misses with `detector label`, and `jobs/retrain.py` folds the labels into new shards,
fine-tunes the model, gates the candidate and promotes it; a rescan misses fewer, and a
Serve app built after the promotion serves the new version."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from ray_cluster import BIN, client_env, free_port, ray_head, wait_for

from detector.scanning import report

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
KNOWN, HELD_OUT = "lowpass-tint", "upsampler"  # the weak model's only fakes; the new ones


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("cluster")) as head:
        yield head


def submit(address: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [BIN / "ray", "job", "submit", f"--address={address}", "--working-dir",
               str(REPO), "--", "python", *args]
    result = subprocess.run(command, env=client_env(), capture_output=True, text=True,
                            timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def misses(out: Path) -> list[str]:
    """The AI images of a scan report (all under fake/) that it did not call AI."""
    table = pa.concat_tables(report.read_part(str(out), name)
                             for name in report.part_files(str(out)))
    return sorted(row["uri"] for row in table.select(["uri", "verdict"]).to_pylist()
                  if "/fake/" in row["uri"] and row["verdict"] != "ai-generated")


def latest(name_dir: Path) -> str:
    return json.loads((name_dir / "latest.json").read_text())["id"]


def test_labelled_misses_retrain_into_a_promoted_version_that_misses_fewer(
        cluster, tmp_path_factory):
    from detector.data.sample import SampleSpec, write_sample

    root = tmp_path_factory.mktemp("retrain")
    address = cluster["address"]
    # As many fakes of the known family as real photos (--per-class), so the baseline
    # learns it: a baseline that calls nearly everything real scores about the share of
    # real images, and refitting a threshold on its flat scores moves "all" by several
    # images either way, more than the gate's 0.01.
    write_sample(str(root / "bucket"), SampleSpec(per_class=540, size=SIZE, seed=41,
                                                  generators=3))
    submit(address, "jobs/prepare.py", "--real", str(root / "bucket" / "real"), "--fake",
           str(root / "bucket" / "fake" / KNOWN), "--out", str(root / "shards"),
           "--image-size", str(SIZE), "--per-class", "180")
    models = root / "models"
    # One Train worker here and in the retrain job: how two workers split the data depends
    # on timing, and this test's gate (one image of 48 is 0.021 of accuracy) then failed
    # in 2 of 4 runs, on a weak baseline (0.62) or a candidate a few images worse. Two
    # workers, a worker killed, are the training module's test.
    submit(address, "jobs/train.py", "--data", str(root / "shards"), "--model", "vit_tiny",
           "--out", str(models), "--workers", "1", "--epochs", "12", "--lr", "1e-3",
           "--batch-size", "16")
    baseline = latest(models / "vit_tiny")

    # New images arrive: real photos and a generator family the model never saw.
    incoming = root / "incoming"
    write_sample(str(incoming), SampleSpec(per_class=150, size=SIZE, seed=42, generators=3))
    for family in (KNOWN, "decoder-grid"):  # only the held-out family's fakes arrive
        for path in sorted((incoming / "fake" / family).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (incoming / "fake" / family).rmdir()
    submit(address, "jobs/scan.py", str(incoming), "--model", str(models / "vit_tiny"),
           "--out", str(root / "scan1"))
    missed = misses(root / "scan1")
    assert len(missed) >= 10, f"the weak model caught the new family: {len(missed)} misses"

    # A reviewer labels (up to) 50 of the misses.
    labels = root / "labels"
    subprocess.run([BIN / "detector", "label", "--labels", str(labels), *missed[:50],
                    "--label", "ai-generated", "--reviewer", "ana"],
                   check=True, env=client_env(), capture_output=True)

    run = submit(address, "jobs/retrain.py", "--model", str(models / "vit_tiny"),
                 "--labels", str(labels), "--shards", str(root / "shards-reviewed"),
                 "--report", str(root / "retrain"), "--workers", "1", "--lr", "1e-4",
                 check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    record = json.loads((root / "retrain" / "retrain.json").read_text())
    gate = json.loads((root / "retrain" / "compare.json").read_text())
    slices = {s["slice"]: s for s in gate["slices"]}
    reviewed = slices["reviewed-misses"]
    assert reviewed["baseline"]["accuracy"] == 0 < reviewed["candidate"]["accuracy"], reviewed
    assert "source:review" in slices
    assert gate["passed"] and not gate["regressions"], gate["regressions"]
    assert record["promoted"] and record["labels"]["written"] == min(50, len(missed))
    assert "promoted: " in output
    # The reviewed images in the training split weigh 4x (--review-weight's default).
    assert record["review_weight"] == 4 and "each seen 4x per epoch" in output, output[-3000:]
    # latest moved to the candidate, which records its parent.
    candidate = latest(models / "vit_tiny")
    assert candidate != baseline and record["candidate"].endswith(candidate)
    card = json.loads((models / "vit_tiny" / candidate / "detector.json").read_text())
    assert card["parent"]["id"] == baseline and card["config"]["data"] == \
        str(root / "shards-reviewed")
    shards = json.loads((root / "shards-reviewed" / "manifest.json").read_text())
    assert shards["sources"]["base"] == str(root / "shards")
    assert shards["written"] == json.loads((root / "shards" / "manifest.json").read_text())[
        "written"] + record["labels"]["written"]

    # The rescan with the promoted version misses fewer of the new family.
    submit(address, "jobs/scan.py", str(incoming), "--model", str(models / "vit_tiny"),
           "--out", str(root / "scan2"))
    assert report.read_manifest(str(root / "scan2"))["model"].endswith(candidate)
    assert len(misses(root / "scan2")) < len(missed)

    # A Serve app built now (a RayService rollout, here `detector serve` on the cluster)
    # pins the promoted version, and scores a missed image as the new version does.
    import requests

    from detector.io import storage
    from detector.model.predictor import Predictor

    port, log = free_port(), root / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "detector"), "serve", "--model", str(models / "vit_tiny"), "--port",
             str(port), "--max-replicas", "1"],
            env=client_env({"RAY_ADDRESS": cluster["gcs"]}), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(f"{url}/healthz", timeout=5).status_code == 200,
                 timeout=240, what="detector serve", alive=server, log=log)
        served = requests.get(f"{url}/v1/model", timeout=30).json()
        assert served["id"] == candidate and served["parent"]["id"] == baseline, served
        blob = storage.read_bytes(missed[0])
        verdict = requests.post(f"{url}/v1/detect", data=blob, timeout=60, headers={
            "Content-Type": "application/octet-stream"}).json()
        expected = Predictor.from_uri(str(models / "vit_tiny" / candidate)).predict_bytes(
            [blob])[0]
        assert verdict["model"] == f"vit_tiny@{candidate}", verdict
        assert verdict["score_ai"] == pytest.approx(expected.score_ai, abs=1e-5)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
