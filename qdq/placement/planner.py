"""Run the placement rules over a prepared graph and gather their decisions into a QuantPlan."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from qdq.errors import PlacementError
from qdq.graph import import_graph, is_constant, is_float32
from qdq.placement.plan import QuantPlan
from qdq.placement.rules import RULES, WEIGHTED_OPS, PlanContext, keep_float
from qdq.runtime import output_types

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm",
})


def plan_quantization(model: onnx.ModelProto, *, per_channel: bool = True) -> QuantPlan:
    """Decide, node by node, which inputs get Q/DQ. The model is only read.

    Raises PlacementError for a model that is already quantized: qdq does not quantize twice.
    """
    graph = import_graph(model)
    refuse_quantized(graph)
    known = learn_float32(model, graph)
    ctx = PlanContext(is_float32=lambda t: is_constant_float32(t) if is_constant(t) else known(t),
                      per_channel=per_channel)
    decisions = []
    for node in graph.nodes:
        decision = next((d for rule in RULES if (d := rule(node, ctx)) is not None), None)
        decisions.append(decision or keep_float(node, ctx))
    return QuantPlan(tuple(decisions))


def refuse_quantized(graph: gs.Graph) -> None:
    found = [n for n in graph.nodes if n.op in QUANTIZED_OPS]
    if found:
        ops = sorted({n.op for n in found})
        raise PlacementError(
            f"the model is already quantized ({len(found)} {'/'.join(ops)} nodes, e.g. {found[0].name!r}); "
            "qdq quantizes float models only: give it the float model"
        )


def is_constant_float32(tensor: gs.Constant) -> bool:
    return tensor.dtype == "float32"  # LazyValues know their dtype without loading the weight


def learn_float32(model: onnx.ModelProto, graph: gs.Graph):
    """A float32 test for variables: shape inference's dtype where known, else the type ONNX Runtime infers."""
    unknown = sorted({t.name for n in graph.nodes if n.op in WEIGHTED_OPS
                      for t in n.inputs[:2] if not is_constant(t) and t.dtype is None})
    ort_types = output_types(model, unknown) if unknown else {}

    def known(tensor: gs.Tensor) -> bool:
        if tensor.dtype is not None:
            return is_float32(tensor)
        return ort_types.get(tensor.name) == "tensor(float)"

    return known
