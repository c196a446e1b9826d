"""ResNet50V2 transfer learning, as in the notebook: frozen base + a small dense head.

Inputs are RGB pixels in 0..255 (what `detector.io.preprocess` produces); scaling to
[-1, 1], ResNetV2's convention, happens inside the model so no caller can forget it.
"""

from __future__ import annotations

import keras
from keras import layers
from keras.src.applications import resnet  # the stack builders behind keras.applications

from detector.io import storage
from detector.model.architectures.catalog import FEATURE_LAYER
from detector.model.architectures.heads import output_head


def _resnet50v2_stacks(x):
    x = resnet.stack_residual_blocks_v2(x, 64, 3, name="conv2")
    x = resnet.stack_residual_blocks_v2(x, 128, 4, name="conv3")
    x = resnet.stack_residual_blocks_v2(x, 256, 6, name="conv4")
    return resnet.stack_residual_blocks_v2(x, 512, 3, stride1=1, name="conv5")


def _tiny_stacks(x):
    # Same pre-activation bottleneck blocks: three stages of two (Keras' stack builder
    # needs >= 2 blocks per stage) at 1/4 of the width.
    x = resnet.stack_residual_blocks_v2(x, 16, 2, name="conv2")
    x = resnet.stack_residual_blocks_v2(x, 32, 2, name="conv3")
    return resnet.stack_residual_blocks_v2(x, 64, 2, stride1=1, name="conv4")


STACKS = {"resnet50v2": _resnet50v2_stacks, "tiny": _tiny_stacks}


def build_base(image_size: int, weights: str = "none", stacks: str = "resnet50v2"):
    """The convolutional base without its classifier.

    weights: ``imagenet`` (Keras downloads it), ``none``, or a local/s3:// path to a
    Keras weights file such as ``resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5``
    (how clusters without internet access get ImageNet weights).
    """
    keras_weights = "imagenet" if weights == "imagenet" else None
    if keras_weights and stacks != "resnet50v2":
        raise ValueError("ImageNet weights exist only for the full resnet50v2 stacks")
    base = resnet.ResNet(
        STACKS[stacks],
        True,  # preact: ResNetV2
        True,  # use_bias
        name=f"{stacks}_base",
        weights_name="resnet50v2" if keras_weights else None,
        include_top=False,
        weights=keras_weights,
        input_shape=(image_size, image_size, 3),
    )
    if weights not in ("imagenet", "none", "", None):
        with storage.local_copy(weights) as path:
            base.load_weights(path)
    return base


def build_transfer_model(
    image_size: int,
    name: str,
    weights: str = "none",
    stacks: str = "resnet50v2",
    freeze_base: bool = True,
    head_units: tuple[int, ...] = (256, 128),
    head_dropout: tuple[float, ...] = (0.5, 0.3),
    bn_momentum: float | None = None,
    generators: int = 0,
):
    """Base (frozen by default) -> GAP -> [Dense relu -> BN -> Dropout] x2 -> Dense1 sigmoid
    (or, with `generators`, the score and attribution heads: see heads.py).

    `bn_momentum` overrides every BatchNorm's (Keras: 0.99), for short runs on small data
    where 0.99 leaves inference-mode statistics far from the batches' after a few hundred
    steps and held-out predictions collapse to one class.
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
    base = build_base(image_size, weights=weights, stacks=stacks)
    base.trainable = not freeze_base
    # training=False keeps the frozen base's BatchNorm statistics fixed while the head trains.
    x = base(x, training=False if freeze_base else None)
    x = layers.GlobalAveragePooling2D(name=FEATURE_LAYER)(x)
    for i, (units, rate) in enumerate(zip(head_units, head_dropout, strict=True)):
        x = layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
        x = layers.BatchNormalization(name=f"head_bn{i}")(x)
        x = layers.Dropout(rate, name=f"head_dropout{i}")(x)
    outputs = output_head(x, generators)
    model = keras.Model(inputs, outputs, name=name)
    if bn_momentum is not None:
        for layer in _all_layers(model):
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = bn_momentum
    return model


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)

