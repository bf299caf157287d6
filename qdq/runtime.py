"""ONNX Runtime sessions on CPU: the executor for calibration and every numerical check."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from qdq.errors import ModelError
from qdq.graph import SMALL_INITIALIZER_BYTES, fresh_name, structure_only, tensor_bytes

# From this much weight on, large weights are fed to ONNX Runtime as inputs, zero-copy, instead of serialised
# into the model (which protobuf cannot do past 2 GB) and copied again by ORT: memory stays near 2x the weights.
LARGE_MODEL_BYTES = 1 << 30


class Session:
    """An ONNX Runtime session, plus the weights it is fed with every run (for models of 1 GB or more)."""

    def __init__(self, inner: ort.InferenceSession, weights: dict[str, np.ndarray]) -> None:
        self.inner, self.weights = inner, weights

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.inner.run(names, {**feeds, **self.weights} if self.weights else feeds)

    def get_outputs(self) -> list:
        return self.inner.get_outputs()

    def get_inputs(self) -> list:
        return [i for i in self.inner.get_inputs() if i.name not in self.weights]


def make_session(model: onnx.ModelProto, *, optimize: bool = True, what: str = "the model") -> Session:
    """An ORT CPU session for ``model``.

    ``optimize=True`` applies all of ORT's graph optimisations (fusions such as Conv+BatchNorm+Relu; they change
    results only by float rounding); ``optimize=False`` computes exactly the graph's ops.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # qdq reports failures itself, in one line
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # ORT's worker threads spin while waiting for work; calibration reduces statistics on a thread of its own at
    # the same time, and spinning threads would take its CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    weights: dict[str, np.ndarray] = {}
    if sum(tensor_bytes(i) for i in model.graph.initializer) >= LARGE_MODEL_BYTES:
        model, weights = weights_as_inputs(model)
    try:
        inner = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        # ORT's messages go on past a line break ("input 'w' of node:" then the node): all of it, on one line
        raise ModelError(f"ONNX Runtime cannot load {what}: {' '.join(str(exc).split())[:600]}") from exc
    return Session(inner, weights)


def quantized_session(model: onnx.ModelProto, exposing: list[str] | None = None, *,
                      what: str = "the quantized model") -> Session:
    """A session that computes what a Q/DQ graph means: quantize, dequantize, float op, on any CPU alike.

    Every number qdq reports about a quantized model comes from here. ORT's graph optimisations stay off: with
    them, ORT fuses Q/DQ pairs into its own int8 CPU kernels, chosen by instruction set; the u8s8 ones saturate
    on x86 CPUs without VNNI (an EfficientNet-Lite0 read 2.4 dB there against the graph's 14.2 dB). TensorRT
    computes the graph's arithmetic, not those kernels. ``exposing``: the session's outputs, if not the graph's.
    """
    if exposing is not None:
        return session_exposing(model, exposing, optimize=False, what=what)
    return make_session(model, optimize=False, what=what)


def weights_as_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with its large initializers turned into graph inputs, and their values to feed."""
    light = structure_only(model)
    declared = {i.name for i in light.graph.input}
    weights = {}
    for init in model.graph.initializer:
        if tensor_bytes(init) > SMALL_INITIALIZER_BYTES:
            weights[init.name] = numpy_helper.to_array(init)
            if init.name not in declared:
                light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    return light, weights


def output_types(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """ORT's type strings (``tensor(float)``...) for intermediate tensors, without running the model.

    For when ONNX shape inference gave up: ORT types every tensor while it loads a graph.
    """
    session = session_exposing(model, names, optimize=False)
    return {o.name: o.type for o in session.get_outputs()}


def session_exposing(model: onnx.ModelProto, names: list[str], *, optimize: bool = True,
                     what: str = "the model") -> Session:
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


def session_reducing(model: onnx.ModelProto, names: list[str], *, pooled: frozenset[str] = frozenset(),
                     what: str = "the model") -> tuple[Session, list[tuple[str, ...]]]:
    """A session whose outputs reduce each tensor in ``names`` inside ONNX Runtime, for max calibration.

    Only the extremes matter there: reducing in ORT's own threads spares copying every activation out of the
    session. A tensor in ``pooled`` (float, rank >= 3, known nonnegative) is reduced by GlobalMaxPool and
    GlobalAveragePool, to ``[N, C, 1...]``: ORT runs both in its blocked (NCHWc) convolution layout, where
    ReduceMin/Max would first copy the whole tensor back to NCHW. Any other tensor gets ReduceMin, ReduceMax and
    ReduceSum. ORT's min and max may skip NaN; sums and averages do not, so a non-finite one tells the caller to
    look at the whole tensor. Returns the session and, per tensor, its output names: ``(min, max, sum)`` or
    ``(max, average)``. The model is restored.
    """
    taken = {t for n in model.graph.node for t in (*n.input, *n.output)}
    groups, nodes = [], []
    for name in names:
        ops = ("GlobalMaxPool", "GlobalAveragePool") if name in pooled else ("ReduceMin", "ReduceMax", "ReduceSum")
        group = []
        for op in ops:
            out = fresh_name(f"{name}__qdq_{op.lower()}", taken)
            attrs = {} if op.startswith("Global") else {"keepdims": 0}
            if op == "ReduceSum":
                attrs["noop_with_empty_axes"] = 0
            nodes.append(onnx.helper.make_node(op, [name], [out], name=f"{out}_node", **attrs))
            group.append(out)
        groups.append(tuple(group))
    model.graph.node.extend(nodes)
    try:
        return session_exposing(model, [o for g in groups for o in g], what=what), groups
    finally:
        del model.graph.node[len(model.graph.node) - len(nodes):]


def check_qdq_opset(opset: int, where: str) -> None:
    """ONNX Runtime must run QuantizeLinear/DequantizeLinear at the model's opset, or the output cannot be checked.

    ONNX Runtime can load models of an opset whose QuantizeLinear it has no kernel for (1.32 runs other opset-28
    ops but not QuantizeLinear-28): said before calibration, not after it.
    """
    if not runs_qdq_at(opset):
        raise ModelError(
            f"{where} has opset {opset}, at which ONNX Runtime {ort.__version__} cannot run QuantizeLinear/"
            f"DequantizeLinear, so the quantized model could not be checked; convert the model to a lower opset "
            f"first (onnx.version_converter.convert_version)")


@functools.cache
def runs_qdq_at(opset: int) -> bool:
    """Whether ONNX Runtime loads a QuantizeLinear -> DequantizeLinear pair (int8) at ``opset``."""
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array(1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    try:
        make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), optimize=False)
    except ModelError:
        return False
    return True
