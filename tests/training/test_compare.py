"""`detector compare`: before/after per slice (named sources, generators) and the gate."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import TINY_SIZE

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sliced_split(sample_arrays, tmp_path_factory) -> str:
    """The sample test images as a shard set whose real images come from two named
    sources and whose fakes from two named generators (30 of each)."""
    _, _, x, y = sample_arrays
    real, fake = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    sources = np.empty(len(y), object)
    sources[real] = ["coco" if i < len(real) // 2 else "flickr" for i in range(len(real))]
    sources[fake] = ["sdxl" if i < len(fake) // 2 else "mj" for i in range(len(fake))]
    generators = [s if label else None for s, label in zip(sources, y, strict=True)]
    return write_split(tmp_path_factory.mktemp("sliced"), x, y, sources, generators)


@pytest.fixture(scope="module")
def reviewed_split(sample_arrays, tmp_path_factory) -> str:
    """Half of the fakes folded in from reviewers' labels (source `review`), the rest and
    the real images from `coco`."""
    _, _, x, y = sample_arrays
    fake = np.flatnonzero(y == 1)
    sources = np.array(["coco"] * len(y), object)
    sources[fake[: len(fake) // 2]] = "review"
    return write_split(tmp_path_factory.mktemp("reviewed"), x, y, sources, [None] * len(y))


def write_split(root, x, y, sources, generators) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "test").mkdir()
    pq.write_table(pa.table({
        "image": [p.tobytes() for p in x], "label": pa.array(y, pa.int8()),
        "generator": pa.array(generators, pa.string()),
        "source_name": pa.array(list(sources), pa.string()),
        "source_format": ["PNG"] * len(x), "source_uri": [f"mem://{i}" for i in range(len(x))],
        "sha256": [hashlib.sha256(p.tobytes()).hexdigest() for p in x]}),
        root / "test" / "p.parquet")
    (root / "manifest.json").write_text(json.dumps({
        "image_size": TINY_SIZE, "parts": {"train": [], "val": [], "test": ["test/p.parquet"]}}))
    return str(root)


def with_threshold(uri: str, threshold: float, target, ident: str = "c" * 12) -> str:
    """A copy of the artifact, as version `ident`, whose card decides at `threshold`."""
    shutil.copytree(uri, target)
    card = json.loads((target / "detector.json").read_text())
    card.update(threshold=threshold, id=ident)
    (target / "detector.json").write_text(json.dumps(card))
    return str(target)


def test_the_same_model_passes_and_every_slice_is_reported(trained_tiny, sliced_split):
    from detector.training.compare import compare

    record = compare(trained_tiny[0], trained_tiny[0], sliced_split, backend="keras")
    assert record["passed"] and record["regressions"] == []
    assert [row["slice"] for row in record["slices"]] == [
        "all", "source:coco", "source:flickr", "source:mj", "source:sdxl", "generator:mj",
        "generator:sdxl"]
    for row in record["slices"]:
        assert row["gated"] and row["change"] == {"accuracy": 0.0, "tpr_at_1pct_fpr": 0.0}
    coco = next(r for r in record["slices"] if r["slice"] == "source:coco")["baseline"]
    assert (coco["images"], coco["ai"]) == (30, 0)
    # A one-class slice is measured against the other class of the whole split.
    assert coco["tpr_at_1pct_fpr"] is not None


def test_a_candidate_that_regresses_on_a_slice_fails_the_gate(trained_tiny, sliced_split,
                                                              tmp_path, capsys):
    from detector.cli.commands import main

    # A threshold no score reaches: every fake is called real.
    worse = with_threshold(trained_tiny[0], 0.99999, tmp_path / "worse")
    out = tmp_path / "compare"
    assert main(["compare", "--baseline", trained_tiny[0], "--candidate", worse, "--data",
                 sliced_split, "--out", str(out), "--backend", "keras"]) == 1
    printed = capsys.readouterr().out
    assert "Gate (a drop of more than 0.01" in printed and "FAILED: " in printed
    record = json.loads((out / "compare.json").read_text())
    failed = {(r["slice"], r["metric"]) for r in record["regressions"]}
    assert {("generator:sdxl", "accuracy"), ("generator:mj", "accuracy"),
            ("all", "accuracy")} <= failed
    assert ("source:coco", "accuracy") not in failed  # real images are still called real
    assert (out / "compare.md").read_text().startswith("Baseline resnet50v2_tiny@")
    # Within a loose enough tolerance the same candidate passes.
    assert main(["compare", "--baseline", trained_tiny[0], "--candidate", worse, "--data",
                 sliced_split, "--tolerance", "1", "--backend", "keras"]) == 0


def test_promote_moves_latest_only_past_the_gate_or_when_forced(trained_tiny, sliced_split,
                                                                tmp_path, capsys):
    from detector.cli.commands import main
    from detector.model.artifact import POINTER_FILE, load_card, point, resolve

    name = tmp_path / "models" / "resnet50v2_tiny"
    good = with_threshold(trained_tiny[0], load_card(trained_tiny[0]).threshold,
                          name / ("a" * 12), "a" * 12)
    worse = with_threshold(trained_tiny[0], 0.99999, name / ("b" * 12), "b" * 12)
    point(str(name), load_card(good))

    def latest() -> dict:
        return json.loads((name / POINTER_FILE).read_text())

    # The worse version fails the gate: latest does not move.
    assert main(["promote", worse, "--data", sliced_split, "--backend", "keras"]) == 1
    assert "not promoted: the gate failed" in capsys.readouterr().out
    assert latest()["id"] == "a" * 12 and resolve(str(name)) == good
    # Forced: it moves, and the pointer says it was forced past which regressions.
    assert main(["promote", worse, "--data", sliced_split, "--force", "--backend",
                 "keras"]) == 0
    assert "(forced past a failed gate)" in capsys.readouterr().out
    promotion = latest()["promotion"]
    assert latest()["id"] == "b" * 12 and promotion["forced"] and promotion["from"] == "a" * 12
    assert promotion["gate"]["regressions"] and not promotion["gate"]["passed"]
    # Back to the good version: it passes the gate against the worse one.
    assert main(["promote", good, "--data", sliced_split, "--backend", "keras"]) == 0
    assert latest()["id"] == "a" * 12 and latest()["promotion"]["forced"] is False
    assert main(["promote", good, "--data", sliced_split]) == 0  # already the latest
    assert "already the latest" in capsys.readouterr().out


def test_reviewed_misses_must_improve(trained_tiny, reviewed_split, tmp_path):
    """The fakes reviewers labelled that the baseline called real: a candidate that gets
    them right passes; one that decides as the baseline did fails, slice size aside."""
    from detector.model.artifact import load_card
    from detector.training.compare import compare, markdown

    blind = with_threshold(trained_tiny[0], 0.99999, tmp_path / "blind")  # calls fakes real
    good = with_threshold(trained_tiny[0], load_card(trained_tiny[0]).threshold,
                          tmp_path / "good", "d" * 12)
    fixed = compare(blind, good, reviewed_split, backend="keras")
    rows = {row["slice"]: row for row in fixed["slices"]}
    assert rows["reviewed-misses"]["baseline"]["images"] == 30  # every reviewed fake
    assert rows["reviewed-misses"]["baseline"]["accuracy"] == 0.0
    assert rows["reviewed-misses"]["candidate"]["accuracy"] > 0.9
    assert fixed["passed"], fixed["regressions"]
    assert "| reviewed-misses | 30 (30) | 0.0000 -> " in markdown(fixed)
    same = compare(blind, blind, reviewed_split, backend="keras")
    assert not same["passed"]
    assert [(r["slice"], r["metric"]) for r in same["regressions"]] == [
        ("reviewed-misses", "accuracy")]
    # A baseline that misses none of them (it calls every image AI) has no such slice.
    eager = with_threshold(trained_tiny[0], 0.0, tmp_path / "eager", "e" * 12)
    assert "reviewed-misses" not in {
        r["slice"] for r in compare(eager, good, reviewed_split, backend="keras")["slices"]}


def test_a_candidate_fine_tuned_on_flipped_labels_is_refused(trained_tiny, sample_arrays,
                                                             sliced_split, tmp_path, capsys):
    """The regression a bad batch of labels makes: the version fine-tuned on the training
    images with every label flipped is published as a candidate, fails the gate against
    its parent on every slice, and `promote` leaves `latest` where it was."""
    from conftest import batches

    from detector.cli.commands import main
    from detector.model.artifact import (
        POINTER_FILE,
        ModelCard,
        load_artifact,
        load_card,
        point,
        publish_version,
    )
    from detector.training.fit import FitSettings, fit
    from detector.training.promote import promote

    name = tmp_path / "models" / "resnet50v2_tiny"
    parent = with_threshold(trained_tiny[0], load_card(trained_tiny[0]).threshold,
                            name / ("a" * 12), "a" * 12)
    point(str(name), load_card(parent))
    model, parent_card = load_artifact(parent)
    train_x, train_y, test_x, test_y = sample_arrays
    fit(model, batches(train_x, 1 - train_y, 16, seed=2), batches(test_x, 1 - test_y, 64),
        FitSettings(epochs=3, lr=1e-3, patience=3, lr_patience=3))
    card = ModelCard(name=parent_card.name, architecture=parent_card.architecture,
                     image_size=TINY_SIZE, preprocess_version=parent_card.preprocess_version,
                     parent={"id": parent_card.id, "name": parent_card.name, "uri": parent})
    flipped = publish_version(model, card, str(name), candidate=True)
    assert json.loads((name / POINTER_FILE).read_text())["id"] == "a" * 12

    assert main(["promote", flipped, "--data", sliced_split, "--backend", "keras"]) == 1
    assert "not promoted: the gate failed" in capsys.readouterr().out
    assert json.loads((name / POINTER_FILE).read_text())["id"] == "a" * 12
    gate = promote(flipped, sliced_split, backend="keras")["gate"]
    regressed = {r["slice"] for r in gate["regressions"]}
    assert {"all", "generator:sdxl", "generator:mj", "source:coco"} <= regressed, regressed
