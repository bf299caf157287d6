"""ONNX Runtime sessions on CPU: the executor for calibration and every numerical check."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx.external_data_helper import load_external_data_for_model

from qdq.errors import ModelError
from qdq.model_io import first_line


def make_session(model: onnx.ModelProto, *, optimize: bool = True, what: str = "the model") -> ort.InferenceSession:
    """An ORT CPU session for ``model``.

    ``optimize=True`` applies all of ORT's graph optimisations (fusions such as Conv+BatchNorm+Relu; they change
    results only by float rounding); ``optimize=False`` computes exactly the graph's ops. Models too large for
    one protobuf go through a temporary folder with external data.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # qdq reports failures itself, in one line
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        try:
            serialized = model.SerializeToString()
        except EncodeError:  # 2 GB or more: protobuf cannot hold it in one message
            return _session_via_files(model, options)
        return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise ModelError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from exc


def _session_via_files(model: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    workdir = tempfile.mkdtemp(prefix="qdq-ort-")
    try:
        path = Path(workdir) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
        # Saving moved the weights out of the proto: put them back so the caller's model stays whole.
        load_external_data_for_model(model, workdir)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def output_types(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """ORT's type strings (``tensor(float)``...) for intermediate tensors, without running the model.

    For when ONNX shape inference gave up: ORT types every tensor while it loads a graph.
    """
    session = session_exposing(model, names, optimize=False)
    return {o.name: o.type for o in session.get_outputs()}


def session_exposing(model: onnx.ModelProto, names: list[str], *, optimize: bool = True,
                     what: str = "the model") -> ort.InferenceSession:
    """A session whose outputs are exactly ``names`` (types left for ORT to infer).

    The graph's outputs are swapped for the session's sake and restored: no copy of the weights is made.
    """
    original = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    try:
        return make_session(model, optimize=optimize, what=what)
    finally:
        del model.graph.output[:]
        model.graph.output.extend(original)
