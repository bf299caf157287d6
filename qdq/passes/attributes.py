"""Drop the empty ``axes`` attribute of Reduce ops: graphsurgeon, which folding and Q/DQ insertion go through,
cannot write an empty list back."""

from __future__ import annotations

import onnx

from qdq.graph import every_node
from qdq.passes.base import Pass, PassResult


class DropEmptyAxes(Pass):
    """A Reduce op's ``axes=[]`` reduces over every axis, as the attribute's absence does (ONNX Runtime reads it
    so); ``torch.jit.script`` exports ``x.amax()`` that way. The attribute is dropped, in subgraphs too."""

    name = "drop-empty-axes"
    in_place = False

    def run(self, model: onnx.ModelProto) -> PassResult:
        if not any(empty_axes(n) for _, n in every_node(model.graph)):
            return PassResult(model, modified=False)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        dropped = 0
        for _, node in every_node(out.graph):
            if (attribute := empty_axes(node)) is not None:
                node.attribute.remove(attribute)
                dropped += 1
        return PassResult(out, modified=True, notes=(f"dropped the empty axes attribute of {dropped} Reduce nodes "
                                                     "(they reduce over every axis either way)",))


def empty_axes(node: onnx.NodeProto) -> onnx.AttributeProto | None:
    if not node.op_type.startswith("Reduce"):
        return None
    return next((a for a in node.attribute if a.name == "axes" and a.type == onnx.AttributeProto.INTS
                 and not a.ints), None)
