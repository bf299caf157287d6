"""OpenVINO as an independent consumer of qdq's Q/DQ graphs (test-only).

OpenVINO's CPU plugin reads explicit QuantizeLinear/DequantizeLinear, fuses them into its low-precision kernels
where its rules allow, and reports every executed layer's runtime precision. That is evidence, from an engine
qdq does not control, that a layer qdq planned as INT8 really runs in 8 bits: TensorRT cannot run on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import openvino as ov

EIGHT_BIT = ("u8", "i8")
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """One executed layer of OpenVINO's runtime model."""

    type: str
    precision: str
    sources: tuple[str, ...]  # the original (ONNX or OpenVINO-internal) layer names fused into it


def runtime_layers(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Layer]:
    """Compile ``model`` for OpenVINO's CPU plugin, run it once on ``feeds`` and list the executed layers."""
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model=model.SerializeToString(), weights=b""), "CPU",
                                  {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    compiled(feeds)  # run once: the runtime model then reflects what executed
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layers.append(Layer(info["layerType"].astype(str), info["runtimePrecision"].astype(str),
                            tuple(s for s in info["originalLayersNames"].astype(str).split(",") if s)))
    return layers


def node_precisions(layers: list[Layer], model: onnx.ModelProto, node_names: list[str]
                    ) -> dict[str, list[tuple[str, str]]]:
    """For each ONNX node: the (layer type, precision) of the executed, non-constant layers it was fused into.

    OpenVINO names what it derives from a node after it (``/conv/Conv/WithoutBiases``), and a node that writes a
    graph output after that output: a source matches a node by its name, ``name/...``, or an output's name.
    A node that no layer names was absorbed under another name (OpenVINO's attention subgraphs list the
    Transpose before Q·Kᵀ and the Mul after it, not the MatMul); it is inside the one executed layer that holds
    both a producer of one of its inputs and a consumer of its output (Q/DQ pairs seen through): fused layers
    are contiguous.
    """
    nodes = {n.name: n for n in model.graph.node}
    executed = [layer for layer in layers if layer.type != "Const"]
    found: dict[str, list[tuple[str, str]]] = {}
    for name in node_names:
        if name not in nodes:  # a name qdq's preparation gave: the float source has the node unnamed
            found[name] = []
            continue
        keys = {name, *nodes[name].output}
        found[name] = [(layer.type, layer.precision) for layer in executed
                       if any(s in keys or s.startswith(name + "/") for s in layer.sources)]
        if not found[name]:
            before, after = neighbours(model, nodes[name])
            found[name] = [(layer.type, layer.precision) for layer in executed
                           if before & set(layer.sources) and after & set(layer.sources)]
    return found


def neighbours(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[set[str], set[str]]:
    """Names of the nodes producing ``node``'s activation inputs and consuming its outputs, through Q/DQ."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    before: set[str] = set()
    for tensor in node.input:
        n = producer.get(tensor)
        while n is not None and n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n = producer.get(n.input[0])
        if n is not None:
            before.add(n.name)
    after: set[str] = set()
    frontier = [c for o in node.output for c in consumers.get(o, [])]
    while frontier:
        n = frontier.pop()
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            frontier.extend(c for o in n.output for c in consumers.get(o, []))
        else:
            after.add(n.name)
    return before, after


def weighted_layers_not_in_8bit(model: onnx.ModelProto, planned_int8: list[str], feeds: dict[str, np.ndarray]
                                ) -> dict[str, list[tuple[str, str]]]:
    """The planned-INT8 weighted ONNX nodes that OpenVINO did not run in u8/i8, with what it ran instead."""
    precisions = node_precisions(runtime_layers(model, feeds), model, planned_int8)
    return {name: ran for name, ran in precisions.items() if not any(p in EIGHT_BIT for _, p in ran)}
