"""Architectures. Importing this package imports Keras and registers every model."""

from detector.model.architectures import resnet50v2, vit  # noqa: F401  (registers the models)
from detector.model.architectures.registry import ModelSpec, build_model, get_spec, list_models

__all__ = ["ModelSpec", "build_model", "get_spec", "list_models"]
