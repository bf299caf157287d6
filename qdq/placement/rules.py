"""Placement rules. Each looks at one node and returns a Decision with its reason, or None to pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qdq.graph import is_constant
from qdq.placement.plan import Decision, QuantInput

# TensorRT's quantizable weighted layers, and the input slots that take Q/DQ (the bias stays float).
WEIGHTED_OPS: dict[str, tuple[int, int]] = {"Conv": (0, 1), "ConvTranspose": (0, 1), "Gemm": (0, 1), "MatMul": (0, 1)}


@dataclass(frozen=True)
class PlanContext:
    """What rules may ask about the graph besides the node itself."""

    is_float32: Callable[[gs.Tensor], bool]
    per_channel: bool = True


Rule = Callable[[gs.Node, PlanContext], "Decision | None"]


def quantize_weighted_op(node: gs.Node, ctx: PlanContext) -> Decision | None:
    """Conv, ConvTranspose, Gemm, MatMul: Q/DQ on the activation and weight inputs.

    TensorRT fuses the DequantizeLinear on each input into the layer and runs it in INT8 only when every
    input is quantized. Outputs are left alone: TensorRT fuses an output Q when a quantized consumer follows.
    """
    if node.op not in WEIGHTED_OPS:
        return None
    slots = WEIGHTED_OPS[node.op]
    operands = [node.inputs[i] for i in slots]

    def decline(reason: str) -> Decision:
        return Decision(node.name, node.op, quantized=False, rule="weighted-op", reason=reason)

    if not all(ctx.is_float32(t) for t in operands):
        return decline("operands are not float32 (only float32 tensors are quantized)")
    if node.op in ("Conv", "ConvTranspose") and not is_constant(node.inputs[1]):
        return decline("non-constant weights: TensorRT needs constant weights for an INT8 convolution")
    inputs = []
    for slot, tensor in zip(slots, operands, strict=True):
        if is_constant(tensor):
            axis = weight_axis(node, slot, len(tensor.shape)) if ctx.per_channel else None
            inputs.append(QuantInput(tensor.name, slot, "weight", axis))
        else:
            inputs.append(QuantInput(tensor.name, slot, "activation"))
    return Decision(node.name, node.op, quantized=True, rule="weighted-op",
                    reason=f"{node.op}: INT8 when every input has Q/DQ", inputs=tuple(inputs))


def keep_float(node: gs.Node, ctx: PlanContext) -> Decision:
    """The fallback: ops that are not quantized by default run in float."""
    return Decision(node.name, node.op, quantized=False, rule="default-float",
                    reason="not a quantized op type by default")


def weight_axis(node: gs.Node, slot: int, rank: int) -> int | None:
    """The output-channel axis of a constant weight (TensorRT's per-channel rule), or None for per tensor."""
    if node.op == "Conv" and slot == 1:
        return 0
    if node.op == "ConvTranspose" and slot == 1:
        # W is [C_in, C_out / group, ...]: with groups, axis 1 is not the output channel, so one scale.
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm" and slot == 1:
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul" and slot == 1 and rank >= 2:
        return rank - 1
    return None  # a constant first operand (A) of Gemm/MatMul has no output-channel axis


RULES: tuple[Rule, ...] = (quantize_weighted_op,)
