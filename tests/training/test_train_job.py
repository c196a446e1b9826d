"""Training as users run it: `ray start --head`, then `ray job submit -- python jobs/...`.

One module-scoped cluster: prepare shards naming three generator families -> train both
architectures with 2 workers (one worker is killed mid-run and Ray Train resumes from the
last checkpoint) -> artifacts with attribution heads, which predict, export, evaluate,
recalibrate and ensemble; then, on binary shards, a frozen base on one worker: a stopped
job continued with --resume, the feature cache and a fine-tune from a version (a
fine-tune of a whole model on pixels is part of the learning loop's test,
tests/training/test_retrain.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray_cluster import BIN, client_env, processes, ray_head

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SIZE = 32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real local Ray cluster started the way users start one (`ray start --head`);
    its address for `ray job submit`, and its root process."""
    with ray_head(tmp_path_factory.mktemp("cluster")) as head:
        yield head


def submit(address: str, *args: str, wait: bool = True, timeout: float = 900):
    command = [BIN / "ray", "job", "submit", f"--address={address}", "--working-dir", str(REPO)]
    if not wait:
        command.append("--no-wait")
    command += ["--", "python", *args]
    result = subprocess.run(command, env=client_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def shards(cluster, tmp_path_factory):
    """Binary sample shards (real and one family of fakes), for the frozen-base runs."""
    from detector.data.sample import SampleSpec, write_sample

    root = tmp_path_factory.mktemp("train-e2e")
    write_sample(str(root / "bucket"), SampleSpec(per_class=160, size=SIZE, seed=11))
    out = submit(cluster["address"], "jobs/prepare.py", "--real", str(root / "bucket" / "real"),
                 "--fake", str(root / "bucket" / "fake"), "--out", str(root / "shards"),
                 "--image-size", str(SIZE))
    assert "Prepared 320 of 320 objects" in out
    return root


FAMILIES = ("decoder-grid", "lowpass-tint", "upsampler")  # sorted: the head's class order


@pytest.fixture(scope="module")
def named_shards(cluster, tmp_path_factory):
    """`detector sample --generators 3`, prepared with each family named as a generator."""
    from detector.data.sample import SampleSpec, write_sample

    root = tmp_path_factory.mktemp("attribution-e2e")
    write_sample(str(root / "bucket"), SampleSpec(per_class=240, size=SIZE, seed=21,
                                                  generators=len(FAMILIES)))
    fakes = [f"{name}={root / 'bucket' / 'fake' / name}" for name in FAMILIES]
    out = submit(cluster["address"], "jobs/prepare.py", "--real", str(root / "bucket" / "real"),
                 "--fake", *fakes, "--out", str(root / "shards"), "--image-size", str(SIZE))
    assert "generator upsampler: train=" in out, out[-3000:]
    return root


def version(name_dir: Path) -> Path:
    """The version `OUT/<name>/latest.json` points at."""
    return name_dir / json.loads((name_dir / "latest.json").read_text())["id"]


def worker_pids(cluster: dict) -> list[int]:
    return sorted(processes("ray::RayTrainWorker", root=cluster["process"].pid))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def registered_checkpoint(run_dir: Path) -> bool:
    """True once Ray Train's controller has registered a checkpoint of this run (it writes
    its snapshot then). A checkpoint directory alone is not enough: a worker killed before
    the controller collected its report takes that report with it."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and "\"checkpoint_dir_name\"" in snapshot.read_text()


# Two models, 30 epochs each, with a worker lost: 13-15 min on the AVX2-only EPYC beside the
# scan module; pytest-timeout's 900 s default is too tight for it there. 16 images a worker
# (--batch-size 32): at 8, resnet50v2_tiny's BatchNorm statistics were noise and it reached
# 0.75 test accuracy (train's note says so); at 16, 0.93-0.96, and both models name the
# generator of every test image. At lr 2e-3 and 20 epochs vit_tiny swung between epochs and
# named 0.85 in one run of two.
@pytest.mark.timeout(1800)
def test_train_job_survives_a_killed_worker_and_writes_both_artifacts(cluster, named_shards):
    """Both architectures, 2 workers, on shards that name three generator families (so
    each model also gets an attribution head, checked in the next test): a worker is
    killed once the first model has a checkpoint, and Ray Train resumes from it."""
    models = named_shards / "models"
    job = subprocess.Popen(
        [BIN / "ray", "job", "submit", f"--address={cluster['address']}", "--working-dir",
         str(REPO), "--", "python", "jobs/train.py", "--data", str(named_shards / "shards"),
         "--model", "resnet50v2_tiny,vit_tiny", "--out", str(models), "--workers", "2",
         "--epochs", "30", "--lr", "1e-3", "--batch-size", "32", "--patience", "30",
         "--lr-patience", "6"],
        env=client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # Kill one worker of the first model once it has a checkpoint to come back to.
    wait_for(lambda: registered_checkpoint(models / "_ray_runs" / "train-resnet50v2_tiny"), 600,
             "a registered checkpoint")
    pids = wait_for(lambda: worker_pids(cluster), 60, "training workers")
    os.kill(pids[-1], signal.SIGKILL)
    output, _ = job.communicate(timeout=1200)
    assert job.returncode == 0, output[-6000:]
    assert "Resuming resnet50v2_tiny from its checkpoint after epoch" in output
    for name in ("resnet50v2_tiny", "vit_tiny"):
        assert (f"{name}: an attribution head over 3 generators (decoder-grid, lowpass-tint, "
                "upsampler)") in output

    comparison = json.loads((models / "comparison.json").read_text())
    assert [row["model"] for row in comparison] == ["resnet50v2_tiny", "vit_tiny"]
    assert "| resnet50v2_tiny |" in (models / "comparison.md").read_text()
    for row in comparison:
        # Held-out test split (75 images); chance is 0.5. 0.93-1.0 measured (see above).
        assert row["accuracy"] > 0.85, row
        assert row["roc_auc"] > 0.95, row
        artifact = version(models / row["model"])
        assert row["artifact"] == str(artifact) and row["id"] == artifact.name
        for name in ("model.keras", "detector.json", "metrics.json", "confusion_matrix.png",
                     "roc.png", "reliability.png", "history.png", "classification_report.txt",
                     "robustness.json", "per_format.json", "predictions.parquet"):
            assert (artifact / name).exists(), name
        card = json.loads((artifact / "detector.json").read_text())
        assert card["image_size"] == SIZE and 0 < card["threshold"] < 1
        # What it was trained on, so inputs far from it are flagged (verdicts.familiarity),
        # and the real training images' residual spectra (verdicts.residual): the fakes of
        # every family lie outside them, few test reals do (1.0 and 0.03 measured).
        domain = card["domain"]
        assert {k: domain[k] for k in ("formats", "long_side")} == \
            {"formats": ["JPEG", "PNG", "WEBP"], "long_side": [SIZE, SIZE]}
        assert domain["residual"]["fitted_on"] == "train" and domain["residual"]["images"] > 100
        flagged = json.loads((artifact / "metrics.json").read_text())["residual"]
        assert flagged["real_flagged"] <= 0.1 and flagged["ai_flagged"] >= 0.9, flagged
        # Calibrated on the validation split: never a worse ECE there; the band around
        # the threshold leaves both sides reachable.
        calibrated = json.loads((artifact / "metrics.json").read_text())["calibration"]
        assert calibrated == card["calibration"] and calibrated["fitted_on"] == "val"
        assert calibrated["ece_after"] <= calibrated["ece_before"]
        assert 0 < card["uncertain_margin"] <= min(card["threshold"], 1 - card["threshold"])
        robustness = json.loads((artifact / "robustness.json").read_text())
        assert set(robustness) == {"original", "jpeg95", "jpeg75", "jpeg50", "resize0.5"}


def test_both_models_name_the_generator_of_held_out_images(named_shards):
    """The first test's models (both architectures, 2 workers, a worker killed): each names
    the generator family of held-out images, in Keras and in its OpenVINO export, and
    evaluation reports it."""
    from detector.data import shards as shard_sets
    from detector.model.predictor import Predictor

    models = named_shards / "models"
    assert "Attribution acc." in (models / "comparison.md").read_text()
    test = shard_sets.read_split_local(str(named_shards / "shards"), "test",
                                       ["image", "label", "generator"])
    pixels = shard_sets.decode_pixels(test["image"].to_pylist(), SIZE)
    generators = test["generator"].to_pylist()
    truth = [name for name in generators if name is not None]
    fake = np.array([name is not None for name in generators])
    for name in ("resnet50v2_tiny", "vit_tiny"):
        artifact = version(models / name)
        card = json.loads((artifact / "detector.json").read_text())
        assert card["generators"] == list(FAMILIES)
        assert card["metrics"]["roc_auc"] > 0.95, card["metrics"]  # as in the first test
        # Evaluation on the test split: per-generator accuracy, macro-F1, the matrix and
        # its picture, and the head's choice per image.
        attribution = json.loads((artifact / "metrics.json").read_text())["attribution"]
        assert attribution["classes"] == list(FAMILIES) and attribution["left_out"] > 0
        # Chance is 1/3; the issue asks for 0.9. 1.0 measured, with a worker killed as
        # without (at 8 images a worker: 0.8-1.0).
        assert attribution["accuracy"] >= 0.9 and attribution["macro_f1"] >= 0.9, attribution
        assert sum(map(sum, attribution["confusion_matrix"])) == attribution["images"]
        assert card["metrics"]["attribution_accuracy"] == attribution["accuracy"]
        # The open-set rule, fitted on validation, names most test images and calls the
        # rest unknown; the three outcomes cover every image.
        rule = card["attribution"]
        assert rule["fitted_on"] == "val" and 0 < rule["threshold"] < 1, rule
        shares = attribution["open_set"]
        assert shares["threshold"] == rule["threshold"]
        assert sum(shares[k] for k in ("named_correctly", "misattributed", "unknown")) == \
            pytest.approx(1)
        assert shares["named_correctly"] >= 0.8, shares  # 0.975-1.0 measured
        assert (artifact / "attribution_confusion_matrix.png").exists()
        predictions = pq.read_table(artifact / "predictions.parquet").to_pylist()
        named = [row for row in predictions if row["generator"] is not None]
        assert len(named) == attribution["images"]
        assert np.mean([row["generator_named"] == row["generator"] for row in named]) == \
            pytest.approx(attribution["accuracy"])

        keras_scores, keras_named = Predictor.from_uri(str(artifact), backend="keras") \
            .score_and_attribute(pixels)
        chosen = [FAMILIES[i] for i in np.argmax(keras_named[fake], axis=1)]
        assert np.mean([a == b for a, b in zip(chosen, truth, strict=True)]) >= 0.9
        # The head travels in the ONNX export: OpenVINO gives the same distribution.
        assert card["exports"]["onnx"]["attribution"]["top1_agreement"] >= 0.99
        # Robustness covers the head: its accuracy on each perturbed copy.
        robust = json.loads((artifact / "robustness.json").read_text())
        assert all(m["attribution_accuracy"] is not None for m in robust.values()), robust
        assert "Attribution accuracy" in (artifact / "robustness.md").read_text()
        onnx_scores, onnx_named = Predictor.from_uri(str(artifact), backend="openvino") \
            .score_and_attribute(pixels)
        np.testing.assert_allclose(onnx_scores, keras_scores, atol=1e-3)
        np.testing.assert_allclose(onnx_named, keras_named, atol=1e-3)


def test_artifact_predicts_what_evaluation_scored(named_shards):
    from detector.model.predictor import Predictor

    artifact = named_shards / "models" / "vit_tiny"  # the name: its latest version is loaded
    evaluated = pq.read_table(version(artifact) / "predictions.parquet").slice(0, 12).to_pylist()
    predictor = Predictor.from_uri(str(artifact), backend="keras")  # as evaluation ran
    assert predictor.card.id == version(artifact).name
    blobs = [Path(row["source_uri"]).read_bytes() for row in evaluated]
    scores = [p.score_ai for p in predictor.predict_bytes(blobs)]
    np.testing.assert_allclose(scores, [row["score_ai"] for row in evaluated], atol=1e-5)

    out = subprocess.run(
        [BIN / "detector", "predict", "--model", str(artifact), "--backend", "keras",
         *[row["source_uri"] for row in evaluated[:3]]],
        capture_output=True, text=True, check=True, env=client_env(),
    ).stdout.strip().splitlines()
    assert [float(line.split("\t")[1]) for line in out] == pytest.approx(
        [row["score_ai"] for row in evaluated[:3]], abs=1e-5)


def test_training_publishes_an_onnx_export_that_matches_keras(named_shards, tmp_path):
    """Training ends with model.onnx and its parity record; `detector export --int8` adds
    an int8 model; predict runs on each with the same verdicts on these images (int8's
    may differ only where int8's measured error reaches a decision boundary)."""
    from detector.model.artifact import load_card
    from detector.verdicts.verdict import classify_for

    artifact = version(named_shards / "models" / "resnet50v2_tiny")
    record = load_card(str(artifact)).exports["onnx"]
    assert (artifact / "model.onnx").stat().st_size > 0
    assert record["max_abs_diff"] < 1e-4 and record["verdict_agreement"] == 1.0
    copy = tmp_path / "model"
    shutil.copytree(artifact, copy)
    # The AUC gate is on the test split's 75 images, where one pair of images changing
    # order moves ROC AUC by 0.005 (one run: 0.9864 -> 0.9814, refused at the default
    # 0.005); its refusal is tested in tests/model/test_runtimes.py. This test is about
    # what an accepted int8 model answers.
    out = subprocess.run([BIN / "detector", "export", "--model", str(copy), "--int8",
                          "--max-auc-drop", "0.05"],
                         capture_output=True, text=True, env=client_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "int8: model_int8.xml on openvino/int8" in out.stdout
    images = sorted(str(p) for p in (named_shards / "bucket" / "fake").rglob("*.png"))[:4]
    scores, verdicts = {}, {}
    runs = {"keras": ["--backend", "keras"], "openvino": [], "int8": ["--precision", "int8"]}
    for run, flags in runs.items():
        lines = subprocess.run([BIN / "detector", "predict", "--model", str(copy), *flags,
                                *images], capture_output=True, text=True, check=True,
                               env=client_env()).stdout.strip().splitlines()
        scores[run] = [float(line.split("\t")[1]) for line in lines]
        verdicts[run] = [line.split("\t")[2] for line in lines]
    assert verdicts["keras"] == verdicts["openvino"], verdicts
    # int8 moves a score by up to its parity record's max_abs_diff (measured at export):
    # a verdict may change only for a score within that of the threshold or a band edge.
    card = load_card(str(copy))
    error = card.exports["int8"]["max_abs_diff"]
    for score, exact, int8 in zip(scores["keras"], verdicts["keras"], verdicts["int8"],
                                  strict=True):
        reachable = {classify_for(card, score + step * error) for step in np.linspace(-1, 1, 41)}
        assert int8 == exact or int8 in reachable, (score, exact, int8, error, card.threshold)


def test_evaluate_reproduces_the_training_evaluation(named_shards, tmp_path):
    artifact = version(named_shards / "models" / "resnet50v2_tiny")
    subprocess.run(
        [BIN / "detector", "evaluate", "--model", str(artifact), "--data",
         str(named_shards / "shards"), "--out", str(tmp_path / "eval"), "--backend", "keras"],
        capture_output=True, text=True, check=True, env=client_env(),
    )
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    original = json.loads((artifact / "metrics.json").read_text())
    for key in ("accuracy", "roc_auc", "threshold", "count", "confusion_matrix"):
        assert again[key] == pytest.approx(original[key], abs=1e-6), key
    for name in ("confusion_matrix.png", "roc.png", "reliability.png", "robustness.md",
                 "classification_report.txt"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_recalibration_publishes_a_new_version_with_the_same_weights(named_shards):
    """`detector evaluate --recalibrate --threshold-policy target-fpr:X`: calibration,
    threshold and band fitted again on the validation split, published beside the old
    version (same weights), the pointer moved; the threshold holds X on validation."""
    from detector.data import shards as shard_sets
    from detector.model.predictor import Predictor

    name = named_shards / "models" / "resnet50v2_tiny"
    old = version(name)
    out = subprocess.run(
        [BIN / "detector", "evaluate", "--recalibrate", "--model", str(name), "--data",
         str(named_shards / "shards"), "--backend", "keras", "--threshold-policy",
         "target-fpr:0.05"],
        capture_output=True, text=True, env=client_env())
    assert out.returncode == 0, out.stderr[-3000:]
    new = version(name)
    assert new != old and (old / "detector.json").exists()
    assert (new / "model.keras").read_bytes() == (old / "model.keras").read_bytes()
    assert (new / "model.onnx").exists()  # exports carry over: the weights are the same
    # So does the history of the training that made them (and its picture).
    assert json.loads((new / "history.json").read_text()) == \
        json.loads((old / "history.json").read_text()) != []
    assert (new / "history.png").stat().st_size > 0
    card = json.loads((new / "detector.json").read_text())
    assert card["config"]["recalibrated_from"] == old.name
    assert card["config"]["threshold_policy"] == "target-fpr:0.05"
    metrics = json.loads((new / "metrics.json").read_text())
    assert metrics["threshold_policy"] == "target-fpr:0.05" and "fpr" in metrics
    pixels, labels = shard_sets.sample_split(str(named_shards / "shards"), "val", 10_000)
    scores = Predictor.from_uri(str(name), backend="keras").score(pixels)
    real = labels == 0
    assert ((scores >= card["threshold"]) & real).sum() / real.sum() <= 0.05 + 1e-9


def test_ensemble_of_both_trained_models_is_evaluated_and_loads_like_a_model(named_shards):
    """`detector ensemble`: an evaluated ensemble version beside the models, in
    comparison.md with them, that predict loads by its name and scores as its card says."""
    from detector.model.predictor import Predictor

    models = named_shards / "models"
    out = subprocess.run(
        [BIN / "detector", "ensemble", "--models",
         f"{models / 'resnet50v2_tiny'},{models / 'vit_tiny'}", "--data",
         str(named_shards / "shards"), "--out", str(models), "--backend", "keras"],
        capture_output=True, text=True, env=client_env())
    assert out.returncode == 0, out.stderr[-3000:]
    ensemble = version(models / "ensemble")
    card = json.loads((ensemble / "detector.json").read_text())
    assert card["architecture"] == "ensemble" and not (ensemble / "model.keras").exists()
    members = {m["model"].split("@")[0]: m for m in card["config"]["members"]}
    assert set(members) == {"resnet50v2_tiny", "vit_tiny"}
    assert members["vit_tiny"]["uri"] == str(version(models / "vit_tiny"))
    rows = {r["model"]: r for r in json.loads((models / "comparison.json").read_text())}
    assert set(rows) >= {"resnet50v2_tiny", "vit_tiny", "ensemble"}
    assert f"| ensemble | {card['id']} |" in (models / "comparison.md").read_text()
    # On the test split it does at least as well as its better member (or the table says
    # otherwise: this asserts what the sample data shows, within its 1-image resolution).
    best_member = max(rows["resnet50v2_tiny"]["roc_auc"], rows["vit_tiny"]["roc_auc"])
    assert rows["ensemble"]["roc_auc"] >= best_member - 0.01, rows
    evaluated = pq.read_table(ensemble / "predictions.parquet").slice(0, 8).to_pylist()
    predictor = Predictor.from_uri(str(models / "ensemble"), backend="keras")
    blobs = [Path(row["source_uri"]).read_bytes() for row in evaluated]
    np.testing.assert_allclose([p.score_ai for p in predictor.predict_bytes(blobs)],
                               [row["score_ai"] for row in evaluated], atol=1e-5)


FROZEN = "resnet50v2_tiny_frozen"


def frozen_args(shards: Path, *extra: str) -> list[str]:
    """A frozen-base training job on the binary shards, into shards/frozen, on one Train
    worker: stopping, caching and fine-tuning do not depend on how many there are, and two
    workers with one killed are the first test's; a second worker costs each of these jobs
    its own TensorFlow start and an all-reduce every step."""
    return ["jobs/train.py", "--data", str(shards / "shards"), "--model", FROZEN, "--weights",
            "none", "--out", str(shards / "frozen"), "--workers", "1",
            "--batch-size", "32", *extra]


def test_a_stopped_job_resumes_and_no_feature_cache_trains_on_pixels(cluster, shards):
    """A job stopped after a checkpoint continues with --resume from its last checkpoint:
    the history runs on and Adam's step count never goes back to zero. The first job asks
    for more epochs than it runs before the stop; the resumed one (epochs may change on
    --resume, the run's settings may not) finishes three more. The model has a frozen base
    trained with --no-feature-cache: on pixels, no cache computed (that both paths train
    the same model is a unit test; the cached path is the next test)."""
    name = FROZEN
    out_dir = shards / "frozen"
    run_dir = out_dir / "_ray_runs" / f"train-{name}"
    args = frozen_args(shards, "--no-feature-cache", "--lr", "3e-3", "--patience", "1000")
    submitted = submit(cluster["address"], *args, "--epochs", "1000", wait=False)
    job_id = next(line.split("'")[1] for line in submitted.splitlines()
                  if "submitted successfully" in line)
    wait_for(lambda: registered_checkpoint(run_dir), 600,
             "a registered checkpoint of the first job")
    # `ray job stop` returns once the job is stopped; its Train workers go with it. Only
    # then is the last registered checkpoint the one a resume starts from.
    subprocess.run([BIN / "ray", "job", "stop", f"--address={cluster['address']}", job_id],
                   env=client_env(), check=True, capture_output=True)
    wait_for(lambda: not worker_pids(cluster), 120, "the stopped job's workers to exit")
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    stopped_at = snapshot["latest_checkpoint_result"]["metrics"]["epoch"]
    epochs = stopped_at + 3
    output = submit(cluster["address"], *args, "--epochs", str(epochs), "--resume")
    resumed = [line for line in output.splitlines() if f"Resuming {name}" in line]
    assert resumed, output[-4000:]
    epoch = int(resumed[0].rsplit(" ", 1)[-1])
    assert epoch == stopped_at >= 1, (epoch, stopped_at)  # from the last checkpoint
    artifact = version(out_dir / name)
    history = json.loads((artifact / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert len(history) == epochs
    steps = [h["optimizer_steps"] for h in history]
    assert steps == [steps[0] * epoch for epoch in range(1, epochs + 1)], steps
    assert "Feature cache" not in output
    assert json.loads((artifact / "detector.json").read_text())["config"]["feature_cache"] \
        is False
    assert not (shards / "shards" / "_features").exists()


def test_frozen_base_trains_its_head_on_cached_features(cluster, shards):
    """The previous test's job re-applied with --resume and the feature cache on (the
    default): a run of other settings starts fresh; the base's features are computed once
    and the head trains on them to a held-out accuracy, published beside the version
    trained on pixels."""
    models = shards / "frozen"
    pixels = version(models / FROZEN)  # the previous test's
    cached = submit(cluster["address"], *frozen_args(
        shards, "--lr", "3e-3", "--patience", "20", "--lr-patience", "20", "--epochs", "20",
        "--resume"))
    assert "had other feature_cache; starting fresh" in cached, cached[-3000:]
    assert f"Feature cache for {FROZEN}: computing" in cached, cached[-3000:]
    first = version(models / FROZEN)
    metrics = json.loads((first / "metrics.json").read_text())
    # 48 test images, so one image is 0.021 of accuracy; at the threshold fitted on 42
    # validation images one run measured 0.729 (validation 0.95, ROC AUC 0.88). Chance
    # is 0.5; the AUC is the threshold-free bar.
    assert metrics["accuracy"] > 0.7 and metrics["roc_auc"] > 0.8, metrics
    card = json.loads((first / "detector.json").read_text())
    assert card["config"]["feature_cache"] is True and card["image_size"] == SIZE
    assert len(list((shards / "shards" / "_features").iterdir())) == 1
    # A new immutable version beside the first; the pointer moved, the first is intact.
    assert first != pixels and (pixels / "model.keras").exists()
    history = json.loads((first / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 21))


def test_a_fine_tune_of_the_frozen_head_is_a_candidate_that_starts_from_its_parent(
        cluster, shards):
    """`--init-from` the previous test's version: the same model warm-started from it (its
    first epoch already scores like the parent) at the fine-tune's default learning rate,
    on features of its own base (a cache keyed by the parent, every row taken from the
    first cache, none computed), published as a candidate with the parent on its card and
    `latest` left where it was, for `detector promote` to move."""
    name, models = FROZEN, shards / "frozen"
    first = version(models / name)  # the previous test's, on cached features
    pixels = next(p for p in (models / name).iterdir()
                  if p != first and (p / "detector.json").exists())  # the one before
    history = json.loads((first / "history.json").read_text())

    tuned = submit(cluster["address"], *frozen_args(shards, "--epochs", "2", "--init-from",
                                                    str(models / name)))
    assert f"Fine-tuning {name} from version {first.name} (2 epochs at lr 1e-05)" in tuned, \
        tuned[-3000:]
    assert f"Feature cache for {name}: computing" in tuned, tuned[-3000:]
    assert "images come from " in tuned and ", 0 computed" in tuned, tuned[-3000:]
    assert len(list((shards / "shards" / "_features").iterdir())) == 2
    assert version(models / name) == first  # a candidate: latest did not move
    child = next(p for p in (models / name).iterdir()
                 if p not in (pixels, first) and (p / "detector.json").exists())
    card = json.loads((child / "detector.json").read_text())
    assert card["parent"] == {"id": first.name, "name": name, "uri": str(first)}
    assert card["config"]["lr"] == 1e-5 and card["config"]["init_from"] == str(first)
    assert card["config"]["feature_cache"] is True
    parent_best = max(h["val_accuracy"] for h in history)
    assert json.loads((child / "history.json").read_text())[0]["val_accuracy"] >= \
        parent_best - 0.1
    listed = subprocess.run([BIN / "detector", "models", "list", str(models)],
                            capture_output=True, text=True, check=True, env=client_env()).stdout
    lines = listed.rstrip().splitlines()
    assert len(lines) == 3, listed
    assert lines[0].startswith(f"  {name}@{pixels.name}"), listed
    assert lines[1].startswith(f"* {name}@{first.name}"), listed
    assert lines[2].startswith(f"  {name}@{child.name}") and f"parent={first.name}" in lines[2]
    # Another model's weights are refused before training.
    refused = subprocess.run(
        [BIN / "detector", "train", "--data", str(shards / "shards"), "--model",
         "resnet50v2_tiny", "--out", str(models), "--init-from", str(first)],
        capture_output=True, text=True, env=client_env())
    assert refused.returncode != 0 and f"its --model is ['{name}']" in refused.stderr, \
        refused.stderr[-2000:]
