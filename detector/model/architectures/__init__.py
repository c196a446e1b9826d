"""Architectures. Importing this package registers every model without importing Keras;
building one imports its builder (and Keras)."""

from detector.model.architectures import catalog  # noqa: F401  (registers the models)
from detector.model.architectures.registry import (
    ModelSpec,
    build_model,
    get_spec,
    import_builders,
    list_models,
)

__all__ = ["ModelSpec", "build_model", "get_spec", "import_builders", "list_models"]
