"""Ensembles (detector.model.ensemble): one artifact over member versions, loaded like a model."""

import json

import numpy as np
import pytest
from conftest import TINY_SIZE

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def members(trained_tiny, tmp_path_factory):
    """The trained resnet50v2_tiny and an untrained vit_tiny at the same size, the second
    with a calibration on its card (members contribute calibrated probabilities)."""
    from detector.io.preprocess import PREPROCESS_VERSION
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, save_artifact

    card = ModelCard(name="vit_tiny", architecture="vit", image_size=TINY_SIZE,
                     preprocess_version=PREPROCESS_VERSION,
                     calibration={"a": 2.0, "b": -0.5})
    other = str(tmp_path_factory.mktemp("ensemble") / "vit")
    save_artifact(build_model("vit_tiny", image_size=TINY_SIZE), card, other)
    return trained_tiny[0], other


def test_ensemble_scores_the_weighted_mean_of_calibrated_members(members, sample_arrays,
                                                                 tmp_path):
    from detector.model.ensemble import publish
    from detector.model.predictor import Predictor

    pixels = sample_arrays[2][:24]
    version = publish(members, str(tmp_path / "models"), weights=[3, 1])
    ensemble = Predictor.from_uri(str(tmp_path / "models" / "ensemble"))
    assert ensemble.card.config["members"][0]["weight"] == pytest.approx(0.75)
    assert version.endswith(ensemble.card.id)
    first, second = (Predictor.from_uri(uri) for uri in members)
    expected = 0.75 * first.score(pixels) + 0.25 * second.score(pixels)
    np.testing.assert_allclose(ensemble.score(pixels), expected, atol=1e-6)
    assert ensemble.runtime.startswith("ensemble(")


def test_predict_takes_an_ensemble_uri_and_names_it(members, tmp_path, capsys):
    from detector.cli.commands import main
    from detector.data.shards import encode_png
    from detector.model.ensemble import publish
    from detector.model.predictor import Predictor

    publish(members, str(tmp_path / "models"), name="both")
    image = tmp_path / "x.png"
    blob = encode_png(np.full((40, 50, 3), 90, np.uint8))
    image.write_bytes(blob)
    assert main(["predict", "--json", "--model", str(tmp_path / "models" / "both"),
                 "--explain", str(tmp_path / "why"), str(image)]) == 0
    line = json.loads(capsys.readouterr().out)
    expected = Predictor.from_uri(str(tmp_path / "models" / "both")).predict_bytes([blob])[0]
    assert line["score_ai"] == pytest.approx(expected.score_ai)
    assert line["explanation"].endswith("x.explain.png")  # its heaviest member explains


def test_members_must_see_the_same_pixels(members, tmp_path):
    from detector.io.preprocess import PREPROCESS_VERSION
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, save_artifact
    from detector.model.ensemble import make_card, publish

    bigger = str(tmp_path / "bigger")
    save_artifact(build_model("vit_tiny", image_size=2 * TINY_SIZE),
                  ModelCard(name="vit_tiny", architecture="vit", image_size=2 * TINY_SIZE,
                            preprocess_version=PREPROCESS_VERSION), bigger)
    with pytest.raises(ValueError, match="share image size"):
        make_card([members[0], bigger])
    with pytest.raises(ValueError, match="at least two"):
        make_card([members[0]])
    with pytest.raises(ValueError, match="--weights needs 2"):
        make_card(members, weights=[1])
    inner = publish(members, str(tmp_path / "models"))
    with pytest.raises(ValueError, match="ensembles of ensembles"):
        make_card([inner, members[0]])


def test_an_ensemble_averages_the_heads_of_members_that_name_the_same_generators(
        sample_arrays, tmp_path):
    """Two members with attribution heads over the same generators and one binary member:
    the ensemble's score averages all three, its attribution the two heads."""
    from detector.io.preprocess import PREPROCESS_VERSION
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, save_artifact
    from detector.model.ensemble import make_card, publish
    from detector.model.predictor import Predictor

    def member(name: str, generators: list[str], seed: int) -> str:
        import keras

        keras.utils.set_random_seed(seed)
        card = ModelCard(name=name, architecture="vit", image_size=TINY_SIZE,
                         preprocess_version=PREPROCESS_VERSION, generators=generators)
        uri = str(tmp_path / name)
        save_artifact(build_model("vit_tiny", image_size=TINY_SIZE, generators=len(generators)),
                      card, uri)
        return uri

    classes = ["mj", "sdxl", "unseen-here"]
    uris = [member("a", classes, 1), member("b", classes, 2), member("c", [], 3)]
    publish(uris, str(tmp_path / "models"), weights=[2, 1, 1])
    ensemble = Predictor.from_uri(str(tmp_path / "models" / "ensemble"))
    assert ensemble.card.generators == classes
    pixels = sample_arrays[2][:8]
    score, attribution = ensemble.score_and_attribute(pixels)
    (a_score, a_heads), (b_score, b_heads), (c_score, c_heads) = (
        Predictor.from_uri(uri).score_and_attribute(pixels) for uri in uris)
    assert c_heads is None
    np.testing.assert_allclose(score, 0.5 * a_score + 0.25 * b_score + 0.25 * c_score,
                               atol=1e-6)
    np.testing.assert_allclose(attribution, (2 * a_heads + b_heads) / 3, atol=1e-6)
    # Members whose heads name other generators give an ensemble without attribution.
    other = member("d", ["mj", "sdxl"], 4)
    assert make_card([uris[0], other]).generators == []
