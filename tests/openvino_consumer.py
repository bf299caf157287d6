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


def node_precisions(layers: list[Layer], node_names: list[str]) -> dict[str, list[tuple[str, str]]]:
    """For each ONNX node: the (layer type, precision) of the executed, non-constant layers it was fused into.

    OpenVINO names what it derives from a node after it (``/conv/Conv/WithoutBiases``), so a source matches a
    node by its exact name or as a ``name/...`` prefix.
    """
    found: dict[str, list[tuple[str, str]]] = {name: [] for name in node_names}
    for layer in layers:
        if layer.type == "Const":
            continue
        for name in node_names:
            if any(s == name or s.startswith(name + "/") for s in layer.sources):
                found[name].append((layer.type, layer.precision))
    return found


def weighted_layers_not_in_8bit(model: onnx.ModelProto, planned_int8: list[str], feeds: dict[str, np.ndarray]
                                ) -> dict[str, list[tuple[str, str]]]:
    """The planned-INT8 weighted ONNX nodes that OpenVINO did not run in u8/i8, with what it ran instead."""
    precisions = node_precisions(runtime_layers(model, feeds), planned_int8)
    return {name: ran for name, ran in precisions.items() if not any(p in EIGHT_BIT for _, p in ran)}
