"""Run the placement rules over a prepared graph and gather their decisions into a QuantPlan."""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from qdq.errors import PlacementError
from qdq.graph import GraphIndex, import_graph, is_constant, is_float32
from qdq.ops import ALREADY_QUANTIZED_OPS, WEIGHTED_OPS
from qdq.placement.neighbourhood import concat_scale_groups, quantize_pooling, quantize_residual_adds
from qdq.placement.plan import Decision, QuantPlan
from qdq.placement.rules import RULES, PlanContext, keep_float
from qdq.runtime import output_types


@dataclass(frozen=True)
class PlacementOptions:
    """The user's steering: node-name patterns and op types to keep float, op types to quantize too."""

    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    include_op_types: tuple[str, ...] = ()
    scheme: str = "int8"


def plan_quantization(model: onnx.ModelProto, options: PlacementOptions | None = None) -> QuantPlan:
    """Decide, node by node, which inputs get Q/DQ, and which tensors share a scale. The model is only read.

    Per-node rules run first (weighted ops, included op types), then the rules that look at those decisions
    (residual Adds, pooling, Concat scale groups). User exclusions win over every rule.

    Raises PlacementError for a model that is already quantized: qdq does not quantize twice.
    """
    options = options or PlacementOptions()
    refuse_quantized(model)
    graph = import_graph(model)
    known = learn_float32(model, graph)
    ctx = PlanContext(is_float32=lambda t: is_constant_float32(t) if is_constant(t) else known(t),
                      index=GraphIndex(model),
                      graph_inputs=frozenset(t.name for t in graph.inputs), per_channel=options.per_channel,
                      include_op_types=frozenset(options.include_op_types))
    decisions: dict[str, Decision] = {}
    excluded: set[str] = set()
    patterns = [(p, re.compile(p)) for p in options.exclude_nodes]
    for node in graph.nodes:
        if reason := exclusion(node, patterns, options.exclude_op_types):
            decisions[node.name] = Decision(node.name, node.op, False, "excluded", reason)
            excluded.add(node.name)
            continue
        decision = next((d for rule in RULES if (d := rule(node, ctx)) is not None), None)
        decisions[node.name] = decision or keep_float(node, ctx)
    quantize_residual_adds(graph, decisions, ctx, excluded)
    quantize_pooling(graph, decisions, ctx, excluded)
    if options.scheme != "int8":
        keep_to_weighted_ops(decisions)
    groups = concat_scale_groups(graph, decisions, excluded)
    return QuantPlan(tuple(decisions[node.name] for node in graph.nodes), shared_scales=groups)


def keep_to_weighted_ops(decisions: dict[str, Decision]) -> None:
    """[TRT] FP8 runs in convolution and GEMM kernels only: other ops (included by the user) stay float.

    Residual Adds and pooling are not quantized either: their INT8 fusions have no FP8 counterpart.
    """
    for name, decision in decisions.items():
        if decision.quantized and decision.op not in WEIGHTED_OPS:
            decisions[name] = Decision(name, decision.op, False, "fp8-gemm-only",
                                       "FP8: TensorRT runs FP8 in Conv, ConvTranspose, Gemm and MatMul only")


def exclusion(node: gs.Node, patterns: list[tuple[str, re.Pattern]], op_types: tuple[str, ...]) -> str | None:
    if node.op in op_types:
        return f"excluded by --exclude-op-types {node.op}"
    for text, pattern in patterns:
        if pattern.search(node.name):
            return f"excluded by --exclude-nodes {text!r}"
    return None


def refuse_quantized(model: onnx.ModelProto) -> None:
    """PlacementError when the model already holds Q/DQ or quantized compute ops (checked before preparing it
    too: an ONNX Runtime-quantized model's custom ops are no business of the opset upgrade)."""
    found = [n for n in model.graph.node if n.op_type in ALREADY_QUANTIZED_OPS]
    if found:
        ops = sorted({n.op_type for n in found})
        raise PlacementError(
            f"the model is already quantized ({len(found)} {'/'.join(ops)} nodes, e.g. {found[0].name!r}); "
            "qdq quantizes float models only: give it the float model"
        )


def is_constant_float32(tensor: gs.Constant) -> bool:
    return tensor.dtype == "float32"  # LazyValues know their dtype without loading the weight


def learn_float32(model: onnx.ModelProto, graph: gs.Graph):
    """A float32 test for variables: shape inference's dtype where known, else the type ONNX Runtime infers."""
    # An omitted optional input (Resize's roi, LSTM's sequence_lens, Clip's min) is the empty name: no tensor.
    unknown = sorted({t.name for n in graph.nodes for t in n.inputs
                      if t.name and not is_constant(t) and t.dtype is None})
    ort_types = output_types(model, unknown) if unknown else {}

    def known(tensor: gs.Tensor) -> bool:
        if tensor.dtype is not None:
            return is_float32(tensor)
        return ort_types.get(tensor.name) == "tensor(float)"

    return known
