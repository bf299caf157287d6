"""Bias correction: fold the mean output shift that weight quantization causes back into each layer's bias.

With quantized weights ``W_q`` a layer computes ``W_q x + b`` instead of ``W x + b``; on average that is off by
``(W_q − W)·E[x]`` per output channel (Nagel et al., 2019). ``E[x]`` is the mean input patch measured on the
calibration data through the quantized model (empirical correction: the inputs the deployed layer sees,
clipping and upstream rounding included); with patches, zero padding and strides are accounted for exactly.
The bias becomes ``b − (W_q − W)·E[x]``: a Conv or Gemm without one gets one, a MatMul's bias is the Add after
it (``MatMul -> Add(constant)``, as exporters write a Linear), or a new Add.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.graph import fresh_name
from qdq.optimize.layers import Layer


def mean_shift(layer: Layer, weight: np.ndarray, quantized: np.ndarray, mean_patch: np.ndarray) -> np.ndarray:
    """``(W_q − W)·E[patch]`` per output channel, ``[N]``."""
    delta = layer.matrix(quantized.astype(np.float64)) - layer.matrix(weight.astype(np.float64))
    return np.einsum("gnk,gk->gn", delta, mean_patch).reshape(-1)


def apply_correction(model: onnx.ModelProto, layer: Layer, shift: np.ndarray) -> str:
    """Subtract ``shift`` from the layer's bias in ``model`` (in place); returns where the bias lives now."""
    graph = model.graph
    node = next(n for n in graph.node if n.name == layer.node)
    if layer.op in ("Conv", "Gemm"):
        beta = 1.0
        if layer.op == "Gemm":
            beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) or 1.0
        bias = constant(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias.size not in (1, shift.size):
            return "unchanged (its bias is not per channel)"
        old = np.zeros(shift.size) if bias is None else np.broadcast_to(bias.reshape(-1), shift.shape)
        name = new_constant(model, f"{layer.node}_bias_corrected", (old - shift / beta).astype(np.float32))
        if len(node.input) > 2:
            node.input[2] = name
        else:
            node.input.append(name)
        return name
    add, slot = bias_add(model, node.output[0], shift.size)
    if add is not None:
        old = constant(model, add.input[slot]).reshape(-1)
        add.input[slot] = new_constant(model, f"{layer.node}_bias_corrected",
                                       (np.broadcast_to(old, shift.shape) - shift).astype(np.float32))
        return add.input[slot]
    product = fresh_name(f"{node.output[0]}_unbiased", taken_names(model))
    bias = new_constant(model, f"{layer.node}_bias_corrected", (-shift).astype(np.float32))
    add = onnx.helper.make_node("Add", [product, bias], [node.output[0]],
                                name=fresh_name(f"{layer.node}_bias_correction", taken_names(model)))
    node.output[0] = product
    index = list(graph.node).index(node)
    graph.node.insert(index + 1, add)
    return bias


def bias_add(model: onnx.ModelProto, tensor: str, channels: int) -> tuple[onnx.NodeProto | None, int]:
    """The Add that is ``tensor``'s only consumer and adds a per-channel constant to it, and that input's slot."""
    consumers = [n for n in model.graph.node if tensor in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "Add" or tensor in {o.name for o in model.graph.output}:
        return None, 0
    add = consumers[0]
    slot = 1 if add.input[0] == tensor else 0
    other = constant(model, add.input[slot])
    if other is None or other.dtype != np.float32 or other.size != channels or other.shape[-1:] != (channels,):
        return None, 0
    return add, slot


def constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def new_constant(model: onnx.ModelProto, base: str, values: np.ndarray) -> str:
    """A new initializer (never shared: a bias read by other nodes keeps its value for them)."""
    name = fresh_name(base, taken_names(model))
    model.graph.initializer.append(numpy_helper.from_array(values, name))
    return name


def taken_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return ({t for n in graph.node for t in (*n.input, *n.output)} | {n.name for n in graph.node}
            | {i.name for i in graph.initializer} | {i.name for i in graph.input})
