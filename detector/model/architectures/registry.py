"""Model registry in the style of timm: `@register_model` + `build_model(name, **overrides)`.

Each entry carries its own metadata (family, default input size), so callers derive the
preprocessing from the model instead of repeating it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: how to build it and what it expects."""

    name: str
    family: str
    image_size: int
    builder: Callable[..., Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    pretrained: bool = False  # accepts `weights=` (imagenet | none | file)
    # The layer whose output the trainable head reads when everything before it is frozen
    # (ResNet50V2's pooled features): training may then cache that output once.
    feature_layer: str | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    family: str,
    image_size: int,
    description: str = "",
    pretrained: bool = False,
    feature_layer: str | None = None,
    **defaults: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `builder(image_size=..., **kwargs) -> keras.Model` under `name`."""

    def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(
            name, family, image_size, builder, defaults, description, pretrained, feature_layer
        )
        return builder

    return decorate


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, image_size: int | None = None, **overrides: Any):
    """Build a fresh, uncompiled keras.Model: uint8-range RGB in, P(AI-generated) out."""
    spec = get_spec(name)
    kwargs = {**spec.defaults, **overrides}
    return spec.builder(image_size=image_size or spec.image_size, name=name, **kwargs)
