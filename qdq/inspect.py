"""What a quantized model holds: its Q/DQ pairs, the ops that take int8 inputs, scales, and what stayed float.

Works on models from any tool; a model from qdq also says why each weighted layer stayed float (its metadata).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.check import attribute
from qdq.graph import GraphIndex, named_subgraphs
from qdq.ops import QDQ_OPS, WEIGHTED_OPS

REASONS_KEY = "qdq.float_reasons"


@dataclass(frozen=True)
class Pair:
    """One DequantizeLinear (with its QuantizeLinear when there is one): what it quantizes and how."""

    tensor: str
    kind: str  # "activation" or "weight"
    granularity: str  # "per tensor" or "per channel (axis N, C channels)"
    scale_min: float
    scale_max: float
    zero_point: str  # dtype of the zero point, or "none"
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Inspection:
    pairs: tuple[Pair, ...]
    int8_nodes: tuple[tuple[str, str, int, int], ...]  # (node, op, inputs dequantized, inputs)
    float_layers: tuple[tuple[str, str, str], ...]  # (node, op, reason)
    metadata: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        activations = [p for p in self.pairs if p.kind == "activation"]
        weights = [p for p in self.pairs if p.kind == "weight"]
        lines = [f"{len(activations)} activation Q/DQ pairs, {len(weights)} weight DequantizeLinear "
                 f"({sum(p.granularity.startswith('per channel') for p in weights)} per channel); "
                 f"{len(self.int8_nodes)} nodes read int8 data, {len(self.float_layers)} weighted layers are float"]
        if "qdq.version" in self.metadata:
            lines.append(f"made by qdq {self.metadata['qdq.version']} with {self.metadata.get('qdq.options', '{}')}")
        lines.append("scales:")
        for p in self.pairs:
            scale = f"{p.scale_min:.6g}" if p.scale_min == p.scale_max else f"{p.scale_min:.6g}..{p.scale_max:.6g}"
            lines.append(f"  {p.kind:<10} {p.tensor:<40} {p.granularity:<30} scale {scale:<22} zp {p.zero_point}")
        if self.float_layers:
            lines.append("float layers:")
            lines.extend(f"  {node} ({op}): {reason}" for node, op, reason in self.float_layers)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"pairs": [vars(p) for p in self.pairs],
                "int8_nodes": [dict(zip(("node", "op", "dequantized_inputs", "inputs"), n, strict=True))
                               for n in self.int8_nodes],
                "float_layers": [dict(zip(("node", "op", "reason"), f, strict=True)) for f in self.float_layers],
                "metadata": self.metadata}


def inspect_model(model: onnx.ModelProto) -> Inspection:
    """The model's Q/DQ, int8 readers and float layers, in If branches and Loop/Scan bodies too (named by path)."""
    metadata = {p.key: p.value for p in model.metadata_props}
    reasons = json.loads(metadata.get(REASONS_KEY, "{}"))
    pairs, int8_nodes, float_layers = [], [], []
    for where, graph, constants in graphs_in(model.graph, {}):
        index = GraphIndex(model if graph is model.graph else onnx.helper.make_model(graph))
        dequantized = set()
        for dq in (n for n in graph.node if n.op_type == "DequantizeLinear"):
            dequantized.add(dq.output[0])
            source = index.producer(dq.input[0])
            quantize = source if source is not None and source.op_type == "QuantizeLinear" else None
            tensor = quantize.input[0] if quantize is not None else dq.input[0]
            kind = "weight" if tensor in constants else "activation"
            scale = (numpy_helper.to_array(constants[dq.input[1]]) if dq.input[1] in constants
                     else np.array([np.nan]))
            zero = constants.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
            granularity = "per tensor" if scale.size <= 1 else (f"per channel (axis {attribute(dq, 'axis', 1)}, "
                                                                f"{scale.size} channels)")
            zp = onnx.helper.tensor_dtype_to_np_dtype(zero.data_type).name if zero is not None else "none"
            consumers = tuple(where + n.name for n in index.consumers(dq.output[0]))
            pairs.append(Pair(where + tensor, kind, granularity, float(np.min(scale)), float(np.max(scale)), zp,
                              consumers))
        for node in graph.node:
            if node.op_type in QDQ_OPS:
                continue
            count = sum(i in dequantized for i in node.input)
            if count:
                int8_nodes.append((where + node.name, node.op_type, count, len(node.input)))
            elif node.op_type in WEIGHTED_OPS:
                float_layers.append((where + node.name, node.op_type,
                                     reasons.get(node.name, "no Q/DQ on its inputs")))
    pairs.sort(key=lambda p: (p.kind, p.tensor))
    return Inspection(tuple(pairs), tuple(int8_nodes), tuple(float_layers), metadata)


def graphs_in(graph: onnx.GraphProto, outside: dict[str, onnx.TensorProto], where: str = ""
              ) -> Iterator[tuple[str, onnx.GraphProto, dict[str, onnx.TensorProto]]]:
    """(path, graph, the constants it sees: its own and those around it) for ``graph`` and every subgraph in it."""
    constants = {**outside, **{i.name: i for i in graph.initializer}}
    yield where, graph, constants
    for node in graph.node:
        for attribute_name, inner in named_subgraphs(node):
            yield from graphs_in(inner, constants, f"{where}{node.name}/{attribute_name}/")
