"""The attribution head: trained jointly with the binary one, it names the generator family
of held-out `detector sample` images, and a model with it saves and loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TINY_SIZE, batches

pytestmark = pytest.mark.unit

FAMILIES = ("upsampler", "decoder-grid", "lowpass-tint")


def family_arrays(seed: int, per_family: int, families: tuple[str, ...] = FAMILIES):
    """Pixels and (label, generator index) rows: real images (index -1), then each family."""
    from detector.data.sample import encode, make_image
    from detector.io.preprocess import load_image

    xs, ys = [], []
    for index, family in enumerate((None, *families)):
        count = per_family * (len(families) if family is None else 1)
        for i in range(count):
            rng = np.random.default_rng([seed, index, i])
            pixels = make_image(0 if family is None else 1, rng, (TINY_SIZE, TINY_SIZE),
                                family=family)
            blob = encode(pixels, ("JPEG", "PNG", "WEBP")[i % 3], rng)
            xs.append(load_image(blob, TINY_SIZE)[0])
            ys.append((0 if family is None else 1, -1 if family is None else index - 1))
    return np.stack(xs), np.array(ys, dtype=np.float32)


@pytest.fixture(scope="module")
def trained_with_head():
    import keras

    from detector.model.architectures import build_model
    from detector.training.fit import FitSettings, fit

    train_x, train_y = family_arrays(100, 60)
    test_x, test_y = family_arrays(200, 30)
    keras.utils.set_random_seed(0)
    model = build_model("resnet50v2_tiny", image_size=TINY_SIZE, generators=len(FAMILIES))
    state = fit(model, batches(train_x, train_y, 16, seed=1), batches(test_x, test_y, 64),
                FitSettings(epochs=12, lr=1e-3, patience=12, lr_patience=4))
    return model, state, test_x, test_y


def test_the_head_names_held_out_families_and_the_score_still_separates(trained_with_head):
    model, state, test_x, test_y = trained_with_head
    out = np.asarray(model(test_x.astype("float32"), training=False))
    assert out.shape == (len(test_x), 1 + len(FAMILIES))
    np.testing.assert_allclose(out[:, 1:].sum(axis=1), 1, atol=1e-5)  # a distribution
    assert np.mean((out[:, 0] >= 0.5) == test_y[:, 0]) >= 0.9
    fake = test_y[:, 1] >= 0
    named = np.argmax(out[fake, 1:], axis=1)
    assert np.mean(named == test_y[fake, 1]) >= 0.9, state.history[-1]
    assert max(h["val_accuracy"] for h in state.history) >= 0.9


def test_a_model_with_the_head_saves_and_loads(trained_with_head, tmp_path):
    import keras

    model, _, test_x, _ = trained_with_head
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(test_x[:8].astype("float32"))),
                               np.asarray(model(test_x[:8].astype("float32"))), atol=1e-6)


def test_the_heads_classes_are_the_named_generators_of_the_train_split():
    from detector.training.attribution import generator_classes

    manifest = {"generators": {"train": {"sdxl": 5, "unknown": 9, "mj": 3, "gone": 0},
                               "val": {"sdxl": 1, "other": 1}}}
    assert generator_classes(manifest) == ["mj", "sdxl"]
    assert generator_classes({"generators": {"train": {"sdxl": 5, "unknown": 2}}}) == []
    assert generator_classes({}) == []  # shards from before names: a binary model


def test_labels_carry_the_generator_index_or_minus_one():
    from detector.training.attribution import labels_with_generators

    rows = labels_with_generators(np.array([0, 1, 1, 1], np.int8), [None, "mj", "other", ""],
                                  ["mj", "sdxl"])
    assert rows.dtype == np.float32
    assert rows.tolist() == [[0, -1], [1, 0], [1, -1], [1, -1]]


def test_attribution_metrics_count_only_known_generators():
    from detector.training.attribution import attribution_metrics

    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [0.1, 0.9]])
    truth = ["mj", "sdxl", "sdxl", None, "unseen"]
    metrics = attribution_metrics(truth, probabilities, ["mj", "sdxl"])
    assert metrics["images"] == 3 and metrics["left_out"] == 2
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"] == [[1, 0], [1, 1]]
    assert metrics["per_generator"] == {"mj": {"count": 1, "accuracy": 1.0},
                                        "sdxl": {"count": 2, "accuracy": 0.5}}
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


# --- a generator held out of training: called real, unknown or misattributed ---------------


def write_shards(root, x: np.ndarray, y: np.ndarray, names: list[str | None]) -> str:
    """A one-part test split as `prepare` writes it (the columns evaluation reads)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "test").mkdir(parents=True)
    pq.write_table(pa.table({
        "image": [p.tobytes() for p in x], "label": pa.array(y[:, 0], pa.int8()),
        "generator": pa.array(names, pa.string()), "source_format": ["PNG"] * len(x),
        "source_uri": [f"mem://{i}" for i in range(len(x))],
        "sha256": [hashlib.sha256(p.tobytes()).hexdigest() for p in x]}),
        root / "test" / "p.parquet")
    manifest = {"image_size": TINY_SIZE,
                "parts": {"train": [], "val": [], "test": ["test/p.parquet"]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture(scope="module")
def two_family_model(tmp_path_factory):
    """A model trained on two families, its open-set rule fitted on validation images and
    its residual model of the reals (verdicts/residual.py) as training fits them, and a
    test split holding those two families, a third it never saw, and real images."""
    import keras

    from detector.io.preprocess import PREPROCESS_VERSION
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, save_artifact
    from detector.training.fit import FitSettings, fit
    from detector.verdicts import residual
    from detector.verdicts.attribution import fit_threshold

    known = ("upsampler", "decoder-grid")
    train_x, train_y = family_arrays(100, 60, known)
    fake_train = train_y[:, 1] >= 0
    val_x, val_y = family_arrays(300, 20, known)
    keras.utils.set_random_seed(0)
    model = build_model("resnet50v2_tiny", image_size=TINY_SIZE, generators=2)
    fit(model, batches(train_x, train_y, 16, seed=1), batches(val_x, val_y, 64),
        FitSettings(epochs=16, lr=1e-3, patience=16, lr_patience=4))
    out = np.asarray(model(val_x.astype("float32"), training=False))
    fake = val_y[:, 1] >= 0
    card = ModelCard(name="two", architecture="resnet50v2", image_size=TINY_SIZE,
                     preprocess_version=PREPROCESS_VERSION, generators=list(known),
                     attribution=fit_threshold(out[fake, 1:], val_y[fake, 1]),
                     domain={"formats": ["JPEG", "PNG", "WEBP"], "long_side": [TINY_SIZE] * 2,
                             "residual": residual.fit(residual.features(train_x[~fake_train]),
                                                      residual.features(val_x[~fake]))})
    root = tmp_path_factory.mktemp("holdout")
    save_artifact(model, card, str(root / "model"))
    test_x, test_y = family_arrays(500, 20)  # all three families: lowpass-tint is new
    names = [None if g < 0 else FAMILIES[int(g)] for g in test_y[:, 1]]
    return str(root / "model"), write_shards(root / "shards", test_x, test_y, names)


def test_holdout_reports_what_the_model_answers_for_a_generator_it_never_saw(
        two_family_model, capsys):
    from detector.cli.commands import main
    from detector.data.shards import decode_pixels, encode_png, read_split_local
    from detector.model.predictor import Predictor
    from detector.training.evaluate import evaluate_holdout

    model_uri, shards_uri = two_family_model
    report = evaluate_holdout(model_uri, shards_uri, "lowpass-tint")
    assert report["images"] == 20 and report["generator"] == "lowpass-tint"
    assert report["called_real"] + report["unknown"] + report["misattributed"] == \
        pytest.approx(1)
    # Its images are unlike the reals (none is called real) and not called AI by the
    # classifier, which knows only the other two: 1.0 measured (19 of 20 were not called
    # AI by the score alone).
    assert report["unlike_real"] == 1.0 and report["called_real"] == 0
    assert report["unknown"] >= 0.7, report
    # The same answers, image by image, as predict gives for the files.
    table = read_split_local(shards_uri, "test")
    generators = table["generator"].to_pylist()
    pixels = decode_pixels(table["image"].to_pylist(), TINY_SIZE)
    predictor = Predictor.from_uri(model_uri)
    answers = [p.generator for p in predictor.predict_bytes(
        [encode_png(pixels[i]) for i, g in enumerate(generators) if g == "lowpass-tint"])]
    assert report["unknown"] == pytest.approx(answers.count("unknown") / 20)
    assert report["called_real"] == pytest.approx(answers.count(None) / 20)
    assert sum(report["misattributed_as"].values()) == sum(
        a in predictor.card.generators for a in answers)
    # Real test images: few are flagged, so few real verdicts are lost to the check.
    reals = [encode_png(pixels[i]) for i, g in enumerate(generators) if g is None]
    verdicts = [p.verdict for p in predictor.predict_bytes(reals)]
    assert verdicts.count("real") >= 0.8 * len(reals), verdicts
    assert main(["evaluate", "--model", model_uri, "--data", shards_uri,
                 "--holdout-generator", "lowpass-tint"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in ("images", "unknown", "called_real")} == {
        k: report[k] for k in ("images", "unknown", "called_real")}
    print(f"held-out lowpass-tint: {report}")  # the measurement, in -s runs


def test_holdout_refuses_a_generator_the_model_was_trained_on(two_family_model):
    from detector.training.evaluate import evaluate_holdout

    model_uri, shards_uri = two_family_model
    with pytest.raises(ValueError, match="was trained on 'upsampler'"):
        evaluate_holdout(model_uri, shards_uri, "upsampler")
    with pytest.raises(ValueError, match="no images of generator 'flux'"):
        evaluate_holdout(model_uri, shards_uri, "flux")
