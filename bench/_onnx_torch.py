"""The exported `model.onnx` run by PyTorch, node by node, for `bench/gpu.py --torch`.

On a GPU machine whose onnxruntime has no CUDA provider but whose PyTorch has CUDA, this
measures the very graph the product exports (not a look-alike network) on the GPU. It
covers the operators tf2onnx emits for the registry's ResNet50V2 models and fails with the
operator's name on any other. Needs only numpy, onnx and torch.
"""

from __future__ import annotations

import math

import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper


def _ints(tensor) -> list[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _pads_last_dim_first(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] over the spatial dims -> F.pad's (left, right) pairs,
    last dimension first."""
    half = len(pads) // 2
    out = []
    for dim in reversed(range(half)):
        out += [pads[dim], pads[dim + half]]
    return out


def _conv(a, x, w, b=None):
    pads = list(a.get("pads", [0] * 2 * (w.dim() - 2)))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise NotImplementedError(f"Conv auto_pad {a['auto_pad']}")
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        x, pads = F.pad(x, _pads_last_dim_first(pads)), [0] * len(pads)
    return F.conv2d(x, w, b, stride=tuple(a.get("strides", [1, 1])), padding=tuple(pads[:half]),
                    dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1))


def _pool(a, x, kind):
    pads = list(a.get("pads", [0, 0, 0, 0]))
    fill = -math.inf if kind == "max" else 0.0
    if any(pads):
        x = F.pad(x, _pads_last_dim_first(pads), value=fill)
    kernel, strides = tuple(a["kernel_shape"]), tuple(a.get("strides", a["kernel_shape"]))
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    return pool(x, kernel, strides)


def _pad(a, x, pads, value=None, *_):
    fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
    pads = _ints(pads)
    if a.get("mode", b"constant") not in (b"constant", "constant"):
        raise NotImplementedError(f"Pad mode {a['mode']}")
    return F.pad(x, _pads_last_dim_first(pads)[: 2 * x.dim()], value=fill)


def _reshape(a, x, shape):
    target = _ints(shape)
    target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _axes(a, axes):
    return _ints(axes) if axes is not None else list(a.get("axes", []))


def _reduce_mean(a, x, axes=None):
    dims = _axes(a, axes) or list(range(x.dim()))
    return x.mean(dim=dims, keepdim=bool(a.get("keepdims", 1)))


def _squeeze(a, x, axes=None):
    dims = _axes(a, axes)
    for dim in sorted((d % x.dim() for d in dims), reverse=True):
        x = x.squeeze(dim)
    return x if dims else x.squeeze()


def _unsqueeze(a, x, axes=None):
    for dim in sorted(_axes(a, axes)):
        x = x.unsqueeze(dim)
    return x


def _gemm(a, x, w, c=None):
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y + a.get("beta", 1.0) * c if c is not None else y


OPS = {
    "Conv": _conv,
    "MaxPool": lambda a, x: _pool(a, x, "max"),
    "AveragePool": lambda a, x: _pool(a, x, "avg"),
    "GlobalAveragePool": lambda a, x: x.mean(dim=(2, 3), keepdim=True),
    "BatchNormalization": lambda a, x, s, b, m, v: F.batch_norm(
        x, m, v, s, b, False, 0.0, a.get("epsilon", 1e-5)),
    "Pad": _pad,
    "Transpose": lambda a, x: x.permute(*a["perm"]),
    "Reshape": _reshape,
    "Flatten": lambda a, x: x.flatten(a.get("axis", 1)),
    "ReduceMean": _reduce_mean,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "MatMul": lambda a, x, y: x @ y,
    "Gemm": _gemm,
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y,
    "Relu": lambda a, x: F.relu(x),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Identity": lambda a, x: x,
}


class OnnxGraph(torch.nn.Module):
    """An ONNX graph's nodes replayed with torch operations on `device`."""

    def __init__(self, model: onnx.ModelProto, device: str):
        super().__init__()
        unknown = sorted({n.op_type for n in model.graph.node} - set(OPS) - {"Constant"})
        if unknown:
            raise NotImplementedError(f"operators not covered: {', '.join(unknown)}")
        self.env: dict[str, torch.Tensor] = {}
        for tensor in model.graph.initializer:
            self.env[tensor.name] = torch.from_numpy(numpy_helper.to_array(tensor).copy()
                                                     ).to(device)
        self.nodes = []
        for node in model.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                self.env[node.output[0]] = torch.from_numpy(
                    numpy_helper.to_array(attrs["value"]).copy()).to(device)
                continue
            self.nodes.append((OPS[node.op_type], list(node.input), node.output[0], attrs))
        known = set(self.env)
        self.input = next(i.name for i in model.graph.input if i.name not in known)
        self.output = model.graph.output[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = dict(self.env)
        values[self.input] = x
        for op, inputs, output, attrs in self.nodes:
            values[output] = op(attrs, *[values[i] if i else None for i in inputs])
        return values[self.output]
