"""Placement rules that depend on the neighbours' decisions: residual Adds, pooling, Concat scale sharing.

They run after the per-node rules, over the set of decisions those made, so the result does not depend on the
order of nodes in the file.
"""

from __future__ import annotations

from collections import deque

import onnx_graphsurgeon as gs

from qdq.attention import is_mask_add
from qdq.graph import is_constant, producer
from qdq.ops import ELEMENTWISE_OPS, POOLING_OPS, WEIGHTED_OPS
from qdq.placement.graph_view import consumers_through_copies, in_float_region, source_through_copies
from qdq.placement.plan import Decision, QuantInput
from qdq.placement.rules import PlanContext, decline


def planned_activations(decisions: dict[str, Decision]) -> set[str]:
    return {q.tensor for d in decisions.values() for q in d.inputs if q.kind == "activation"}


def quantize_residual_adds(graph: gs.Graph, decisions: dict[str, Decision], ctx: PlanContext,
                           excluded: set[str]) -> None:
    """[TRT][MO] Residual Add: Q/DQ on the skip input so that the Add fuses into the Conv before it.

    The fused input is the one a quantized Conv/ConvTranspose/Gemm/MatMul produces (directly or through its bias
    Add) and nothing else reads; the skip input is the other one. When both could fuse, the skip input is the
    one with the shorter path to their common ancestor (the shortcut of a ResNet downsampling block). When
    neither can, both inputs are quantized if each comes from a quantized layer within two elementwise steps
    (DenseNet/ResNet-v2 style); otherwise the Add stays float (embedding sums and the like).
    """
    for node in graph.nodes:
        if node.op not in ("Add", "Sum") or len(node.inputs) != 2 or node.name in excluded:
            continue
        if decisions[node.name].quantized:
            continue
        a, b = node.inputs
        if is_constant(a) or is_constant(b) or not (ctx.is_float32(a) and ctx.is_float32(b)):
            continue
        if in_float_region(node):
            continue
        if is_mask_add(ctx.index, (a.name, b.name), node.outputs[0].name):
            decisions[node.name] = decline(node, "mask", "adds a mask (before Softmax, or from integer data): float")
            continue
        fused = [fusible(t, decisions) for t in (a, b)]
        if fused[0] and fused[1]:
            skip = shortcut_index(a, b)
            reason = "residual Add: both inputs could fuse; the shortcut (shorter path) gets Q/DQ"
        elif fused[0] or fused[1]:
            skip = 1 if fused[0] else 0
            reason = "residual Add: skip input, so the Add fuses into the layer before it"
        elif all(near_quantized_layer(t, decisions) for t in (a, b)):
            inputs = tuple(QuantInput(t.name, i, "activation") for i, t in enumerate((a, b)))
            decisions[node.name] = Decision(node.name, node.op, True, "residual-add",
                                            "residual Add without a fusible layer: both inputs", inputs)
            continue
        else:
            continue
        skip_tensor = node.inputs[skip]
        decisions[node.name] = Decision(node.name, node.op, True, "residual-add", reason,
                                        (QuantInput(skip_tensor.name, skip, "activation"),))


def fusible(tensor: gs.Tensor, decisions: dict[str, Decision]) -> bool:
    """Whether ``tensor`` comes straight from a quantized weighted layer (or its bias Add) that only it feeds."""
    node = producer(tensor)
    if node is None or len(tensor.outputs) != 1:
        return False
    if node.op == "Add" and len(node.inputs) == 2 and any(is_constant(t) for t in node.inputs):
        inner = next(t for t in node.inputs if not is_constant(t))
        node = producer(inner)
        if node is None or len(inner.outputs) != 1:
            return False
    return node.op in WEIGHTED_OPS and decisions[node.name].quantized


def near_quantized_layer(tensor: gs.Tensor, decisions: dict[str, Decision], hops: int = 2) -> bool:
    for _ in range(hops + 1):
        node = producer(tensor)
        if node is None:
            return False
        if node.op in WEIGHTED_OPS:
            return decisions[node.name].quantized
        if node.op not in ELEMENTWISE_OPS or not node.inputs:
            return False
        variables = [t for t in node.inputs if not is_constant(t)]
        if len(variables) != 1:
            return False
        tensor = variables[0]
    return False


def shortcut_index(a: gs.Tensor, b: gs.Tensor, limit: int = 200) -> int:
    """The input (0 or 1) with the shorter path back to the two inputs' nearest common ancestor."""
    da, db = distances(a, limit), distances(b, limit)
    common = set(da) & set(db)
    if not common:
        return 1
    best = min(common, key=lambda name: (da[name] + db[name], name))
    return 0 if da[best] < db[best] else 1


def distances(tensor: gs.Tensor, limit: int) -> dict[str, int]:
    """Hops from ``tensor`` back to each of its ancestors (by tensor name)."""
    found = {tensor.name: 0}
    queue = deque([tensor])
    while queue and len(found) < limit:
        current = queue.popleft()
        node = producer(current)
        if node is None:
            continue
        for t in node.inputs:
            if not is_constant(t) and t.name not in found:
                found[t.name] = found[current.name] + 1
                queue.append(t)
    return found


def quantize_pooling(graph: gs.Graph, decisions: dict[str, Decision], ctx: PlanContext, excluded: set[str]) -> None:
    """[MO] Pooling runs in INT8 only next to quantized neighbours (through copy ops); then its input gets Q/DQ."""
    planned = planned_activations(decisions)
    uses = {(d.node, q.index) for d in decisions.values() for q in d.inputs if q.kind == "activation"}
    for node in graph.nodes:
        if node.op not in POOLING_OPS or node.name in excluded or not node.inputs:
            continue
        x = node.inputs[0]
        if not ctx.is_float32(x):
            continue
        after = any((c.name, i) in uses for c, i, _ in consumers_through_copies(node.outputs[0]))
        before = x.name in planned or source_through_copies(x).name in planned
        if not (after or before):
            decisions[node.name] = decline(node, "pooling", "no quantized producer or consumer next to it: float")
            continue
        side = "consumer" if after else "producer"
        decisions[node.name] = Decision(node.name, node.op, True, "pooling",
                                        f"{node.op} next to a quantized {side}: runs in INT8",
                                        (QuantInput(x.name, 0, "activation"),))


def concat_scale_groups(graph: gs.Graph, decisions: dict[str, Decision], excluded: set[str]
                        ) -> tuple[tuple[str, ...], ...]:
    """[MO] A Concat whose output is quantized shares one scale with its quantized inputs (no requantization)."""
    planned = planned_activations(decisions)
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    for node in graph.nodes:
        if node.op != "Concat" or node.name in excluded:
            continue
        out = node.outputs[0]
        # The output counts as quantized when a quantized input edge reads it, possibly through copy ops.
        if not any(t.name in planned for _, _, t in consumers_through_copies(out)) and out.name not in planned:
            continue
        members = [out.name] + [t.name for t in node.inputs if t.name in planned and not is_constant(t)]
        quantized_out = next((t.name for _, _, t in consumers_through_copies(out) if t.name in planned), out.name)
        members[0] = quantized_out
        for name in members[1:]:
            parent[find(name)] = find(members[0])
        parent.setdefault(members[0], members[0])
        sharing = len(members) - 1
        decisions[node.name] = Decision(node.name, node.op, False, "concat",
                                        f"output quantized: {sharing} quantized inputs share its scale"
                                        if sharing else "output quantized (inputs quantize through it)")
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    return tuple(sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1))


__all__ = ["concat_scale_groups", "quantize_pooling", "quantize_residual_adds"]
