"""Where the model looked: Grad-CAM for the ResNet family, attention rollout for the ViT.

Heatmaps are computed on request from the very pixels that were scored (the one
preprocessing path, the model's centre square), with the Keras model of the same artifact
version; they never change a score. `overlay_png` draws one over the whole input, at its
own aspect ratio, with the scored square marked.

- Grad-CAM (Selvaraju et al. 2017): the last convolutional block's maps, weighted by the
  spatial mean of the gradient of the logit of P(AI-generated), summed and rectified.
- Attention rollout (Abnar & Zuidema 2020): each block's head-averaged attention plus the
  residual identity, row-normalised and multiplied through the blocks; the class token's
  row over the patches.
"""

from __future__ import annotations

import io
import math

import numpy as np

from detector.io import preprocess
from detector.model.artifact import load_artifact, load_card

HEAT_ALPHA = 0.45  # how much of the colour map shows over the image
MAX_OVERLAY_SIDE = 512


class Explainer:
    """Heatmaps for one Keras model (`from_uri`: the artifact's, same version as scored)."""

    def __init__(self, model, family: str):
        import keras

        self.model = model
        self.family = family
        self.method = "attention-rollout" if family == "vit" else "grad-cam"
        self._compiled = None
        layers = [each for each in model.layers if not isinstance(each, keras.layers.InputLayer)]
        if self.method == "grad-cam":
            bases = [i for i, each in enumerate(layers) if isinstance(each, keras.Model)]
            if not bases:
                raise ValueError(f"{model.name}: no convolutional base to explain")
            self._layers, self._base = layers, bases[-1]
        else:
            names = [each.name for each in model.layers]
            blocks = sorted({n.split("_")[0] for n in names if n.endswith("_attn")},
                            key=lambda n: int(n.removeprefix("block")))
            self._attention = [model.get_layer(f"{b}_attn") for b in blocks]
            self._inputs = keras.Model(model.input,
                                   [model.get_layer(f"{b}_ln1").output for b in blocks])

    @classmethod
    def from_uri(cls, uri: str) -> Explainer:

        card = load_card(uri)
        if card.architecture == "ensemble":  # explain the member that weighs most
            top = max(card.config["members"], key=lambda member: member["weight"])
            return cls.from_uri(top["uri"])
        model, card = load_artifact(uri)
        return cls(model, card.architecture)

    def heatmaps(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, h, w) in [0, 1] (h, w: the model's grid)."""
        import tensorflow as tf

        if self._compiled is None:  # one graph (forward and backward), as scoring has
            size = int(self.model.input.shape[1])
            graph = self._grad_cam_graph if self.method == "grad-cam" else self._rollout_graph
            self._compiled = tf.function(
                graph, reduce_retracing=True,
                input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
        maps = self._compiled(tf.convert_to_tensor(pixels, tf.float32)).numpy()
        if self.method == "attention-rollout":  # the patch sequence back onto its grid
            side = math.isqrt(maps.shape[-1])
            maps = maps.reshape(-1, side, side)
        return _normalise(maps)

    def _grad_cam_graph(self, x):
        import tensorflow as tf

        for layer in self._layers[: self._base]:
            x = layer(x, training=False)
        maps = self._layers[self._base](x, training=False)
        with tf.GradientTape() as tape:
            tape.watch(maps)
            y = maps
            for layer in self._layers[self._base + 1 : -1]:
                y = layer(y, training=False)
            # The score's Dense(1, sigmoid), alone or inside the heads: explain its logit,
            # which never saturates as P does.
            last = getattr(self._layers[-1], "score", self._layers[-1])
            logit = tf.matmul(y, last.kernel) + last.bias
        grads = tape.gradient(logit, maps)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))

    def _rollout_graph(self, x):
        import tensorflow as tf

        states = self._inputs(x, training=False)
        states = states if isinstance(states, list | tuple) else [states]
        rollout = None
        for attention, state in zip(self._attention, states, strict=True):
            query = attention._query_dense(state)  # (N, T, heads, key_dim)
            key = attention._key_dense(state)
            logits = tf.einsum("nthd,nshd->nhts", query, key) / math.sqrt(query.shape[-1])
            weights = tf.reduce_mean(tf.nn.softmax(logits, axis=-1), axis=1)
            weights = 0.5 * weights + 0.5 * tf.eye(weights.shape[-1])  # the residual path
            weights /= tf.reduce_sum(weights, axis=-1, keepdims=True)
            rollout = weights if rollout is None else tf.matmul(weights, rollout)
        return rollout[:, 0, 1:]  # the class token's attention over the patches


def _normalise(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, np.float32)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0).astype(np.float32)


def overlay_png(blob: bytes, heat: np.ndarray) -> bytes:
    """The input image (shrunk to at most MAX_OVERLAY_SIDE, its own aspect ratio) with
    `heat` coloured over the centre square the model scored; the rest is dimmed."""
    from matplotlib import colormaps
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(blob)) as source:
        source.draft("RGB", (MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE))
        image = ImageOps.exif_transpose(source.convert("RGB"))
    image.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE))
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    heat_image = Image.fromarray(np.uint8(np.clip(heat, 0, 1) * 255), "L").resize(
        (side, side), Image.Resampling.BILINEAR)
    coloured = colormaps["inferno"](np.asarray(heat_image) / 255.0)[..., :3]
    canvas = np.asarray(image, np.float32) * 0.45  # dim what the model did not see
    square = np.asarray(image, np.float32)[top:top + side, left:left + side]
    canvas[top:top + side, left:left + side] = \
        (1 - HEAT_ALPHA) * square + HEAT_ALPHA * 255 * coloured
    out = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(canvas, 0, 255))).save(out, format="PNG")
    return out.getvalue()


def explain_files(model_uri: str, blobs: list[bytes], names: list[str], out_dir: str
                  ) -> dict[int, str]:
    """Overlays for every decodable blob, written as `out_dir/<name>.explain.png` (a
    local directory); {index: path}. Undecodable ones are skipped (predict reports them)."""
    import os


    explainer = Explainer.from_uri(model_uri)
    size = int(explainer.model.input.shape[1])
    os.makedirs(out_dir, exist_ok=True)
    written: dict[int, str] = {}
    taken: set[str] = set()
    for index, (blob, name) in enumerate(zip(blobs, names, strict=True)):
        try:
            pixels, _ = preprocess.load_image(blob, size)
        except preprocess.ImageError:
            continue
        stem = os.path.splitext(os.path.basename(name.rstrip("/")))[0] or "image"
        file = f"{stem}.explain.png" if stem not in taken else f"{stem}-{index}.explain.png"
        taken.add(stem)
        path = os.path.join(out_dir, file)
        with open(path, "wb") as handle:
            handle.write(overlay_png(blob, explainer.heatmaps(pixels[None])[0]))
        written[index] = path
    return written
