"""ONNX shape inference, done on the graph's structure so it works for models of any size."""

from __future__ import annotations

import logging

import onnx

from qdq.model_io import first_line
from qdq.passes.base import PassResult

log = logging.getLogger(__name__)

# Initializers above this size take part in inference through their type and shape only.
SMALL_INITIALIZER_BYTES = 1 << 16


class InferShapes:
    """Annotate intermediate tensors with dtypes and shapes where ONNX can infer them.

    Inference that fails is not fatal: real exports often defeat it, and qdq learns dtypes it still
    needs from ONNX Runtime instead.
    """

    name = "infer-shapes"

    def run(self, model: onnx.ModelProto) -> PassResult:
        try:
            inferred = onnx.shape_inference.infer_shapes(structure_only(model), data_prop=True)
        except Exception as exc:  # InferenceError and friends
            note = f"ONNX shape inference failed ({first_line(exc)}); dtypes will come from ONNX Runtime"
            return PassResult(model, modified=False, notes=(note,))
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        return PassResult(model, modified=True)


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose large initializers are replaced by typed graph inputs (no weight data)."""
    src = model.graph
    graph = onnx.GraphProto(name=src.name)
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    declared = {i.name for i in src.input}
    for init in src.initializer:
        if tensor_bytes(init) <= SMALL_INITIALIZER_BYTES:
            graph.initializer.append(init)
        elif init.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    light = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    light.functions.extend(model.functions)
    return light


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's data size from its dims and type (ByteSize() walks the whole message: slow on big weights)."""
    count = 1
    for d in tensor.dims:
        count *= d
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 4
    return count * itemsize
