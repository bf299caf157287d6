"""What placement rules ask of the graph: producers through copy ops, static dims, float regions, masks."""

from __future__ import annotations

from collections.abc import Iterator

import onnx_graphsurgeon as gs

from qdq.graph import is_constant, producer

# Ops that move or reshape values without computing new ones: Q/DQ commutes with them (TensorRT moves Q
# backward and DQ forward through them), so a quantized neighbour through them is a quantized neighbour.
COPY_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Gather",
                      "Split", "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth"})
POOLING_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh",
                         "HardSwish", "HardSigmoid", "Cast"})
# Ops whose presence marks a normalisation, GELU or Softmax computation (fused or decomposed): float regions.
FLOAT_CORE_OPS = frozenset({"Softmax", "LogSoftmax", "LayerNormalization", "Pow", "Sqrt", "Reciprocal", "Erf",
                            "InstanceNormalization", "GroupNormalization", "SimplifiedLayerNormalization", "Gelu",
                            "ReduceSumSquare", "ReduceL2"})


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
    if node.op not in ELEMENTWISE:
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
                if near.op in ELEMENTWISE:
                    following.append(near)
        frontier = following
    return None


def is_float_core(node: gs.Node) -> bool:
    """Softmax, normalisation and GELU ops, and a ReduceMean that computes a mean to subtract or a variance.

    A ReduceMean over the spatial axes alone is global average pooling (PyTorch exports ``x.mean((2, 3))``
    so), not part of a normalisation.
    """
    if node.op in FLOAT_CORE_OPS:
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


def feeds_softmax(tensor: gs.Tensor, hops: int = 4) -> gs.Node | None:
    """The Softmax that ``tensor`` reaches through elementwise and copy ops, if any."""
    frontier = [tensor]
    for _ in range(hops):
        following = []
        for t in frontier:
            for node in t.outputs:
                if node.op in ("Softmax", "LogSoftmax"):
                    return node
                if node.op in ELEMENTWISE or node.op in COPY_OPS:
                    following.extend(node.outputs)
        frontier = following
    return None


def from_softmax(tensor: gs.Tensor) -> gs.Node | None:
    node = producer(source_through_copies(tensor))
    while node is not None and node.op in ("Cast", "Dropout", "Identity") and node.inputs:
        node = producer(node.inputs[0])
    return node if node is not None and node.op in ("Softmax", "LogSoftmax") else None


def mask_like(tensor: gs.Tensor, depth: int = 6) -> bool:
    """Whether ``tensor`` is computed from integer/boolean data (an attention or padding mask) or huge constants."""
    frontier = [tensor]
    for _ in range(depth):
        following = []
        for t in frontier:
            node = producer(t)
            if node is None:
                if t.dtype is not None and str(t.dtype) in ("int64", "int32", "bool", "uint8", "int8"):
                    return True
                continue
            if node.op == "Cast" and node.inputs and node.inputs[0].dtype is not None and str(
                    node.inputs[0].dtype) in ("int64", "int32", "bool", "uint8", "int8"):
                return True
            for inp in node.inputs:
                if is_constant(inp):
                    if small(inp) and inp.values.dtype.kind == "f" and inp.values.size and float(
                            abs(inp.values).max()) >= 1e4:
                        return True  # -10000 or -inf: an additive mask
                else:
                    following.append(inp)
        frontier = following
    return False


def small(constant: gs.Constant, limit: int = 16) -> bool:
    """Whether a constant has at most ``limit`` elements (checked on its shape, without loading it)."""
    count = 1
    for d in constant.shape:
        count *= int(d)
    return count <= limit
