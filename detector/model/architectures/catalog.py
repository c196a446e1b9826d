"""Every registered architecture: names, metadata and where each builder lives.

Plain data, no Keras: the builders are imported when a model is built.
"""

from __future__ import annotations

from detector.model.architectures.registry import register_model

FEATURE_LAYER = "gap"  # resnet50v2's pooled base features: what its head reads
_RESNET = "detector.model.architectures.resnet50v2:build_transfer_model"
_VIT = "detector.model.architectures.vit:build_vit"

register_model(
    "resnet50v2",
    builder=_RESNET,
    batch_norm=True,  # its head's, and the whole base's when it trains
    family="resnet50v2",
    image_size=224,
    description="ResNet50V2 (ImageNet, frozen) + the notebook's dense head",
    pretrained=True,
    feature_layer=FEATURE_LAYER,
)

register_model(
    "resnet50v2_tiny",
    builder=_RESNET,
    batch_norm=True,  # its head's, and the whole base's when it trains
    family="resnet50v2",
    image_size=64,
    description="test-sized ResNetV2: 3 two-block stages at 1/4 width, trained end to end",
    stacks="tiny",
    freeze_base=False,
    head_units=(64, 32),
    bn_momentum=0.9,
)

register_model(
    "resnet50v2_tiny_frozen",
    builder=_RESNET,
    batch_norm=True,  # its head's, and the whole base's when it trains
    family="resnet50v2",
    image_size=64,
    description="test-sized frozen-base ResNetV2 (the tiny stacks, seeded random weights) "
    "+ head: the feature-cache path of resnet50v2 at test size",
    pretrained=True,
    feature_layer=FEATURE_LAYER,
    stacks="tiny",
    head_units=(64, 32),
    bn_momentum=0.9,
)

register_model(
    "vit", builder=_VIT, family="vit", image_size=224,
    description="the notebook's ViT-S/16, from scratch",
)

register_model(
    "vit_tiny",
    builder=_VIT,
    family="vit",
    image_size=64,
    description="test-sized ViT: 4px patches, dim 64, 2 blocks",
    patch_size=4,
    dim=64,
    depth=2,
    heads=2,
    mlp_dim=128,
    head_units=64,
)
