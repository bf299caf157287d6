"""What placement rules ask of the graph: producers through copy ops, static dims, float regions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from qdq.graph import producer
from qdq.ops import COPY_OPS, ELEMENTWISE_OPS, FLOAT_REGION_OPS, WEIGHTED_OPS


def source_through_copies(tensor: gs.Tensor, copies: frozenset[str] = COPY_OPS) -> gs.Tensor:
    """Walk back from ``tensor`` through copy ops to the tensor they copy."""
    seen = 0
    while (node := producer(tensor)) is not None and node.op in copies and node.inputs and seen < 64:
        tensor, seen = node.inputs[0], seen + 1
    return tensor


def consumers_through_copies(tensor: gs.Tensor, copies: frozenset[str] = COPY_OPS
                             ) -> Iterator[tuple[gs.Node, int, gs.Tensor]]:
    """(consumer, input index, tensor read) for every non-copy op reached from ``tensor`` through copy ops."""
    stack, seen = [tensor], set()
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        for node in current.outputs:
            if node.op in copies and node.inputs and node.inputs[0] is current:
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
    if node.op in FLOAT_REGION_OPS or is_tanh_gelu(node):
        return True
    if node.op != "ReduceMean" or not node.inputs:
        return False
    x = node.inputs[0]
    subtracted = any(c.op == "Sub" and x in c.inputs for c in node.outputs[0].outputs)
    variance = (p := producer(x)) is not None and (p.op == "Pow" or (p.op == "Mul" and len(set(
        id(t) for t in p.inputs)) == 1))
    return subtracted or variance


def is_tanh_gelu(node: gs.Node) -> bool:
    """The Tanh of GELU's tanh approximation (GPT-2's ``gelu_new``): its argument is ``c·(x + 0.044715·x³)``, a
    cube within four elementwise steps back. A Tanh activation of its own is no GELU."""
    if node.op != "Tanh":
        return False
    frontier = [node]
    for _ in range(4):
        frontier = [p for n in frontier for t in n.inputs
                    if (p := producer(t)) is not None and p.op in ("Mul", "Add", "Div", "Pow")]
        if any(is_cube(p) for p in frontier):
            return True
    return False


def is_cube(node: gs.Node) -> bool:
    """``x ** 3``, or ``x * x * x`` as a square times its base."""
    if node.op == "Pow":
        return len(node.inputs) == 2 and exponent(node.inputs[1]) == 3.0
    if node.op != "Mul" or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    return any((p := producer(square)) is not None and is_square(p) and p.inputs[0] is base
               for square, base in ((a, b), (b, a)))


def neighbours(node: gs.Node) -> Iterator[gs.Node]:
    for tensor in node.inputs:
        if (p := producer(tensor)) is not None:
            yield p
    for tensor in node.outputs:
        yield from tensor.outputs


# Exporters put float-to-float Casts between an STFT's slices and their squares (Silero VAD).
SPECTRUM_COPY_OPS = COPY_OPS | {"Cast"}


def is_square(node: gs.Node) -> bool:
    """``x * x`` or ``x ** 2``."""
    if node.op == "Mul" and len(node.inputs) == 2:
        return node.inputs[0] is node.inputs[1]
    return node.op == "Pow" and len(node.inputs) == 2 and exponent(node.inputs[1]) == 2.0


def exponent(tensor: gs.Tensor) -> float | None:
    values = getattr(tensor, "values", None)
    return None if values is None or np.size(values) != 1 else float(np.asarray(values).reshape(()))


def spectrum(tensor: gs.Tensor) -> str | None:
    """"power" or "magnitude" when ``tensor`` is a sum of squares (``re² + im²``) or its square root, through
    copy ops: a spectrum, whose values span many decades. A sum of two or more squares, not one square alone
    (``x * x`` also appears inside tanh-GELU)."""
    node = producer(source_through_copies(tensor, SPECTRUM_COPY_OPS))
    if node is None:
        return None
    if node.op in ("Sqrt", "Pow") and node.inputs and (node.op == "Sqrt" or exponent(node.inputs[1]) == 0.5):
        return "magnitude" if spectrum(node.inputs[0]) == "power" else None
    squares = [producer(source_through_copies(t, SPECTRUM_COPY_OPS)) for t in node.inputs]
    if node.op in ("Add", "Sum") and len(squares) >= 2 and all(p is not None and is_square(p) for p in squares):
        return "power"
    return None


# What a logarithm's input may pass through from a layer's output and still carry its errors unfiltered: copies,
# linear layers and arithmetic, the magnitude's square root and sums (ReduceSum over real and imaginary parts, or
# ReduceSumSquare and ReduceL2 doing the squares too: onnx-asr's STFT-as-Conv front ends).
TOWARDS_LOG_OPS = SPECTRUM_COPY_OPS | WEIGHTED_OPS | frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Abs", "Clip", "Max", "Min", "Sum", "Concat", "ReduceSum",
     "ReduceSumSquare", "ReduceL2", "Neg"})


def logarithm_after(tensor: gs.Tensor, limit: int = 128) -> gs.Node | None:
    """The Log that ``tensor`` reaches through arithmetic, copies and linear layers (a spectral front end's
    filterbanks), or None. Any other op (an activation, a normalisation, a Softmax) ends the search, and so do
    ``limit`` nodes (basic-pitch's decimation Conv is 27 nodes from its Log, through octave Concats)."""
    stack, seen = [tensor], set()
    while stack and len(seen) < limit:
        current = stack.pop()
        for node in current.outputs:
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op == "Log":
                return node
            if node.op in TOWARDS_LOG_OPS:
                stack.extend(node.outputs)
    return None


def squared_into_spectrum(tensor: gs.Tensor) -> gs.Tensor | None:
    """The spectrum ``tensor`` is squared into (a transform's real or imaginary part: ``re² + im²``), or None."""
    for square, _, _ in consumers_through_copies(tensor, SPECTRUM_COPY_OPS):
        if not is_square(square):
            continue
        for total, _, _ in consumers_through_copies(square.outputs[0], SPECTRUM_COPY_OPS):
            if total.op in ("Add", "Sum") and spectrum(total.outputs[0]) == "power":
                return total.outputs[0]
    return None
