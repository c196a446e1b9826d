"""The notebook's Vision Transformer, trained from scratch.

16x16 patches -> 384-d tokens, a learned CLS token and learned positions, 6 pre-norm
encoder blocks (6 heads, MLP 1536), then Dense512 gelu -> Dropout .3 -> Dense1 sigmoid
(or the score and attribution heads).
The custom layers are registered so `model.keras` loads with safe_mode=True.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from detector.model.architectures.heads import output_head


@keras.saving.register_keras_serializable(package="detector")
class ClassToken(layers.Layer):
    """Prepends one learned token to the patch sequence; its final state classifies."""

    def build(self, input_shape):
        self.token = self.add_weight(
            shape=(1, 1, input_shape[-1]), initializer="zeros", name="token"
        )

    def call(self, patches):
        batch = ops.shape(patches)[0]
        token = ops.broadcast_to(ops.cast(self.token, patches.dtype), (batch, 1, patches.shape[-1]))
        return ops.concatenate([token, patches], axis=1)


@keras.saving.register_keras_serializable(package="detector")
class PositionEmbedding(layers.Layer):
    """Adds a learned embedding per sequence position."""

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=(1, input_shape[1], input_shape[2]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="positions",
        )

    def call(self, tokens):
        return tokens + ops.cast(self.positions, tokens.dtype)


@keras.saving.register_keras_serializable(package="detector")
class TakeClassToken(layers.Layer):
    """Selects the CLS token's state (sequence position 0)."""

    def call(self, tokens):
        return tokens[:, 0, :]


def _encoder_block(x, dim: int, heads: int, mlp_dim: int, dropout: float, name: str):
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    y = layers.MultiHeadAttention(heads, dim // heads, dropout=dropout, name=f"{name}_attn")(y, y)
    x = layers.Add(name=f"{name}_res1")([x, y])
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    y = layers.Dense(mlp_dim, activation="gelu", name=f"{name}_mlp1")(y)
    y = layers.Dropout(dropout, name=f"{name}_drop1")(y)
    y = layers.Dense(dim, name=f"{name}_mlp2")(y)
    y = layers.Dropout(dropout, name=f"{name}_drop2")(y)
    return layers.Add(name=f"{name}_res2")([x, y])


def build_vit(
    image_size: int,
    name: str,
    patch_size: int = 16,
    dim: int = 384,
    depth: int = 6,
    heads: int = 6,
    mlp_dim: int = 1536,
    head_units: int = 512,
    dropout: float = 0.1,
    head_dropout: float = 0.3,
    generators: int = 0,
):
    """Build the ViT classifier for `image_size` (must be a multiple of `patch_size`)."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="to_unit_range")(inputs)
    # A strided convolution is the standard, fast way to cut and embed patches in one op.
    x = layers.Conv2D(dim, patch_size, strides=patch_size, name="patch_embed")(x)
    x = layers.Reshape(((image_size // patch_size) ** 2, dim), name="patch_tokens")(x)
    x = ClassToken(name="cls_token")(x)
    x = PositionEmbedding(name="pos_embed")(x)
    x = layers.Dropout(dropout, name="embed_dropout")(x)
    for i in range(depth):
        x = _encoder_block(x, dim, heads, mlp_dim, dropout, name=f"block{i}")
    x = layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = TakeClassToken(name="cls_state")(x)
    x = layers.Dense(head_units, activation="gelu", name="head_dense")(x)
    x = layers.Dropout(head_dropout, name="head_dropout")(x)
    outputs = output_head(x, generators)
    return keras.Model(inputs, outputs, name=name)

