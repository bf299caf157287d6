"""The one pass that writes Q/DQ nodes, exactly as the plan says."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdq.check import check_model
from qdq.errors import CalibrationError, OutputError
from qdq.graph import export_model, fresh_name, import_graph
from qdq.passes.base import Pass, PassResult
from qdq.placement.plan import QuantPlan
from qdq.ranges import TensorRanges
from qdq.scheme import INT8, Scheme, bounds_note, weight_amax


class MaterializeQDQ(Pass):
    """Insert one Q/DQ pair per planned activation and one per planned (weight, axis); rewire the planned inputs.

    Precondition: every planned activation has a range. The scheme (INT8 by default) gives the element type,
    the scale (``amax / qmax``) and the zero point. Names derive from the quantized tensor
    (``<tensor>_QuantizeLinear``, ``<tensor>_scale``...) so the graph reads well in Netron; each Q and weight
    DQ node's doc_string says where its scale came from.
    """

    name = "materialize-qdq"
    in_place = False

    def __init__(self, plan: QuantPlan, ranges: TensorRanges, *, weights: str = "int8",
                 scheme: Scheme = INT8) -> None:
        self.plan, self.ranges, self.weights, self.scheme = plan, ranges, weights, scheme

    def requires(self, model: onnx.ModelProto) -> None:
        if missing := sorted(set(self.plan.activations()) - self.ranges.names()):
            raise CalibrationError(f"no range for {len(missing)} tensors to quantize, e.g. {missing[:3]}: "
                                   "calibrate with data or give a range file that covers them")

    def ensures(self, model: onnx.ModelProto) -> None:
        """What was written must pass TensorRT's rules (``qdq check``): a failure here is qdq's bug."""
        if errors := [f for f in check_model(model) if f.severity == "error"]:
            raise OutputError(f"pass {self.name} wrote Q/DQ that break {len(errors)} TensorRT rules (a qdq bug, "
                              "please report): " + "; ".join(map(str, errors[:3])))

    def run(self, model: onnx.ModelProto) -> PassResult:
        activations = self.plan.activations()
        graph = import_graph(model)
        tensors = graph.tensors()
        nodes = {node.name: node for node in graph.nodes}
        writer = QdqWriter(graph, self.scheme, taken=set(tensors) | set(nodes))
        for name, uses in activations.items():
            amax = self.ranges.amax[name]
            bounded = bounds_note(self.scheme, amax)
            chosen = self.ranges.source(name) + (f", {bounded}" if bounded else "")
            doc = f"activation, per tensor: amax={amax!r} ({chosen}), scale=amax/{self.scheme.qmax:g}"
            dq = writer.pair(tensors[name], np.float32(self.ranges.scale(name, self.scheme)), axis=None, doc=doc)
            rewire(nodes, uses, dq)
        for (name, axis), uses in self.plan.weights().items():
            rewire(nodes, uses, writer.weight(tensors[name], axis, stored=self.weights == "int8"))
        graph.cleanup().toposort()
        out = export_model(graph, like=model)
        for node in out.graph.node:
            if node.name in writer.docs:
                node.doc_string = writer.docs[node.name]
        return PassResult(out, modified=bool(activations) or bool(self.plan.weights()))


def rewire(nodes: dict[str, gs.Node], uses: list[tuple[str, int]], tensor: gs.Tensor) -> None:
    for node, index in uses:
        nodes[node].inputs[index] = tensor


class QdqWriter:
    """Makes Q/DQ nodes and their constants with fresh, readable names."""

    def __init__(self, graph: gs.Graph, scheme: Scheme, taken: set[str]) -> None:
        self.graph, self.scheme, self.taken = graph, scheme, taken
        self.docs: dict[str, str] = {}

    def pair(self, source: gs.Tensor, scale: np.ndarray, *, axis: int | None, doc: str) -> gs.Variable:
        """``source -> QuantizeLinear -> DequantizeLinear``; returns the DequantizeLinear output."""
        base = source.name
        scale_c, zero_c = self.scale_and_zero(base, scale)
        attrs = {} if axis is None else {"axis": axis}
        quantized = gs.Variable(self.fresh(f"{base}_quantized"), dtype=self.scheme.element_dtype, shape=source.shape)
        q = gs.Node("QuantizeLinear", self.fresh(f"{base}_QuantizeLinear"), attrs,
                    [source, scale_c, zero_c], [quantized])
        self.graph.nodes.append(q)
        self.docs[q.name] = doc
        return self.dequantize(base, quantized, scale_c, zero_c, attrs, source.shape)

    def weight(self, source: gs.Constant, axis: int | None, *, stored: bool) -> gs.Variable:
        """A constant weight quantized from its own values (per channel along ``axis``, or per tensor).

        ``stored``: the quantized values become the initializer (no QuantizeLinear); else a Q/DQ pair on it.
        """
        values = load_uncached(source)
        amax = weight_amax(values, axis)
        scale = self.scheme.scale(amax)
        where = "per tensor" if axis is None else f"per channel, axis {axis}"
        doc = f"weight, {where}: amax=max|w| (largest {float(amax.max())!r}), scale=amax/{self.scheme.qmax:g}"
        base = source.name
        if not stored:
            return self.pair(source, scale, axis=axis, doc=doc)
        scale_c, zero_c = self.scale_and_zero(base, scale)
        attrs = {} if axis is None else {"axis": axis}
        quantized = gs.Constant(self.fresh(f"{base}_{self.scheme.name}"), self.scheme.quantize(values, scale, axis))
        dq_out = self.dequantize(base, quantized, scale_c, zero_c, attrs, list(values.shape))
        self.docs[dq_out.inputs[0].name] = doc
        return dq_out

    def dequantize(self, base: str, quantized: gs.Tensor, scale_c: gs.Constant, zero_c: gs.Constant,
                   attrs: dict, shape) -> gs.Variable:
        out = gs.Variable(self.fresh(f"{base}_dequantized"), dtype=np.float32, shape=shape)
        dq = gs.Node("DequantizeLinear", self.fresh(f"{base}_DequantizeLinear"), dict(attrs),
                     [quantized, scale_c, zero_c], [out])
        self.graph.nodes.append(dq)
        return out

    def scale_and_zero(self, base: str, scale: np.ndarray) -> tuple[gs.Constant, gs.Constant]:
        scale = np.asarray(scale, dtype=self.scheme.scale_dtype)
        return (gs.Constant(self.fresh(f"{base}_scale"), scale),
                gs.Constant(self.fresh(f"{base}_zero_point"), self.scheme.zero_point(scale.shape)))

    def fresh(self, name: str) -> str:
        return fresh_name(name, self.taken)



def load_uncached(constant: gs.Constant) -> np.ndarray:
    """A constant's values without graphsurgeon keeping them: each float weight is read, quantized and freed."""
    lazy = constant._values  # graphsurgeon caches ``.values`` on the Constant; the lazy loader does not
    return lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else constant.values
