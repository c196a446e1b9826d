"""Package hygiene, config flags, storage and the pure parts of data preparation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_import_detector_has_no_side_effects(tmp_path):
    """Nothing heavy is imported and nothing is written. (No time bound: timings do not go
    into pass/fail tests, and modules run side by side under load.)"""
    code = ("import sys; import detector; "
            "print('tensorflow' in sys.modules, 'ray' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"]
    assert os.listdir(tmp_path) == []


def test_cli_help_lists_every_subcommand_and_each_renders_its_own():
    import argparse

    from detector.cli.commands import build_parser

    parser = build_parser()
    text = parser.format_help()
    for command in ("sample", "prepare", "train", "evaluate", "predict", "models", "demo",
                    "retrain"):
        assert command in text
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert sub.format_help().startswith(f"usage: detector {name}"), name
    retrain = " ".join(commands.choices["retrain"].format_help().split())
    assert "TPR@1%FPR" in retrain and "(default: 0.01)" in retrain


def test_config_flags_round_trip():
    import argparse

    from detector import config

    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.TrainConfig)
    args = parser.parse_args(
        ["--data", "s3://b/shards", "--model", "resnet50v2,vit", "--out", "o", "--epochs", "3",
         "--resume", "--gpus-per-worker", "0.5"]
    )
    cfg = config.from_args(config.TrainConfig, args)
    assert cfg.model == ("resnet50v2", "vit")
    assert (cfg.epochs, cfg.resume, cfg.gpus_per_worker, cfg.patience) == (3, True, 0.5, 3)
    assert cfg.feature_cache is True  # on unless turned off
    off = parser.parse_args(["--data", "d", "--model", "m", "--out", "o", "--no-feature-cache"])
    assert config.from_args(config.TrainConfig, off).feature_cache is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "vit"])  # --data and --out are required
    # A fine-tune's own defaults (fewer epochs, a lower rate) where a flag is left out.
    tune = ["--data", "d", "--model", "m", "--out", "o", "--init-from", "o/m"]
    tuned = config.from_args(config.TrainConfig, parser.parse_args(tune))
    assert (tuned.epochs, tuned.lr, tuned.init_from) == (5, 1e-5, "o/m")
    tuned = config.from_args(config.TrainConfig, parser.parse_args([*tune, "--epochs", "8"]))
    assert (tuned.epochs, tuned.lr) == (8, 1e-5)
    assert "(default: 20; 5 with --init-from)" in " ".join(parser.format_help().split())


def test_training_paths_typed_relative_reach_the_workers_absolute(tmp_path, monkeypatch):
    """`detector train --data shards --out out` from a folder: Ray Train's workers run in
    their run's own directory, so the settings they get name absolute paths (a relative
    feature-cache path once failed there with FileNotFoundError)."""
    from detector.config import TrainConfig
    from detector.io import storage
    from detector.training.train import settle

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"image_size": 32}))
    monkeypatch.chdir(tmp_path)
    cfg, size = settle(TrainConfig(data="shards", model=("vit_tiny",), out="out/"),
                       say=lambda _: None)
    assert (cfg.data, cfg.out, size) == (str(tmp_path / "shards"), str(tmp_path / "out"), 32)
    assert storage.absolute("s3://b/shards") == "s3://b/shards"
    assert storage.absolute("file://shards") == str(tmp_path / "shards")


def test_too_few_images_per_worker_for_batch_norm_are_pointed_out(tmp_path):
    """BatchNorm normalises each worker's share of a step on its own: a share under 16
    gets a note naming the batch size that avoids it, for models that train BatchNorm
    layers only (a ViT has none)."""
    from detector.config import TrainConfig
    from detector.training.train import settle

    (tmp_path / "manifest.json").write_text(json.dumps({"image_size": 32}))

    def notes(models: tuple[str, ...], batch_size: int, workers: int) -> list[str]:
        said = []
        settle(TrainConfig(data=str(tmp_path), model=models, out=str(tmp_path / "out"),
                           batch_size=batch_size, workers=workers), say=said.append)
        return [line for line in said if line.startswith("Note:")]

    [note] = notes(("resnet50v2_tiny", "vit_tiny"), 16, 2)
    assert "resnet50v2_tiny normalises each worker's 8 images" in note
    assert "raise --batch-size to 32 or more" in note
    assert notes(("resnet50v2_tiny",), 32, 2) == notes(("vit_tiny",), 8, 4) == []


def test_local_storage_lists_filters_and_writes_atomically(tmp_path):
    from detector.io import storage

    root = tmp_path / "bucket"
    storage.write_bytes(str(root / "a" / "x.JPG"), b"1")
    storage.write_bytes(str(root / "a" / "b" / "photo ü 1.png"), b"22")
    storage.write_bytes(str(root / "notes.txt"), b"333")
    listed = list(storage.list_objects(str(root), ("*.jpg", "*.png")))
    assert [os.path.basename(o.uri) for o in listed] == ["photo ü 1.png", "x.JPG"]
    assert [o.size for o in listed] == [2, 1]
    assert len(list(storage.list_objects(f"file://{root}"))) == 3
    assert not [n for n in os.listdir(root / "a") if n.startswith(".tmp")]


def test_publish_dir_replaces_a_local_directory_whole(tmp_path):
    from detector.io import storage

    for version in ("one", "two"):
        src = tmp_path / f"src-{version}"
        src.mkdir()
        (src / "detector.json").write_text(version)
        (src / f"only-{version}").write_text(version)
        storage.publish_dir(str(src), str(tmp_path / "out"), commit_file="detector.json")
    assert sorted(os.listdir(tmp_path / "out")) == ["detector.json", "only-two"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src-one", "src-two"]


def test_split_is_a_function_of_content_and_seed():
    from detector.data.prepare import split_of

    hashes = [f"{i:064x}" for i in range(3000)]
    splits = [split_of(h, (0.7, 0.15, 0.15), 42) for h in hashes]
    assert splits == [split_of(h, (0.7, 0.15, 0.15), 42) for h in hashes]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.7) < 0.03 and abs(share["test"] - 0.15) < 0.03
    assert splits != [split_of(h, (0.7, 0.15, 0.15), 7) for h in hashes]


def test_bias_audit_flags_the_format_shortcut_only_when_present():
    from detector.data.audit import bias_audit

    def rows(fmt_real, fmt_fake, n=60):
        return [
            {"label": label, "source_format": fmt,
             "width": 256 + (i % 3) * 64, "height": 256, "size_bytes": 1000 + i * 7}
            for label, fmt in ((0, fmt_real), (1, fmt_fake)) for i in range(n)
        ]

    biased = bias_audit(rows("JPEG", "PNG"))
    assert biased["trivial_rule_accuracy"]["format"] == 1.0
    assert any("format" in w for w in biased["warnings"])
    fair = bias_audit(rows("JPEG", "JPEG"))
    assert fair["trivial_rule_accuracy"]["format"] <= 0.6
    assert not any("format" in w for w in fair["warnings"])
    assert json.dumps(fair)  # manifest-serialisable


def test_threads_follow_the_cpus_ray_reserved():
    import subprocess
    import sys

    from detector.io.threads import threads_for

    assert [threads_for(c) for c in (0.25, 1, 2, 2.5, 3)] == [1, 1, 2, 3, 3]
    code = ("from detector.io.threads import limit_threads, reserved_threads; "
            "limit_threads(reserved_threads(2.5)); "
            "import tensorflow as tf; tf.constant(1.0) + 1; "
            "print(tf.config.threading.get_intra_op_parallelism_threads(), "
            "tf.config.threading.get_inter_op_parallelism_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["3", "3"]


def test_parquet_reads_size_the_footer_pool_to_the_files_and_respect_a_set_size(monkeypatch):
    """One footer-reading actor per 10 files, up to Ray's 32; set only for the read, and a
    size the user set in the environment is left alone (detector.io.parquet)."""
    from detector.io import parquet

    assert [parquet.footer_readers(n) for n in (0, 1, 10, 11, 95, 5_000)] == [1, 1, 1, 2, 10, 32]
    monkeypatch.delenv(parquet.POOL_SETTING, raising=False)
    with parquet._footer_pool(3):
        assert os.environ[parquet.POOL_SETTING] == "3"
    assert parquet.POOL_SETTING not in os.environ
    monkeypatch.setenv(parquet.POOL_SETTING, "8")
    with parquet._footer_pool(3):
        assert os.environ[parquet.POOL_SETTING] == "8"
    assert os.environ[parquet.POOL_SETTING] == "8"
