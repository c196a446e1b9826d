"""Model artifact round trip and the shared Predictor."""

from __future__ import annotations

import json
import os

import numpy as np
import provenance_fixtures as fx
import pytest
from conftest import TINY_SIZE

from detector.verdicts.verdict import classify_for

pytestmark = pytest.mark.unit


def test_artifact_round_trip_gives_identical_scores(trained_tiny, sample_arrays):
    from detector.model.artifact import load_artifact
    from detector.model.predictor import Predictor

    uri, _ = trained_tiny
    model, card = load_artifact(uri)
    assert card.name == "resnet50v2_tiny" and card.image_size == TINY_SIZE
    assert set(os.listdir(uri)) >= {"model.keras", "detector.json"}
    _, _, test_x, _ = sample_arrays
    predictor = Predictor(model, card)
    again = Predictor.from_uri(uri)
    np.testing.assert_allclose(predictor.score(test_x[:20]), again.score(test_x[:20]), rtol=1e-6)


def test_card_records_the_contract(trained_tiny):
    uri, _ = trained_tiny
    with open(os.path.join(uri, "detector.json")) as handle:
        card = json.load(handle)
    assert card["labels"] == {"0": "real", "1": "ai-generated"}
    for key in ("architecture", "image_size", "preprocess_version", "threshold", "id",
                "created_at", "data_fingerprint", "metrics"):
        assert key in card


def test_vit_with_custom_layers_loads_in_safe_mode(tmp_path):
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, load_artifact, save_artifact

    model = build_model("vit_tiny", image_size=32)
    card = ModelCard(name="vit_tiny", architecture="vit", image_size=32, preprocess_version=1)
    save_artifact(model, card, str(tmp_path / "vit"))
    loaded, _ = load_artifact(str(tmp_path / "vit"))
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(loaded(x)), rtol=1e-5)


def test_directory_without_card_is_not_an_artifact(tmp_path):
    from detector.model.artifact import load_artifact

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.keras").write_bytes(b"partial upload")
    with pytest.raises(FileNotFoundError, match=r"detector\.json"):
        load_artifact(str(tmp_path / "half"))


def test_verdict_has_an_uncertain_band():
    from detector.model.artifact import ModelCard

    card = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1,
                     threshold=0.6, uncertain_margin=0.1)
    assert classify_for(card, 0.95) == "ai-generated"
    assert classify_for(card, 0.65) == "uncertain"
    assert classify_for(card, 0.55) == "uncertain"
    assert classify_for(card, 0.3) == "real"
    # The band is open: exactly `margin` away is decided (values exact in binary floats).
    edges = ModelCard(name="m", architecture="vit", image_size=32, preprocess_version=1,
                      threshold=0.5, uncertain_margin=0.25)
    assert classify_for(edges, 0.75) == "ai-generated" and classify_for(edges, 0.25) == "real"
    assert classify_for(edges, np.nextafter(0.75, 0)) == "uncertain"
    assert classify_for(edges, np.nextafter(0.25, 1)) == "uncertain"
    assert classify_for(edges, 0.5) == "uncertain"


def test_predict_bytes_reports_errors_per_item(trained_tiny):
    from detector.data.shards import encode_png
    from detector.model.predictor import Predictor

    uri, _ = trained_tiny
    predictor = Predictor.from_uri(uri)
    good = encode_png(np.full((40, 50, 3), 128, np.uint8))
    results = predictor.predict_bytes([good, b"", b"not an image at all", good])
    assert [r.error for r in results] == [None, "empty", "not-an-image", None]
    assert results[0].score_ai == pytest.approx(results[3].score_ai)
    assert results[0].verdict in ("real", "ai-generated", "uncertain")
    assert (results[0].width, results[0].height, results[0].format) == (50, 40, "PNG")


def test_predict_cli_prints_a_line_per_file(trained_tiny, tmp_path, capsys):
    from detector.cli.commands import main
    from detector.data.shards import encode_png

    uri, _ = trained_tiny
    good = tmp_path / "good.png"
    good.write_bytes(encode_png(np.zeros((32, 32, 3), np.uint8)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    missing = tmp_path / "missing.png"
    named = tmp_path / "a1111.png"
    named.write_bytes(fx.a1111_png())
    assert main(["predict", "--model", uri, str(good), str(bad), str(missing),
                 str(named)]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(str(good)) and lines[0].split("\t")[2] in (
        "real", "ai-generated", "uncertain")
    assert "generator=" not in lines[0]  # a binary model names none
    assert "error=" in lines[1] and "error=read-failed" in lines[2]
    # The file's own parameters name the tool, in the line and in --json.
    assert lines[3].split("\t")[2:5] == ["ai-generated", "provenance",
                                        "generator=AUTOMATIC1111 (provenance)"]
    assert main(["predict", "--json", "--model", uri, str(good), str(named)]) == 0
    plain, a1111 = map(json.loads, capsys.readouterr().out.splitlines())
    assert (plain["generator"], plain["generator_scores"]) == (None, None)
    assert (a1111["generator"], a1111["generator_decided_by"]) == ("AUTOMATIC1111",
                                                                   "provenance")


def test_predict_explain_writes_overlays_without_changing_scores(trained_tiny, tmp_path,
                                                                  capsys):
    from PIL import Image

    from detector.cli.commands import main
    from detector.data.sample import make_image

    uri, _ = trained_tiny
    paths = []
    for i, size in enumerate([(96, 48), (40, 40)]):
        path = tmp_path / f"in{i}.png"
        Image.fromarray(make_image(i, np.random.default_rng(i), size)).save(path)
        paths.append(str(path))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", "--json", "--model", uri, *paths]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    out = tmp_path / "explained"
    assert main(["predict", "--json", "--model", uri, "--explain", str(out), *paths,
                 str(bad)]) == 0
    explained = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["score_ai"] for e in explained[:2]] == [p["score_ai"] for p in plain]
    assert "explanation" not in explained[2] and explained[2]["error"] == "not-an-image"
    overlays = [Image.open(e["explanation"]) for e in explained[:2]]
    assert [o.format for o in overlays] == ["PNG", "PNG"]
    assert overlays[0].size == (96, 48) and overlays[1].size == (40, 40)  # aspect kept
    assert sorted(os.listdir(out)) == ["in0.explain.png", "in1.explain.png"]


@pytest.mark.requires_bf16
def test_bfloat16_predictor_computes_in_bfloat16_and_keeps_scores_and_verdicts(
        trained_tiny, sample_arrays):
    from detector.model.artifact import load_artifact
    from detector.model.predictor import Predictor
    from detector.model.runtimes import with_dtype_policy

    uri, _ = trained_tiny
    _, _, test_x, _ = sample_arrays
    exact = Predictor.from_uri(uri, backend="keras")
    fast = Predictor.from_uri(uri, backend="keras", precision="bfloat16")
    assert fast.runtime == "keras/bfloat16"
    clone = with_dtype_policy(load_artifact(uri)[0], "mixed_bfloat16")
    policies = {layer.dtype_policy.name for layer in clone.layers}
    assert "mixed_bfloat16" in policies
    assert clone.layers[-1].dtype_policy.name == "float32"  # scores stay float32
    assert all(w.dtype == "float32" for w in clone.weights)  # same stored weights
    a, b = exact.score(test_x[:40]), fast.score(test_x[:40])
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # it really is another path
    # bfloat16 keeps 8 mantissa bits: mid-range scores move by a few hundredths
    np.testing.assert_allclose(a, b, atol=0.06)
    confident = np.abs(a - 0.5) > 0.1
    assert confident.sum() >= 20
    assert ((a > 0.5) == (b > 0.5))[confident].all()


def test_bfloat16_is_refused_with_its_reason_where_the_cpu_lacks_it(trained_tiny,
                                                                   monkeypatch):
    """An AVX2-only CPU (simulated by capping oneDNN, which TensorFlow obeys): bfloat16
    would be emulated and slower than float32, so every runtime refuses it and says why;
    float32 and int8 are unaffected."""
    from detector.model.predictor import Predictor
    from detector.model.runtimes import RuntimeUnavailable, training_policy

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    for backend in ("keras", "openvino", "auto"):
        with pytest.raises(RuntimeUnavailable, match="AMX or AVX512-BF16"):
            Predictor.from_uri(trained_tiny[0], backend=backend, precision="bfloat16")
    with pytest.raises(RuntimeUnavailable, match="train in float32"):
        training_policy(gpus=0)
    assert Predictor.from_uri(trained_tiny[0], backend="keras").runtime == "keras/float32"


@pytest.mark.requires_bf16  # emulated elsewhere, and refused (oneDNN capped at AVX2 cannot)
def test_vit_runs_in_bfloat16_too():
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard
    from detector.model.predictor import Predictor

    model = build_model("vit_tiny", image_size=32)
    card = ModelCard(name="vit_tiny", architecture="vit", image_size=32, preprocess_version=1)
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    exact = Predictor.from_model(model, card)
    fast = Predictor.from_model(model, card, precision="bfloat16")
    np.testing.assert_allclose(exact.score(x), fast.score(x), atol=0.06)


def test_unknown_precision_is_refused(trained_tiny):
    from detector.model.predictor import Predictor

    with pytest.raises(ValueError, match="precision"):
        Predictor.from_uri(trained_tiny[0], precision="float8")


def test_versions_are_immutable_and_a_name_resolves_to_the_latest(trained_tiny, tmp_path,
                                                                   sample_arrays, capsys):
    """Two publishes under one name: two versions side by side, the pointer on the second;
    a name loads the latest, an id pins its version, and `models list` shows both."""
    import dataclasses

    from detector.cli import commands as cli
    from detector.model.artifact import (
        POINTER_FILE,
        list_versions,
        load_artifact,
        load_card,
        publish_version,
        resolve,
    )
    from detector.model.predictor import Predictor

    model, card = load_artifact(trained_tiny[0])
    name = tmp_path / "models" / card.name
    with pytest.raises(FileNotFoundError, match=r"latest\.json"):
        resolve(str(name))
    first = publish_version(model, dataclasses.replace(card, id="a" * 12,
                                                       created_at="2026-01-01T00:00:00+00:00"),
                            str(name))
    second_card = dataclasses.replace(
        card, id="b" * 12, threshold=0.7, created_at="2026-02-01T00:00:00+00:00",
        generators=["mj", "sdxl"], metrics={"threshold_policy": "target-fpr:0.01"},
        calibration={"method": "platt", "a": 1.2, "b": 0.1, "ece_before": 0.0412,
                     "ece_after": 0.0133})
    second = publish_version(model, second_card, str(name))
    assert (first, second) == (str(name / ("a" * 12)), str(name / ("b" * 12)))
    assert json.loads((name / POINTER_FILE).read_text())["id"] == "b" * 12
    assert (name / ("a" * 12) / "model.keras").exists()  # the old version is intact
    assert resolve(str(name)) == second and resolve(first) == first
    assert load_card(str(name)).threshold == 0.7 and load_card(first).id == "a" * 12
    predictor = Predictor.from_uri(str(name), backend="keras")
    assert predictor.card.id == "b" * 12
    versions = list_versions(str(name))
    assert [(v["id"], v["latest"]) for v in versions] == [("a" * 12, False), ("b" * 12, True)]
    assert cli.main(["models", "list", str(tmp_path / "models")]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[0].startswith(f"  {card.name}@{'a' * 12}")
    assert lines[1].startswith(f"* {card.name}@{'b' * 12}")
    # What a reviewer needs to trust a version: threshold and policy, calibration,
    # generators.
    assert "threshold=0.7000 (target-fpr:0.01)  calibration=platt (val ECE 0.0412 -> " \
        "0.0133)  generators=mj,sdxl" in lines[1]
    assert "calibration" not in lines[0] and "generators" not in lines[0]


def test_consistency_makes_a_flipping_verdict_uncertain_and_says_why(trained_tiny,
                                                                     sample_arrays):
    """A card whose threshold sits where the re-encoded copies of an image land on the
    other side: the verdict becomes uncertain with the copies' verdicts in the evidence;
    where copies agree, nothing changes."""
    import dataclasses

    from detector.data.sample import encode
    from detector.io.preprocess import load_image
    from detector.model.artifact import ModelCard
    from detector.model.predictor import Predictor
    from detector.verdicts import consistency

    predictor = Predictor.from_uri(trained_tiny[0], backend="keras")
    _, _, test_x, _ = sample_arrays
    blobs = [encode(p, "PNG", np.random.default_rng(0)) for p in test_x[:40]]
    pixels = np.stack([load_image(b, TINY_SIZE)[0] for b in blobs])
    scores = predictor.score(pixels)
    copies = predictor.score(np.stack([c for p in pixels for c in consistency.variants(p)]))
    copies = copies.reshape(len(pixels), 2)
    # The image whose copies moved its score most: a threshold between them flips it.
    index = int(np.argmax(np.abs(copies - scores[:, None]).max(axis=1)))
    moved = copies[index][np.argmax(np.abs(copies[index] - scores[index]))]
    card = dataclasses.replace(predictor.card, threshold=float((scores[index] + moved) / 2),
                               uncertain_margin=0.0, calibration=predictor.card.calibration)
    assert isinstance(card, ModelCard)
    strict = Predictor(predictor._forward, card, runtime=predictor.runtime)

    plain = strict.predict_bytes([blobs[index]])[0]
    checked = strict.predict_bytes([blobs[index]], consistency=True)[0]
    assert plain.verdict in ("real", "ai-generated") and plain.score_ai == checked.score_ai
    assert (checked.verdict, checked.decided_by) == ("uncertain", "classifier")
    found = [e for e in checked.evidence if e["source"] == "consistency"]
    assert len(found) == 1 and found[0]["kind"] == "disagreement"
    assert f"original: {plain.verdict}" in found[0]["detail"]

    agreeing = Predictor(predictor._forward, dataclasses.replace(card, threshold=0.999,
                                                                uncertain_margin=0.0),
                         runtime=predictor.runtime)
    assert (copies < 0.999).all() and (scores < 0.999).all()
    calm = agreeing.predict_bytes([blobs[index]], consistency=True)[0]
    assert calm.verdict == "real" and not calm.evidence
