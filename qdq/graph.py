"""Thin helpers over onnx-graphsurgeon, qdq's graph IR."""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

# graphsurgeon logs its own warnings (missing colour module, large folded tensors) to stdout; qdq reports
# what matters through its own logger.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

log = logging.getLogger(__name__)

FLOAT32 = onnx.TensorProto.FLOAT


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model's main graph as a graphsurgeon graph."""
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """A ModelProto of ``graph`` that keeps the model-level fields of ``like`` (IR version, metadata, ...)."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = max(model.ir_version, like.ir_version)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    if not model.functions:
        model.functions.extend(like.functions)
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def is_float32(tensor: gs.Tensor) -> bool:
    """Whether a tensor is known to be float32 (graphsurgeon gives numpy dtypes, or onnx enums)."""
    dtype = tensor.dtype
    if dtype is None:
        return False
    if isinstance(dtype, int):
        return dtype == FLOAT32
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(dtype) == FLOAT32
    except (KeyError, TypeError, ValueError):
        return False


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not taken yet; the name is added to ``taken``."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name
