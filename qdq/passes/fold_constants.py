"""Fold constant subgraphs, so weights computed by Constant/ConstantOfShape chains become initializers."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from qdq.graph import export_model, import_graph, tensor_bytes
from qdq.model_io import EXTERNAL_DATA_THRESHOLD
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
        graph = import_graph(model)
        before = len(graph.nodes)
        graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
        after = len(graph.nodes)
        if after == before:
            return PassResult(model, modified=False)
        return PassResult(export_model(graph, like=model), modified=True,
                          notes=(f"constant folding removed {before - after} of {before} nodes",))
