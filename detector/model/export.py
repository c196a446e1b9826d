"""Exports of a trained model for the fast runtimes, each checked against Keras.

    model.onnx                  float32 ONNX (tf2onnx, as Keras' own `model.export` does);
                                OpenVINO and ONNX Runtime both read it
    model_int8.xml / .bin       OpenVINO int8, post-training quantized by NNCF on images of
                                the validation split

Every export carries a parity record on the card (`card.exports[kind]`): the largest
score difference from Keras, verdict agreement and the ROC AUC change on the test split,
and for a model with an attribution head, that head's too (`attribution`: the largest
difference in P(generator | AI) and top-1 agreement). An int8 model whose AUC drops by
more than `max_auc_drop` is refused, never published.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from detector.config import MAX_AUC_DROP
from detector.data import shards
from detector.io import storage
from detector.model.artifact import (
    CARD_FILE,
    INT8_FILE,
    INT8_FILES,
    ONNX_FILE,
    load_artifact,
    resolve,
)
from detector.model.predictor import Predictor
from detector.model.runtimes import keras_forward, openvino_forward
from detector.verdicts.verdict import classify_for

CALIBRATION_IMAGES = 300
PARITY_IMAGES = 512  # test-split images each parity record is measured on


class ExportRefused(RuntimeError):
    """An export whose parity with Keras is worse than allowed. `kept`: the parity
    records of the exports that passed, whose files are written (publishable as they are)."""

    def __init__(self, message: str, kept: dict | None = None):
        super().__init__(message)
        self.kept = kept or {}


def write_onnx(model, image_size: int, path: str) -> None:
    """Float32 ONNX of `model`, batch dimension dynamic, input uint8-range float pixels."""
    import tensorflow as tf
    import tf2onnx
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    spec = tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="pixels")
    forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    patch_tf2onnx()  # what Keras' own `model.export(format="onnx")` applies for numpy 2
    tf2onnx.convert.from_function(
        forward, input_signature=[spec], opset=17, output_path=path,
        custom_op_handlers={"Erfc": (_erfc, [])},
    )


def _erfc(ctx, node, name, args) -> None:
    """tf2onnx has no Erfc, which TensorFlow's exact GELU (ViT's MLPs) lowers to:
    erfc(x) = 1 + erf(-x)."""
    node.type = "Erf"
    ctx.insert_new_node_on_input(node, "Neg", node.input[0])
    one = ctx.make_const(f"{node.name}_one", np.array(1.0, dtype=np.float32))
    ctx.insert_new_node_on_output("Add", node.output[0], inputs=[node.output[0],
                                                                 one.output[0]])


def write_int8(onnx_path: str, calibration: np.ndarray, path: str) -> None:
    """OpenVINO int8 of an ONNX model, quantized by NNCF on `calibration` pixels."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    model = ov.Core().read_model(onnx_path)
    batches = [calibration[i : i + 1].astype(np.float32) for i in range(len(calibration))]
    # Activation ranges from the whole calibration set's extremes, not NNCF's default mean
    # of each image's: the strongest responses come from the few images with a trace, and
    # clipping them is what moved scores. Measured on the tiny test model: largest score
    # change 0.18 -> 0.09, mean 0.011 -> 0.005, same speed (the same int8 operations).
    ranges = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                              advanced_parameters=ranges)
    ov.save_model(quantized, path)


@dataclass(frozen=True)
class Parity:
    """How an export's scores compare with Keras' on the same images."""

    images: int
    max_abs_diff: float
    verdict_agreement: float
    auc_keras: float | None
    auc_export: float | None

    @property
    def auc_drop(self) -> float:
        if self.auc_keras is None or self.auc_export is None:
            return 0.0
        return self.auc_keras - self.auc_export

    def to_dict(self) -> dict:
        return {"images": self.images, "max_abs_diff": round(self.max_abs_diff, 6),
                "verdict_agreement": round(self.verdict_agreement, 4),
                "auc_keras": self.auc_keras, "auc_export": self.auc_export,
                "auc_change": round(-self.auc_drop, 5)}


def parity(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray | None,
           verdict) -> Parity:
    """Compare two score vectors; `verdict(score) -> str` is the card's rule."""
    from sklearn.metrics import roc_auc_score

    agree = np.mean([verdict(float(a)) == verdict(float(b))
                     for a, b in zip(reference, exported, strict=True)])
    aucs: tuple[float | None, float | None] = (None, None)
    if labels is not None and len(set(labels.tolist())) == 2:
        aucs = (round(float(roc_auc_score(labels, reference)), 5),
                round(float(roc_auc_score(labels, exported)), 5))
    return Parity(len(reference), float(np.max(np.abs(reference - exported))),
                  float(agree), *aucs)


def check_int8(record: Parity, max_auc_drop: float) -> None:
    if record.auc_drop > max_auc_drop:
        raise ExportRefused(
            f"int8 model refused: test ROC AUC {record.auc_export} vs {record.auc_keras} "
            f"for Keras, a drop of {record.auc_drop:.4f} > the allowed {max_auc_drop} "
            f"(max score difference {record.max_abs_diff:.4f}, verdicts agree on "
            f"{record.verdict_agreement:.1%}); `detector export --int8 --max-auc-drop X` "
            "accepts a larger drop")


def export_into(model, card, directory: str, test_pixels: np.ndarray,
                test_labels: np.ndarray | None, calibration: np.ndarray | None = None,
                max_auc_drop: float = MAX_AUC_DROP) -> dict:
    """Write the exports of a Keras `model` into a local `directory` (int8 too when
    `calibration` pixels are given) and return their parity records, measured on the
    test images. Raises ExportRefused for an int8 model that loses too much."""
    def verdict(score: float) -> str:
        return classify_for(card, score)

    def outputs(forward) -> tuple[np.ndarray, np.ndarray | None]:
        return Predictor(forward, card).score_and_attribute(test_pixels)

    reference, reference_heads = outputs(keras_forward(model, card.image_size))
    onnx_path = os.path.join(directory, ONNX_FILE)
    write_onnx(model, card.image_size, onnx_path)
    exported, heads = outputs(openvino_forward(onnx_path, "float32", None))
    records = {"onnx": {"file": ONNX_FILE, "runtime": "openvino/float32", **parity(
        reference, exported, test_labels, verdict).to_dict(),
        **head_parity(reference_heads, heads)}}
    if calibration is not None:
        int8_path = os.path.join(directory, INT8_FILE)
        write_int8(onnx_path, calibration, int8_path)
        exported, heads = outputs(openvino_forward(int8_path, "int8", None))
        record = parity(reference, exported, test_labels, verdict)
        try:
            check_int8(record, max_auc_drop)
        except ExportRefused as refused:
            for name in INT8_FILES:  # never left beside a card that does not name it
                os.remove(os.path.join(directory, name))
            raise ExportRefused(str(refused), kept=records) from None
        records["int8"] = {"file": INT8_FILE, "runtime": "openvino/int8",
                           "calibration_images": len(calibration), **record.to_dict(),
                           **head_parity(reference_heads, heads)}
    return records


def head_parity(reference: np.ndarray | None, exported: np.ndarray | None) -> dict:
    """The attribution head's parity, for a model with one: the largest difference in
    P(generator | AI), and the share of images whose top generator is the same."""
    if reference is None or exported is None:
        return {}
    return {"attribution": {
        "max_abs_diff": round(float(np.max(np.abs(reference - exported))), 6),
        "top1_agreement": round(float(np.mean(np.argmax(reference, axis=1)
                                              == np.argmax(exported, axis=1))), 4)}}


def export_from_shards(model, card, directory: str, shards_uri: str, int8: bool = False,
                       max_auc_drop: float = MAX_AUC_DROP) -> dict:
    """`export_into` with parity on the shards' test split and int8 calibration on
    images of their validation split."""
    pixels, labels = shards.sample_split(shards_uri, "test", PARITY_IMAGES)
    calibration = shards.sample_split(shards_uri, "val", CALIBRATION_IMAGES)[0] if int8 \
        else None
    return export_into(model, card, directory, pixels, labels, calibration, max_auc_drop)


def add_exports(uri: str, int8: bool = False, shards_uri: str | None = None,
                max_auc_drop: float = MAX_AUC_DROP) -> dict:
    """`detector export`: add exports to an existing artifact; its card, rewritten last,
    names them only once their files are in place."""
    uri = resolve(uri)  # a version gains exports; its weights and scores stay as they were
    model, card = load_artifact(uri)
    shards_uri = shards_uri or card.config.get("data")
    if not shards_uri:
        raise ValueError(f"{uri}: its card names no training data; pass --data SHARDS")
    with tempfile.TemporaryDirectory() as tmp:
        card.exports.update(export_from_shards(model, card, tmp, shards_uri, int8,
                                               max_auc_drop))
        with open(os.path.join(tmp, CARD_FILE), "w") as handle:
            handle.write(card.to_json())
        storage.upload_dir(tmp, uri, last=CARD_FILE)
    return card.exports
