"""Artifacts on object storage, as a cluster keeps them (s3://BUCKET/models/...), read
through a real S3 endpoint (moto's server on 127.0.0.1): every runtime loads a published
version by its name and scores exactly as the same artifact on local disk. (Base weights
from an s3:// file take the same `storage.local_copy`; the ResNet50V2 base's 94 MB take
~90 s through moto, so that test reads a local file.)"""

from __future__ import annotations

import numpy as np
import pytest
from artifacts import publish_exported

pytestmark = pytest.mark.e2e

SIZE = 32


def test_a_published_version_on_s3_scores_as_on_local_disk(bucket, tmp_path):
    from detector.io import storage
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, resolve
    from detector.model.predictor import Predictor

    model = build_model("vit_tiny", image_size=SIZE)
    card = ModelCard(name="vit_tiny", architecture="vit", image_size=SIZE,
                     preprocess_version=1)
    pixels = np.random.default_rng(0).integers(0, 256, (24, SIZE, SIZE, 3), dtype=np.uint8)
    local = publish_exported(model, card, str(tmp_path / "vit_tiny"), int8=True, pixels=pixels)
    storage.upload_dir(str(tmp_path / "vit_tiny"), f"s3://{bucket}/models/vit_tiny")
    name = f"s3://{bucket}/models/vit_tiny"
    assert resolve(name) == f"{name}/{card.id}"
    for backend, precision in (("keras", "float32"), ("openvino", "float32"),
                               ("openvino", "int8"), ("onnxruntime", "float32")):
        remote = Predictor.from_uri(name, backend=backend, precision=precision)
        assert remote.card.id == card.id
        np.testing.assert_array_equal(
            remote.score(pixels),
            Predictor.from_uri(local, backend=backend, precision=precision).score(pixels))
