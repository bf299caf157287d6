"""Remove Identity and inference-mode Dropout nodes: they only rename tensors."""

from __future__ import annotations

import onnx

from qdq.graph import export_model, import_graph
from qdq.passes.base import Pass, PassResult


class RemoveIdentities(Pass):
    """Rewire the consumers of Identity/Dropout to the node's input, so placement sees the real producer.

    A node whose output is a graph output stays (removing it would rename the output). A Dropout in training
    mode (its third input true) is not an identity and stays too.
    """

    name = "remove-identities"
    in_place = False

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        outputs = {t.name for t in graph.outputs}
        removed = 0
        for node in list(graph.nodes):
            if node.op not in ("Identity", "Dropout") or node.outputs[0].name in outputs or training(node):
                continue
            source, result = node.inputs[0], node.outputs[0]
            for consumer in list(result.outputs):  # a copy: rewiring edits the list
                for index, tensor in enumerate(consumer.inputs):
                    if tensor is result:
                        consumer.inputs[index] = source
            node.outputs.clear()
            removed += 1
        if not removed:
            return PassResult(model, modified=False)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(export_model(graph, like=model), modified=True,
                          notes=(f"removed {removed} Identity/Dropout nodes",))


def training(node) -> bool:
    if node.op != "Dropout" or len(node.inputs) < 3:
        return False
    mode = node.inputs[2]
    return not hasattr(mode, "values") or bool(mode.values)
