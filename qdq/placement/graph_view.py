"""What placement rules ask of the graph: producers through copy ops, static dims, float regions."""

from __future__ import annotations

from collections.abc import Iterator

import onnx_graphsurgeon as gs

from qdq.graph import producer
from qdq.ops import COPY_OPS, ELEMENTWISE_OPS, FLOAT_REGION_OPS


def source_through_copies(tensor: gs.Tensor) -> gs.Tensor:
    """Walk back from ``tensor`` through copy ops to the tensor they copy."""
    seen = 0
    while (node := producer(tensor)) is not None and node.op in COPY_OPS and node.inputs and seen < 64:
        tensor, seen = node.inputs[0], seen + 1
    return tensor


def consumers_through_copies(tensor: gs.Tensor) -> Iterator[tuple[gs.Node, int, gs.Tensor]]:
    """(consumer, input index, tensor read) for every non-copy op reached from ``tensor`` through copy ops."""
    stack, seen = [tensor], set()
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        for node in current.outputs:
            if node.op in COPY_OPS and node.inputs and node.inputs[0] is current:
                stack.extend(node.outputs)
            else:
                for index, t in enumerate(node.inputs):
                    if t is current:
                        yield node, index, current


def static_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """The tensor's dims with ``None`` for dynamic ones, or None when even the rank is unknown."""
    shape = tensor.shape
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def in_float_region(node: gs.Node, hops: int = 1) -> str | None:
    """Why ``node`` belongs to a normalisation/GELU/Softmax computation, or None.

    A node is in such a region when it is one of those ops, or an elementwise op that reads from or feeds
    one within ``hops`` steps: the Sub/Mul/Add/Div of a decomposed LayerNorm, the Div/Add/Mul around GELU's Erf.
    Quantizing them collapsed a classifier to 3.5% top-1 in another tool (../specs/placement.md).
    """
    if is_float_core(node):
        return f"{node.op} runs in float"
    if node.op not in ELEMENTWISE_OPS:
        return None
    frontier, seen = [node], {node.name}
    for _ in range(hops + 1):
        following = []
        for current in frontier:
            for near in neighbours(current):
                if near.name in seen:
                    continue
                seen.add(near.name)
                if is_float_core(near):
                    return f"next to {near.op} ({near.name}): part of a normalisation, GELU or Softmax"
                if near.op in ELEMENTWISE_OPS:
                    following.append(near)
        frontier = following
    return None


def is_float_core(node: gs.Node) -> bool:
    """Softmax, normalisation and GELU ops, and a ReduceMean that computes a mean to subtract or a variance.

    A ReduceMean over the spatial axes alone is global average pooling (PyTorch exports ``x.mean((2, 3))``
    so), not part of a normalisation.
    """
    if node.op in FLOAT_REGION_OPS:
        return True
    if node.op != "ReduceMean" or not node.inputs:
        return False
    x = node.inputs[0]
    subtracted = any(c.op == "Sub" and x in c.inputs for c in node.outputs[0].outputs)
    variance = (p := producer(x)) is not None and (p.op == "Pow" or (p.op == "Mul" and len(set(
        id(t) for t in p.inputs)) == 1))
    return subtracted or variance


def neighbours(node: gs.Node) -> Iterator[gs.Node]:
    for tensor in node.inputs:
        if (p := producer(tensor)) is not None:
            yield p
    for tensor in node.outputs:
        yield from tensor.outputs
