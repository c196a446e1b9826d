"""Exports and runtimes: ONNX / OpenVINO / ONNX Runtime scores against Keras' own, on a
briefly trained model and on the sample test images; and the clear refusals."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from detector.verdicts.verdict import classify_for

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def exported(trained_tiny, sample_arrays, tmp_path_factory):
    """The trained artifact copied, with ONNX and int8 exports added: (uri, records)."""
    from detector.model.artifact import CARD_FILE, load_artifact
    from detector.model.export import export_into

    train_x, _, test_x, test_y = sample_arrays
    uri = str(tmp_path_factory.mktemp("exported") / "model")
    shutil.copytree(trained_tiny[0], uri)
    model, card = load_artifact(uri)
    card.exports = export_into(model, card, uri, test_x, test_y, calibration=train_x[::2])
    with open(f"{uri}/{CARD_FILE}", "w") as handle:
        handle.write(card.to_json())
    return uri, card.exports


def test_float32_exports_match_keras(exported, sample_arrays):
    from detector.model.predictor import Predictor

    uri, records = exported
    _, _, test_x, _ = sample_arrays
    keras_scores = Predictor.from_uri(uri, backend="keras").score(test_x)
    for backend in ("openvino", "onnxruntime"):
        predictor = Predictor.from_uri(uri, backend=backend)
        assert predictor.runtime == f"{backend}/float32"
        np.testing.assert_allclose(predictor.score(test_x), keras_scores, atol=1e-4)
    assert records["onnx"]["max_abs_diff"] < 1e-4
    assert records["onnx"]["verdict_agreement"] == 1.0


def test_runtimes_score_from_many_threads_at_once(exported, sample_arrays):
    """A Serve replica scores from several threads: every runtime must give each caller
    its own scores (OpenVINO's infer request alone would fail with "busy")."""
    from concurrent.futures import ThreadPoolExecutor

    from detector.model.predictor import Predictor

    uri, _ = exported
    _, _, test_x, _ = sample_arrays
    for backend, precision in (("openvino", "float32"), ("openvino", "int8"),
                               ("onnxruntime", "float32")):
        predictor = Predictor.from_uri(uri, batch_size=8, backend=backend, precision=precision)
        alone = predictor.score(test_x)
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(predictor.score, [test_x] * 12))
        for scores in together:
            np.testing.assert_array_equal(scores, alone)


# precision -> bounds on |score - Keras score|: (largest, 90th percentile, mean)
SCORE_BOUNDS = {"bfloat16": (0.02, 0.01, 0.005), "int8": (0.15, 0.03, 0.01)}


def test_int8_and_bfloat16_stay_close_and_agree(exported, sample_arrays):
    from detector.model.artifact import load_card
    from detector.model.predictor import Predictor
    from detector.model.runtimes import bf16_hardware

    uri, records = exported
    _, _, test_x, _ = sample_arrays
    card = load_card(uri)
    reference = Predictor.from_uri(uri, backend="keras").score(test_x)
    precisions = ["int8"] + (["bfloat16"] if bf16_hardware(gpu_ok=False) else [])
    for precision in precisions:
        scores = Predictor.from_uri(uri, backend="openvino", precision=precision).score(test_x)
        assert not np.array_equal(scores, reference)  # really another path
        difference = np.abs(scores - reference)
        # bfloat16 stays within 0.02. int8 of this 48 px tiny model (small layers, so
        # rounding weighs more) moves a few mid-range scores: up to 0.09 (mean 0.005) on
        # a Zen 4 EPYC with the calibration set's activation extremes (0.19 with NNCF's
        # default ranges); NNCF's accuracy control got it to 0.05 only with eight layers
        # back in float. What must hold: few move, and the ranking and verdicts stay.
        largest, p90, mean = SCORE_BOUNDS[precision]
        assert difference.max() <= largest, (precision, difference.max())
        assert np.quantile(difference, 0.9) <= p90, precision
        assert difference.mean() <= mean, precision
        agree = np.mean([classify_for(card, float(a)) == classify_for(card, float(b))
                         for a, b in zip(scores, reference, strict=True)])
        assert agree >= 0.99, precision
    assert records["int8"]["max_abs_diff"] <= SCORE_BOUNDS["int8"][0]
    assert records["int8"]["verdict_agreement"] >= 0.99
    assert abs(records["int8"]["auc_change"]) <= 0.005
    assert records["int8"]["calibration_images"] == 160


def test_auto_prefers_openvino_when_exported(exported, trained_tiny):
    from detector.model.predictor import Predictor

    assert Predictor.from_uri(exported[0]).runtime == "openvino/float32"
    assert Predictor.from_uri(trained_tiny[0]).runtime == "keras/float32"  # no export
    assert Predictor.from_uri(exported[0], precision="int8").runtime == "openvino/int8"


def test_unavailable_runtimes_are_refused_with_the_reason(exported, trained_tiny):
    from detector.model.predictor import Predictor
    from detector.model.runtimes import RuntimeUnavailable

    plain = trained_tiny[0]
    with pytest.raises(RuntimeUnavailable, match=r"detector export --model .* --int8"):
        Predictor.from_uri(plain, precision="int8")
    with pytest.raises(RuntimeUnavailable, match=r"model\.onnx"):
        Predictor.from_uri(plain, backend="onnxruntime")
    with pytest.raises(RuntimeUnavailable, match="OpenVINO only"):
        Predictor.from_uri(exported[0], backend="keras", precision="int8")
    with pytest.raises(RuntimeUnavailable, match="float32"):
        Predictor.from_uri(exported[0], backend="onnxruntime", precision="bfloat16")
    with pytest.raises(ValueError, match="backend"):
        Predictor.from_uri(exported[0], backend="tensorrt")


def test_int8_that_loses_accuracy_is_refused_before_publishing(trained_tiny, sample_arrays,
                                                              tmp_path):
    from detector.model.artifact import load_artifact
    from detector.model.export import ExportRefused, export_into

    train_x, _, test_x, test_y = sample_arrays
    model, card = load_artifact(trained_tiny[0])
    with pytest.raises(ExportRefused, match=r"test ROC AUC .* a drop of") as refused:
        # A negative allowance: even an int8 model as good as float32 is refused.
        export_into(model, card, str(tmp_path), test_x, test_y, calibration=train_x[:32],
                    max_auc_drop=-1.0)
    # What passed stays publishable (training publishes the model with it); the refused
    # int8 files are gone, so no card can name them by mistake.
    assert list(refused.value.kept) == ["onnx"]
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_vit_exports_too(sample_arrays, tmp_path):
    """ViT's exact GELU lowers to Erfc, which tf2onnx lacks: exported through our rule."""
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard
    from detector.model.export import export_into

    _, _, test_x, test_y = sample_arrays
    model = build_model("vit_tiny", image_size=test_x.shape[1])
    card = ModelCard(name="vit_tiny", architecture="vit", image_size=test_x.shape[1],
                     preprocess_version=1)
    records = export_into(model, card, str(tmp_path), test_x[:32], test_y[:32])
    assert records["onnx"]["max_abs_diff"] < 1e-4
