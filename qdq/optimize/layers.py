"""The weighted layers the weight techniques work on, seen as matrices: ``y[g] = W[g] @ patch[g]`` per group.

A Conv's weight ``[Cout, Cin/g, kh, kw]`` is ``g`` matrices ``[Cout/g, Cin/g*kh*kw]`` applied to the input's
patches (im2col, zero padding included); a Gemm's or MatMul's weight is one ``[N, K]`` matrix applied to the
rows of its input. In that form a layer's mean output error is ``ΔW @ E[patch]`` exactly, and its squared
output error is ``Σ_n Δw_n^T (Σ patch patch^T) Δw_n``: what bias correction and learned rounding need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.placement.plan import QuantPlan
from qdq.scheme import symmetric_scale, weight_amax


@dataclass(frozen=True)
class Layer:
    """A quantized Conv/Gemm/MatMul with a constant weight at input 1, and its geometry."""

    node: str
    op: str
    weight: str
    axis: int | None
    features: int  # K per group: the length of one input patch
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    trans_b: bool = False

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as ``[groups, N/groups, K/groups]`` (output channels by input features)."""
        if self.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        return (w if self.trans_b else w.T)[None]

    def unmatrix(self, m: np.ndarray, like: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`matrix`, in ``like``'s layout and dtype."""
        if self.op == "Conv":
            return m.reshape(like.shape).astype(like.dtype)
        return (m[0] if self.trans_b else m[0].T).astype(like.dtype)

    def channel_scales(self, w: np.ndarray) -> np.ndarray:
        """The weight quantization scale of each row of :meth:`matrix`, ``[groups, N/groups]``."""
        scale = symmetric_scale(weight_amax(w, self.axis)).astype(np.float64)
        rows = self.matrix(w).shape[:2]
        return np.broadcast_to(scale.reshape(-1) if self.axis is not None else scale, (rows[0] * rows[1],)
                               ).reshape(rows).copy()

    def patches(self, x: np.ndarray, rows: int | None = None, rng: np.random.Generator | None = None
                ) -> np.ndarray:
        """The input as rows the weight matrix multiplies: ``[groups, rows, K/groups]``, float64.

        ``rows``: at most this many (output positions drawn with ``rng``), so big feature maps stay cheap.
        """
        if self.op != "Conv":
            flat = x.reshape(-1, x.shape[-1])
            if rows is not None and len(flat) > rows:
                flat = flat[np.sort(rng.choice(len(flat), rows, replace=False))]
            return flat.astype(np.float64)[None]
        x = self.padded(x)
        batch, channels = x.shape[:2]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel2d(), self.pairs(self.strides), self.pairs(self.dilations)
        out_h, out_w = self.output_size(x.shape)
        count = batch * out_h * out_w
        chosen = np.arange(count) if rows is None or count <= rows else np.sort(rng.choice(count, rows, replace=False))
        b, rest = np.divmod(chosen, out_h * out_w)
        oh, ow = np.divmod(rest, out_w)
        cols = np.empty((len(chosen), channels, kh * kw))
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i * kw + j] = x[b, :, oh * sh + i * dh, ow * sw + j * dw]
        return cols.reshape(len(chosen), self.groups, -1).transpose(1, 0, 2)

    def patch_sum(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """The sum of all input patches ``[groups, K/groups]`` and their count, without forming the patches."""
        if self.op != "Conv":
            flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
            return flat.sum(axis=0)[None], len(flat)
        x = self.padded(x)
        batch, channels = x.shape[:2]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel2d(), self.pairs(self.strides), self.pairs(self.dilations)
        out_h, out_w = self.output_size(x.shape)
        sums = np.empty((channels, kh * kw))
        for i in range(kh):
            for j in range(kw):
                window = x[:, :, i * dh:i * dh + sh * (out_h - 1) + 1:sh, j * dw:j * dw + sw * (out_w - 1) + 1:sw]
                sums[:, i * kw + j] = window.sum(axis=(0, 2, 3), dtype=np.float64)
        return sums.reshape(self.groups, -1), batch * out_h * out_w

    def padded(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:  # Conv1d as a Conv2d of height 1
            x = x[:, :, None, :]
        top, left, bottom, right = self.pads2d()
        return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))

    def output_size(self, padded_shape: tuple[int, ...]) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel2d(), self.pairs(self.strides), self.pairs(self.dilations)
        return ((padded_shape[2] - dh * (kh - 1) - 1) // sh + 1, (padded_shape[3] - dw * (kw - 1) - 1) // sw + 1)

    def kernel2d(self) -> tuple[int, int]:
        return (1, self.kernel[0]) if len(self.kernel) == 1 else (self.kernel[0], self.kernel[1])

    def pairs(self, values: tuple[int, ...]) -> tuple[int, int]:
        return (1, values[0]) if len(values) == 1 else (values[0], values[1])

    def pads2d(self) -> tuple[int, int, int, int]:
        if len(self.kernel) == 1:
            return 0, self.pads[0], 0, self.pads[1]
        return self.pads[0], self.pads[1], self.pads[2], self.pads[3]


def find_layers(model: onnx.ModelProto, plan: QuantPlan) -> tuple[list[Layer], list[str]]:
    """The plan's quantized layers the weight techniques can handle, and why the others were left alone."""
    nodes = {n.name: n for n in model.graph.node}
    weights = {i.name: i for i in model.graph.initializer}
    layers, skipped = [], []
    for decision in plan.quantized_nodes():
        weight = [q for q in decision.inputs if q.kind == "weight"]
        if decision.op not in ("Conv", "Gemm", "MatMul") or not weight:
            continue
        node = nodes[decision.node]
        layer, why = make_layer(node, weight[0].tensor, weight[0].index, weight[0].axis, weights)
        if layer is None:
            skipped.append(f"{node.name} ({why})")
        else:
            layers.append(layer)
    return layers, skipped


def make_layer(node: onnx.NodeProto, weight: str, index: int, axis: int | None,
               weights: dict[str, onnx.TensorProto]) -> tuple[Layer | None, str]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if index != 1 or weight not in weights:
        return None, "the weight is not the second input"
    dims = tuple(weights[weight].dims)
    if node.op_type == "Conv":
        if len(dims) not in (3, 4) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None, "only 1-D/2-D convolutions with explicit pads"
        if axis not in (0, None):
            return None, f"weight quantized along axis {axis}"
        spatial = len(dims) - 2
        return Layer(node.name, "Conv", weight, axis, int(np.prod(dims[1:])), int(attrs.get("group", 1)), dims[2:],
                     tuple(attrs.get("strides", [1] * spatial)), tuple(attrs.get("pads", [0] * 2 * spatial)),
                     tuple(attrs.get("dilations", [1] * spatial))), ""
    if len(dims) != 2:
        return None, "the weight is not a matrix"
    trans_b = bool(attrs.get("transB", 0)) if node.op_type == "Gemm" else False
    if node.op_type == "Gemm" and (attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0):
        return None, "Gemm with transA or alpha"
    if axis not in (None, 0 if trans_b else 1):
        return None, f"weight quantized along axis {axis}, not its output channels"
    return Layer(node.name, node.op_type, weight, axis, dims[1] if trans_b else dims[0], trans_b=trans_b), ""


def initializer_values(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in names}


def replace_initializer(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    """Overwrite an initializer's values in place (same name, same dtype): the plan's names stay valid."""
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(values.astype(numpy_helper.to_array(init).dtype), name))
            return
    raise KeyError(name)
