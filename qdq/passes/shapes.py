"""ONNX shape inference, done on the graph's structure so it works for models of any size."""

from __future__ import annotations

import onnx

from qdq.graph import structure_only
from qdq.model_io import first_line
from qdq.passes.base import Pass, PassResult


class InferShapes(Pass):
    """Annotate intermediate tensors with dtypes and shapes where ONNX can infer them.

    Inference that fails is not fatal: real exports often defeat it, and qdq learns dtypes it still
    needs from ONNX Runtime instead. Without data propagation: the dims it derives from computed shapes gave
    ONNX Runtime's optimiser a constant ``[0, -1]`` for a Reshape of detections (torchvision's FCOS and RetinaNet
    at opset 17), which fails when no box is kept; placement was the same without it on the 84 models measured.
    """

    name = "infer-shapes"
    in_place = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        try:
            inferred = onnx.shape_inference.infer_shapes(structure_only(model), data_prop=False)
        except Exception as exc:  # InferenceError and friends
            note = f"ONNX shape inference failed ({first_line(exc)}); dtypes will come from ONNX Runtime"
            return PassResult(model, modified=False, notes=(note,))
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        return PassResult(model, modified=True)
