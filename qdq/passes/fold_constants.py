"""Fold constant subgraphs, so weights computed by Constant/ConstantOfShape chains become initializers."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from qdq.errors import shown
from qdq.graph import export_model, import_graph, tensor_bytes, undefined_inputs
from qdq.model_io import EXTERNAL_DATA_THRESHOLD, first_line
from qdq.passes.base import Pass, PassResult


class FoldConstants(Pass):
    """Evaluate every node whose inputs are all constant (graphsurgeon, on ONNX Runtime) and drop dead nodes.

    Weight quantization needs the weights as initializers: exporters often compute them (transposes, casts
    from float16, ConstantOfShape placeholders in the ONNX test models).
    """

    name = "fold-constants"
    in_place = False

    def run(self, model: onnx.ModelProto) -> PassResult:
        if sum(tensor_bytes(i) for i in model.graph.initializer) >= EXTERNAL_DATA_THRESHOLD:
            # graphsurgeon folds through a serialised copy, which protobuf cannot make of 2 GB.
            return PassResult(model, modified=False, notes=("constant folding skipped: the model is over 1.8 GB",))
        # graphsurgeon folds through ORT sessions of its own; keep ORT's optimiser chatter off the terminal.
        ort.set_default_logger_severity(3)
        notes = []
        try:
            before, after, folded = fold(model, inline_branches=True)
        except Exception as exc:  # graphsurgeon's own failures (a SequenceEmpty it evaluates to a list, ...)
            return PassResult(model, modified=False, notes=(
                f"constant folding skipped: graphsurgeon failed on this model ({first_line(exc)}); weights computed "
                "by constant subgraphs stay computed, and layers reading them stay float",))
        if undefined_inputs(folded.graph):
            # graphsurgeon inlines the branch of an If whose condition folds to a constant; when that branch
            # returns a nested If's outputs, all but the first lose their producer (Silero VAD's decoder).
            notes.append("constant folding left If branches in place: inlining them broke the graph")
            before, after, folded = fold(model, inline_branches=False)
            if missing := undefined_inputs(folded.graph):
                return PassResult(model, modified=False, notes=(
                    f"constant folding skipped: it left {shown(missing[0])} without a producer",))
        if after == before:
            return PassResult(model, modified=False)
        return PassResult(folded, modified=True, notes=(*notes, f"constant folding removed {before - after} of "
                                                                f"{before} nodes"))


def fold(model: onnx.ModelProto, *, inline_branches: bool) -> tuple[int, int, onnx.ModelProto]:
    """Nodes before and after folding, and the folded model (``model`` itself is left as it was)."""
    # graphsurgeon renames the tensors of the If branches it inlines, and a branch initializer it renames is the
    # input's own TensorProto: a nested If's branch (openwakeword's Silero VAD) lost its weights' names in the input.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = import_graph(copy)
    before = len(graph.nodes)
    graph.fold_constants(error_ok=True, flatten_subgraphs=inline_branches).cleanup(
        remove_unused_graph_inputs=False).toposort()
    return before, len(graph.nodes), export_model(graph, like=model)
