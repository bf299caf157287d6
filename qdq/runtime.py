"""ONNX Runtime sessions on CPU: the executor for calibration and every numerical check."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from qdq.errors import ModelError
from qdq.model_io import EXTERNAL_DATA_THRESHOLD, first_line


def make_session(model: onnx.ModelProto, *, optimize: bool = True, what: str = "the model") -> ort.InferenceSession:
    """An ORT CPU session for ``model``.

    ``optimize=False`` turns graph optimisations off, so the session computes exactly the graph's ops (used as
    the numerical oracle). Models too large for one protobuf go through a temporary folder with external data.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # qdq reports failures itself, in one line
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        workdir = tempfile.mkdtemp(prefix="qdq-ort-")
        try:
            path = Path(workdir) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise ModelError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from exc


def output_types(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """ORT's type strings (``tensor(float)``...) for intermediate tensors, without running the model.

    For when ONNX shape inference gave up: ORT types every tensor while it loads a graph.
    """
    exposed = with_outputs(model, names)
    return {o.name: o.type for o in make_session(exposed, optimize=False).get_outputs()}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are exactly ``names`` (types left for ORT to infer)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return copy
