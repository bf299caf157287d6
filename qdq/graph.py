"""Thin helpers over onnx-graphsurgeon, qdq's graph IR."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from qdq.ops import NONNEGATIVE_OPS, SIGN_KEEPING_OPS

# graphsurgeon logs its own warnings (missing colour module, large folded tensors) to stdout; qdq reports
# what matters through its own logger.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


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


class GraphIndex:
    """Producers, consumers, constants and element types of an ONNX graph, built once.

    The one index over ``onnx.ModelProto`` graphs (check, inspect, compare, range inheritance, the FP16 pass and
    the attention tests read it); placement works on graphsurgeon, whose tensors link both ways already. Build a
    new one after the graph changes.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.producers = {o: n for n in graph.node for o in n.output if o}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):  # a node reading a tensor twice is one consumer
                if name:
                    self._consumers.setdefault(name, []).append(node)
        self.constants: dict[str, onnx.TensorProto] = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.graph_inputs = {i.name for i in graph.input} - set(self.constants)
        self.graph_outputs = {o.name for o in graph.output}
        self.types = {name: t.data_type for name, t in self.constants.items()}
        self.ranks = {name: len(t.dims) for name, t in self.constants.items()}
        for info in (*graph.input, *graph.value_info, *graph.output):
            if info.type.HasField("tensor_type"):
                self.types.setdefault(info.name, info.type.tensor_type.elem_type)
                if info.type.tensor_type.HasField("shape"):
                    self.ranks.setdefault(info.name, len(info.type.tensor_type.shape.dim))
        self._nonnegative: dict[str, bool] = {}

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self.producers.get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return self._consumers.get(name, [])

    def neighbours(self, node: onnx.NodeProto) -> Iterator[onnx.NodeProto]:
        """The nodes producing ``node``'s inputs, then the nodes reading its outputs."""
        yield from (p for t in node.input if (p := self.producers.get(t)) is not None)
        yield from (c for t in node.output for c in self.consumers(t))

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def elem_type(self, name: str) -> int | None:
        return self.types.get(name)

    def rank(self, name: str) -> int | None:
        """The tensor's rank where the graph declares it (value_info after shape inference), else None."""
        return self.ranks.get(name)

    def nonnegative(self, name: str, *, depth: int = 0) -> bool:
        """Whether every finite value of the tensor is >= 0 by the ops that make it, whatever the data.

        True for outputs of NONNEGATIVE_OPS, of a Clip whose min is a constant >= 0, and of SIGN_KEEPING_OPS whose
        data inputs are all nonnegative (a Relu's output after MaxPool and Reshape).
        """
        if name not in self._nonnegative:
            if depth > 64:  # a long chain of copies: "not known" (and no deep recursion)
                return False
            self._nonnegative[name] = False  # a cycle (a malformed graph) reads as "not known"
            self._nonnegative[name] = self._derive_nonnegative(name, depth)
        return self._nonnegative[name]

    def _derive_nonnegative(self, name: str, depth: int) -> bool:
        node = self.producers.get(name)
        if node is None:  # a graph input (unknown) or a constant (read)
            value = self.value(name)
            return value is not None and value.size > 0 and bool(np.all(value >= 0))
        if node.op_type in NONNEGATIVE_OPS:
            return True
        if node.op_type == "Clip":
            low = next((a.f for a in node.attribute if a.name == "min"), None)  # Clip-1 and Clip-6
            if len(node.input) > 1 and node.input[1]:
                bound = self.small_value(node.input[1], limit=1)
                low = None if bound is None else float(bound.reshape(-1)[0])
            return low is not None and low >= 0.0
        if node.op_type in SIGN_KEEPING_OPS:
            data = [t for t in node.input if t] if node.op_type == "Concat" else node.input[:1]
            return all(self.nonnegative(t, depth=depth + 1) for t in data)
        return False

    def small_value(self, name: str, limit: int = 16) -> np.ndarray | None:
        """A constant's values when it has at most ``limit`` elements (checked on its dims, without loading)."""
        tensor = self.constants.get(name)
        if tensor is None or int(np.prod(tensor.dims, dtype=np.int64)) > limit:
            return None
        return numpy_helper.to_array(tensor)


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order ``graph``'s nodes topologically, in place (Kahn's algorithm: linear, stable for ready nodes)."""
    nodes = list(graph.node)
    made_by = {o: i for i, n in enumerate(nodes) for o in n.output}
    reads = [set(n.input) | subgraph_reads(n) for n in nodes]  # a subgraph may read this graph's tensors
    waiting = [sum(1 for t in r if t in made_by) for r in reads]
    readers: dict[int, list[int]] = {}
    for i, names in enumerate(reads):
        for t in names:
            if t in made_by:
                readers.setdefault(made_by[t], []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    order = []
    for i in ready:  # ``ready`` grows while it is walked: a queue without pops
        order.append(i)
        for j in readers.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def named_subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The node's own subgraphs (If branches, Loop and Scan bodies) with the attribute that holds each."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        for graph in attribute.graphs:
            yield attribute.name, graph


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The node's own subgraphs: If branches, Loop and Scan bodies."""
    for _, graph in named_subgraphs(node):
        yield graph


def every_graph(graph: onnx.GraphProto, where: str = "") -> Iterator[tuple[str, onnx.GraphProto]]:
    """``graph`` and every subgraph in it at any depth, each once, with its path (``If_0/then_branch/``)."""
    yield where, graph
    for node in graph.node:
        for attribute, inner in named_subgraphs(node):
            yield from every_graph(inner, f"{where}{node.name}/{attribute}/")


def every_node(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node of ``graph`` and of the subgraphs in it, with the path of the graph it sits in."""
    for where, inner in every_graph(graph):
        for node in inner.node:
            yield where, node


def nested_nodes(node: onnx.NodeProto) -> Iterator[onnx.NodeProto]:
    """Every node inside the node's subgraphs, at any depth."""
    for subgraph in subgraphs(node):
        for _, inner in every_node(subgraph):
            yield inner


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name the node's subgraphs read, at any depth."""
    return {name for inner in nested_nodes(node) for name in inner.input}


def undefined_inputs(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> list[str]:
    """Node inputs, in this graph and its subgraphs, that nothing defines before they are read: neither a graph
    input, an initializer, an earlier node's output, nor (in a subgraph) a name of the scopes around it."""
    defined = set(outer) | {""} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    missing = []
    for node in graph.node:
        missing += [name for name in node.input if name not in defined]
        for subgraph in subgraphs(node):
            missing += undefined_inputs(subgraph, frozenset(defined))
        defined.update(node.output)
    return missing


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not taken yet; the name is added to ``taken``."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


# Initializers above this size are left out of structure-only copies (shape inference, opset conversion).
SMALL_INITIALIZER_BYTES = 1 << 16


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose large initializers are replaced by typed graph inputs (no weight data).

    ONNX's shape inference and version converter serialise the whole model: this keeps them fast, and working
    on models over 2 GB. :func:`restore_weights` puts the initializers back after a conversion.
    """
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


def restore_weights(converted: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Put back into ``converted`` (a converted structure-only copy) the large initializers of ``original``."""
    present = {i.name for i in converted.graph.initializer}
    large = [i for i in original.graph.initializer if i.name not in present]
    names = {i.name for i in large}
    declared = {i.name for i in original.graph.input}
    inputs = [i for i in converted.graph.input if i.name not in names or i.name in declared]
    del converted.graph.input[:]
    converted.graph.input.extend(inputs)
    converted.graph.initializer.extend(large)
    return converted
