"""Model registry in the style of timm: `register_model` + `build_model(name, **overrides)`.

Each entry carries its own metadata (family, default input size), so callers derive the
preprocessing from the model instead of repeating it. Builders are named
("module:function") and imported when a model is built: reading a spec (a train job's
driver does, for the feature layer) never imports Keras and TensorFlow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: how to build it and what it expects."""

    name: str
    family: str
    image_size: int
    builder: str  # "module:function", the function taking image_size, name and defaults
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    pretrained: bool = False  # accepts `weights=` (imagenet | none | file)
    # The layer whose output the trainable head reads when everything before it is frozen
    # (ResNet50V2's pooled features): training may then cache that output once.
    feature_layer: str | None = None
    # Trains BatchNorm layers: under data-parallel training each worker normalises its own
    # share of the batch, so too small a share makes the statistics noise (see train.py).
    batch_norm: bool = False


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    builder: str,
    family: str,
    image_size: int,
    description: str = "",
    pretrained: bool = False,
    feature_layer: str | None = None,
    batch_norm: bool = False,
    **defaults: Any,
) -> ModelSpec:
    """Register `builder` ("module:function", returning a keras.Model) under `name`."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    spec = ModelSpec(name, family, image_size, builder, defaults, description, pretrained,
                     feature_layer, batch_norm)
    _REGISTRY[name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, image_size: int | None = None, **overrides: Any):
    """Build a fresh, uncompiled keras.Model: uint8-range RGB in, P(AI-generated) out
    (with `generators=G` >= 2, (N, 1 + G): the score, then P(generator | AI); see heads)."""
    spec = get_spec(name)
    kwargs = {**spec.defaults, **overrides}
    return builder_of(spec)(image_size=image_size or spec.image_size, name=name, **kwargs)


def builder_of(spec: ModelSpec) -> Callable[..., Any]:
    module, function = spec.builder.split(":")
    return getattr(importlib.import_module(module), function)


def import_builders() -> None:
    """Import every builder's module: what registers their custom Keras layers, which a
    saved model needs before it loads."""
    for spec in _REGISTRY.values():
        builder_of(spec)
