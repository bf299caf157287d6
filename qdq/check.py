"""What TensorRT accepts in an explicitly quantized ONNX graph, checked without TensorRT.

Each finding names the node, the rule and what to do. Sources: TensorRT's "Explicit Quantization" guide and
the onnx-tensorrt parser's QuantizeLinear/DequantizeLinear importers (../shared/specs/placement.md, items 1-7).
Works on any model, whoever quantized it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from qdq.graph import GraphIndex, default_opset, named_subgraphs, undefined_inputs
from qdq.ops import QDQ_OPS, QUANTIZED_COMPUTE_OPS, WEIGHTED_OPS, output_channel_axis
from qdq.scheme import SCHEMES, Scheme

WEIGHT_SLOT = 1  # the weight input of every weighted op
# The schemes TensorRT runs, told apart by the zero point's type: INT8, and FP8 E4M3FN (Hopper and later).
SCHEME_OF_ZERO_POINT = {s.element_dtype: s for s in SCHEMES.values()}


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT would reject (``error``) or handle badly (``warning``)."""

    severity: str
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"


def check_model(model: onnx.ModelProto) -> list[Finding]:
    """All findings for ``model`` and the subgraphs in it (If branches, Loop and Scan bodies), errors first."""
    graph = GraphIndex(model)
    findings = [*check_opset(model, graph), *check_ops(model), *check_subgraphs(model)]
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            findings.extend(check_scale_and_zero_point(node, graph))
            findings.extend(check_axis(node, graph))
        if node.op_type == "QuantizeLinear":
            findings.extend(check_quantize_pairing(node, graph))
        if node.op_type == "DequantizeLinear":
            findings.extend(check_dequantize_source(node, graph))
        if node.op_type in WEIGHTED_OPS:
            findings.extend(check_partly_quantized(node, graph))
    return sorted(findings, key=lambda f: (f.severity != "error", f.rule, f.node))


def check_subgraphs(model: onnx.ModelProto) -> Iterator[Finding]:
    """Each subgraph checked as a model of its own, with the constants it reads from outside; its findings name
    the node as ``<If node>/<branch>/<node>``."""
    outside = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        for attribute, inner in named_subgraphs(node):
            graph = onnx.GraphProto()
            graph.CopyFrom(inner)
            graph.initializer.extend(outside[n] for n in undefined_inputs(inner) if n in outside)
            as_model = onnx.helper.make_model(graph, opset_imports=model.opset_import)
            for finding in check_model(as_model):
                yield Finding(finding.severity, finding.rule, f"{name_of(node)}/{attribute}/{finding.node}",
                              finding.message)


def check_opset(model: onnx.ModelProto, graph: GraphIndex) -> Iterator[Finding]:
    opset = default_opset(model)
    if opset < 13:
        yield Finding("error", "opset", "(model)", f"opset {opset}: per-channel Q/DQ (axis) needs opset 13 or later")
    for scheme in sorted({s.name: s for n in model.graph.node if (s := scheme_of(n, graph))}.values(),
                         key=lambda s: s.name):
        if opset < scheme.min_opset:
            yield Finding("error", "opset", "(model)", f"opset {opset}: {scheme.name} Q/DQ needs opset "
                          f"{scheme.min_opset} or later")


def scheme_of(node: onnx.NodeProto, graph: GraphIndex) -> Scheme | None:
    """The scheme of a Q/DQ node, from its zero point's type (None: not a Q/DQ, or no scheme TensorRT runs)."""
    if node.op_type not in QDQ_OPS or len(node.input) < 3 or not node.input[2]:
        return None
    zero = graph.value(node.input[2])
    return None if zero is None else SCHEME_OF_ZERO_POINT.get(zero.dtype)


def check_ops(model: onnx.ModelProto) -> Iterator[Finding]:
    for node in model.graph.node:
        if node.op_type in QUANTIZED_COMPUTE_OPS:
            yield Finding("error", "qlinear-op", name_of(node),
                          f"{node.op_type} is not supported by TensorRT: use QuantizeLinear/DequantizeLinear pairs")


def check_scale_and_zero_point(node: onnx.NodeProto, graph: GraphIndex) -> Iterator[Finding]:
    name = name_of(node)
    scale = graph.value(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        yield Finding("error", "scale-constant", name, f"scale {node.input[1] if len(node.input) > 1 else '?'} is "
                      "not a constant: TensorRT needs constant scales")
        return
    if scale.dtype not in (np.float32, np.float16) and str(scale.dtype) != "bfloat16":
        yield Finding("error", "scale-dtype", name, f"scale is {scale.dtype}; TensorRT takes float32 (or float16)")
    if scale.ndim > 1:
        yield Finding("error", "scale-shape", name, f"scale has shape {list(scale.shape)}: a scalar or 1-D is needed")
    values = scale.astype(np.float64).reshape(-1)
    bad = ~np.isfinite(values) | (values <= 0) | (values < np.finfo(np.float32).tiny)
    if bad.any():
        yield Finding("error", "scale-value", name, f"scale values must be positive, finite and normal; got "
                      f"{values[bad][:3].tolist()}")
    has_zero = len(node.input) > 2 and node.input[2]
    if not has_zero:
        if node.op_type == "QuantizeLinear":
            yield Finding("error", "zero-point", name, "no zero point: the output is uint8; TensorRT needs an int8 "
                          "zero point of 0")
        return
    zero = graph.value(node.input[2])
    if zero is None:
        yield Finding("error", "zero-point", name, f"zero point {node.input[2]} is not a constant")
        return
    if zero.dtype == np.uint8:
        yield Finding("warning", "zero-point", name, "uint8 zero point: TensorRT coerces it with a warning; use int8")
    elif zero.dtype not in SCHEME_OF_ZERO_POINT:
        yield Finding("error", "zero-point", name, f"zero point is {zero.dtype}: TensorRT takes int8, or "
                      "float8e4m3fn for FP8 (E5M2 and the FNUZ types are not TensorRT's)")
        return
    elif SCHEME_OF_ZERO_POINT[zero.dtype].is_float:
        yield from check_fp8_use(node, graph)
    if np.any(zero.astype(np.float64) != (128 if zero.dtype == np.uint8 else 0)):
        yield Finding("error", "zero-point", name, "non-zero zero point: TensorRT quantization is symmetric "
                      "(zero point 0)")
    if zero.shape != scale.shape:
        yield Finding("error", "zero-point", name, f"zero point shape {list(zero.shape)} differs from the scale's "
                      f"{list(scale.shape)}")


def check_fp8_use(node: onnx.NodeProto, graph: GraphIndex) -> Iterator[Finding]:
    """[TRT] FP8 Q/DQ pay off in convolutions and matrix multiplies; elsewhere TensorRT converts and gains nothing."""
    if node.op_type != "DequantizeLinear":
        return
    for reader in graph.consumers(node.output[0]):
        if reader.op_type not in WEIGHTED_OPS:
            yield Finding("warning", "fp8-op", name_of(node), f"FP8 data feeds {reader.op_type} {name_of(reader)}: "
                          "TensorRT runs FP8 in Conv, ConvTranspose, Gemm and MatMul only")


def check_axis(node: onnx.NodeProto, graph: GraphIndex) -> Iterator[Finding]:
    """Per-channel only on weights, along the output-channel axis, one scale per channel."""
    scale = graph.value(node.input[1]) if len(node.input) > 1 else None
    if scale is None or scale.size <= 1:
        return
    name = name_of(node)
    weight = graph.value(node.input[0])
    if weight is None and node.op_type == "DequantizeLinear":
        q = graph.producer(node.input[0])
        weight = graph.value(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    if weight is None and node.op_type == "QuantizeLinear":
        weight = graph.value(node.input[0])
    if weight is None:
        yield Finding("error", "per-channel", name, "per-channel scale on an activation: TensorRT takes per-channel "
                      "scales on constant weights only")
        return
    axis = attribute(node, "axis", 1)
    axis = axis + weight.ndim if axis < 0 else axis
    if not 0 <= axis < weight.ndim or weight.shape[axis] != scale.size:
        yield Finding("error", "per-channel", name, f"{scale.size} scales along axis {axis} of a weight shaped "
                      f"{list(weight.shape)}")
        return
    for consumer, slot in weight_uses(node, graph):
        expected = expected_axis(consumer, weight.ndim)
        if slot == WEIGHT_SLOT and consumer.op_type in WEIGHTED_OPS and expected is not None and axis != expected:
            yield Finding("error", "per-channel", name, f"axis {axis}, but {consumer.op_type} "
                          f"{name_of(consumer)} needs its output channels, axis {expected}")


def weight_uses(node: onnx.NodeProto, graph: GraphIndex) -> Iterator[tuple[onnx.NodeProto, int]]:
    outputs = node.output
    if node.op_type == "QuantizeLinear":
        outputs = [o for dq in graph.consumers(node.output[0]) for o in dq.output]
    for out in outputs:
        for consumer in graph.consumers(out):
            for slot, name in enumerate(consumer.input):
                if name == out:
                    yield consumer, slot


def expected_axis(node: onnx.NodeProto, rank: int) -> int | None:
    return output_channel_axis(node.op_type, rank, trans_b=bool(attribute(node, "transB", 0)),
                               group=attribute(node, "group", 1))


def check_quantize_pairing(node: onnx.NodeProto, graph: GraphIndex) -> Iterator[Finding]:
    name = name_of(node)
    readers = graph.consumers(node.output[0])
    if not readers and node.output[0] not in graph.graph_outputs:
        yield Finding("error", "dangling", name, "QuantizeLinear output is not used")
    for reader in readers:
        if reader.op_type != "DequantizeLinear":
            yield Finding("error", "unpaired", name, f"QuantizeLinear feeds {reader.op_type} {name_of(reader)} "
                          "directly: every Q needs its DequantizeLinear")
    if node.output[0] in graph.graph_outputs:
        yield Finding("warning", "graph-output", name, "an int8 graph output: keep graph outputs float")
    source = graph.producer(node.input[0])
    if source is not None and source.op_type == "DequantizeLinear":
        yield Finding("warning", "back-to-back", name, f"follows DequantizeLinear {name_of(source)}: two Q/DQ pairs "
                      "back to back requantize for nothing")


def check_dequantize_source(node: onnx.NodeProto, graph: GraphIndex) -> Iterator[Finding]:
    name = name_of(node)
    source = node.input[0]
    elem = graph.elem_type(source)
    if elem == onnx.TensorProto.INT32:
        yield Finding("error", "int32-bias", name, "DequantizeLinear of an int32 tensor (a quantized bias): "
                      "TensorRT cannot parse it; keep biases float")
        return
    producer = graph.producer(source)
    if not graph.is_constant(source) and (producer is None or producer.op_type != "QuantizeLinear"):
        yield Finding("error", "unpaired", name, "DequantizeLinear reads neither a QuantizeLinear nor a constant")
    if not graph.consumers(node.output[0]) and node.output[0] not in graph.graph_outputs:
        yield Finding("error", "dangling", name, "DequantizeLinear output is not used")


def check_partly_quantized(node: onnx.NodeProto, graph: GraphIndex) -> Iterator[Finding]:
    """A weighted layer with Q/DQ on some inputs only runs in float: the Q/DQ cost time for nothing."""
    made_by = [graph.producer(name) for name in node.input[:2]]
    dequantized = [p is not None and p.op_type == "DequantizeLinear" for p in made_by]
    if any(dequantized) and not all(dequantized):
        missing = node.input[dequantized.index(False)]
        yield Finding("warning", "partly-quantized", name_of(node), f"input {missing} has no Q/DQ: TensorRT runs "
                      f"this {node.op_type} in float")


def attribute(node: onnx.NodeProto, key: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == key), default)


def name_of(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"
