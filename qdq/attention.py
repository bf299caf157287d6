"""What attention looks like in an ONNX graph: the Softmax a tensor reaches or comes from, and mask Adds.

The one mask test: placement keeps mask Adds float, and ``--high-precision fp16`` keeps them FP32 (a -1e4 or
-inf mask added in FP16 saturates or swamps the scores). Both ask :func:`is_mask_add`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto

from qdq.graph import GraphIndex
from qdq.ops import COPY_OPS, ELEMENTWISE_OPS, SOFTMAX_OPS

INTEGER_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL, TensorProto.UINT8,
                           TensorProto.INT8})
# An additive mask writes -10000 (BERT's exports) or -inf where attention is not allowed.
MASK_MAGNITUDE = 1e4


def feeds_softmax(index: GraphIndex, tensor: str, hops: int = 4) -> str | None:
    """The name of the Softmax that ``tensor`` reaches through elementwise and copy ops, if any."""
    frontier = [tensor]
    for _ in range(hops):
        following = []
        for name in frontier:
            for node in index.consumers(name):
                if node.op_type in SOFTMAX_OPS:
                    return node.name or node.output[0]
                if node.op_type in ELEMENTWISE_OPS or node.op_type in COPY_OPS:
                    following.extend(node.output)
        frontier = following
    return None


def from_softmax(index: GraphIndex, tensor: str) -> bool:
    """Whether ``tensor`` is a Softmax's output, seen through copy ops, Casts, Dropouts and masked fills
    (attention·V)."""
    node = index.producer(tensor)
    while node is not None and node.input:
        if node.op_type in COPY_OPS or node.op_type in ("Cast", "Dropout"):
            source = node.input[0]
        elif (source := masked_fill_source(index, node)) is None:
            break
        node = index.producer(source)
    return node is not None and node.op_type in SOFTMAX_OPS


def masked_fill_source(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """The data input of a Where that replaces some values by a constant, else None.

    torch's dynamo exporter guards scaled-dot-product attention so: ``Where(IsNaN(p), 0, p)`` after the Softmax
    zeroes the rows a mask hides completely (seen on the corpus's GPT-2).
    """
    if node.op_type != "Where" or len(node.input) != 3:
        return None
    data = [t for t in node.input[1:] if not index.is_constant(t)]
    return data[0] if len(data) == 1 else None


def huge_constant(index: GraphIndex, name: str) -> bool:
    """A small float constant holding -1e4, -inf or the like: an additive mask's fill value."""
    values = index.small_value(name)
    return (values is not None and values.dtype.kind == "f" and values.size > 0
            and bool(np.max(np.abs(values)) >= MASK_MAGNITUDE))


# What a mask is made with from its integer or boolean source: arithmetic, comparisons and logic, selection, and
# copies (their data input only: a Reshape's shape or a Gather's indices say where values go, not what they are).
MASK_PATH_OPS = ELEMENTWISE_OPS | frozenset({"Neg", "Max", "Min", "Sum", "Not", "And", "Or", "Xor", "Equal", "Less",
                                             "Greater", "LessOrEqual", "GreaterOrEqual", "Concat"})


def mask_like(index: GraphIndex, tensor: str, depth: int = 6) -> bool:
    """Whether ``tensor`` is computed from integer/boolean data (an attention or padding mask) or huge constants,
    through the ops masks are made with. A layer (MatMul, Conv...) or an embedding lookup in between makes
    features, not a mask: tf2onnx's Dense on a sequence reshapes by a shape Cast from int64, and residual Adds
    after it were once taken for masks."""
    if huge_constant(index, tensor):
        return True
    frontier = [tensor]
    for _ in range(depth):
        following = []
        for name in frontier:
            node = index.producer(name)
            if node is None:
                if not index.is_constant(name) and index.elem_type(name) in INTEGER_TYPES:
                    return True
                continue
            if node.op_type == "Cast" and node.input and index.elem_type(node.input[0]) in INTEGER_TYPES:
                return True
            inputs = node.input[:1] if node.op_type in COPY_OPS else node.input if node.op_type in MASK_PATH_OPS \
                else []
            for inp in inputs:
                if not inp:
                    continue
                if index.is_constant(inp):
                    if huge_constant(index, inp):
                        return True
                else:
                    following.append(inp)
        frontier = following
    return False


def is_mask_add(index: GraphIndex, inputs: Sequence[str], output: str) -> bool:
    """An Add that adds a mask: one input is mask-like, or the sum goes on to a Softmax (attention scores)."""
    return feeds_softmax(index, output) is not None or any(mask_like(index, t) for t in inputs if t)
