"""If branches quantized as models of their own, on the calibration runs that take them.

ONNX Runtime exposes no tensor inside a subgraph, and placement sees one graph. A branch of an If is a model,
though, once the names it reads from the scopes around it become its inputs (the constants among them: its
initializers). ``quantize`` then prepares, places, calibrates and corrects it like any model, on the values
those names have in the calibration runs whose condition chooses the branch, and the quantized graph goes back
into the If, reading those names from outside again. An If inside a branch is the same, one level down. Silero
VAD's exports put their network in Ifs on the sample rate (v5: all of it, in both branches; v6: the LSTM cell).

Left float, each with a note: a branch no calibration run takes (its tensors would have no range), Loop and Scan
bodies (a run does not split into their iterations), and every branch when there is no calibration data or it
is a one-shot iterator (the branches read it again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from qdq.calibrate.data import Dataset
from qdq.config import QuantizeConfig
from qdq.errors import DataError, ModelError, QdqError
from qdq.graph import fresh_name, subgraphs, undefined_inputs
from qdq.model_io import first_line
from qdq.ops import WEIGHTED_OPS
from qdq.ranges import TensorRanges
from qdq.runtime import session_exposing

if TYPE_CHECKING:
    from qdq.quantize import QuantizeResult

log = logging.getLogger(__name__)

BRANCHES = ("then_branch", "else_branch")


@dataclass(frozen=True)
class Branch:
    """One branch of a top-level If, and the names it reads from the graph around it."""

    node: str
    attribute: str  # then_branch or else_branch
    reads: tuple[str, ...]  # computed tensors and graph inputs: the inputs of the branch as a model
    constants: tuple[str, ...]  # initializers of the graph around it: the branch model's initializers

    @property
    def where(self) -> str:
        return f"If {self.node!r} {self.attribute.replace('_', ' ')}"

    def taken(self, condition: np.ndarray) -> bool:
        return bool(np.asarray(condition).reshape(-1)[0]) == (self.attribute == "then_branch")


def find_branches(model: onnx.ModelProto) -> list[Branch]:
    initializers = {t.name for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "If":
            continue
        for attribute in node.attribute:
            if attribute.name in BRANCHES:
                reads = outer_reads(attribute.g)
                found.append(Branch(node.name, attribute.name, tuple(n for n in reads if n not in initializers),
                                    tuple(n for n in reads if n in initializers)))
    return found


def layers_in(graph: onnx.GraphProto) -> bool:
    """Whether ``graph``, or a subgraph in it, holds a layer qdq quantizes."""
    return any(n.op_type in WEIGHTED_OPS or any(layers_in(g) for g in subgraphs(n)) for n in graph.node)


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """The names ``graph`` (and the subgraphs in it) reads from the scopes around it, in order of first use."""
    defined = defined_names(graph)
    return list(dict.fromkeys([*undefined_inputs(graph), *(o.name for o in graph.output if o.name not in defined)]))


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Every name ``graph`` defines, in it and in the subgraphs inside it."""
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        names.update(o for o in node.output if o)
        for inner in subgraphs(node):
            names |= defined_names(inner)
    return names


def quantize_branches(prepared: onnx.ModelProto, quantized: onnx.ModelProto, data: Dataset | None,
                      config: QuantizeConfig, given: TensorRanges | None, quantize: Callable[..., QuantizeResult]
                      ) -> tuple[list[tuple[Branch, QuantizeResult]], list[str]]:
    """Each top-level If branch of ``prepared`` that calibration runs take, quantized (``quantize``: qdq's own,
    passed in because it is the caller), and written into the same If of ``quantized`` (edited in place).

    ``prepared`` is the float model the branches' inputs are computed with. Returns (branch, its
    QuantizeResult) for each branch quantized, and notes.
    """
    done, notes = [], []
    for branch, model, runs in branch_models(prepared, data, notes):
        known = [] if given is None else sorted(defined_names(model.graph) & given.names())
        try:
            # FP32 inside: the FP16 pass rewrites a model's inputs, which here are the If's outer names. One
            # process: the branch's runs come from a session in this one, which shards cannot take along.
            with silenced(logging.getLogger("qdq")):  # its notes come back below, saying which branch they are about
                result = quantize(model, runs, config=dataclasses.replace(
                    config, target_sqnr=None, max_top1_drop=None, high_precision="fp32", workers=1,
                    ray_address=None), ranges=given.subset(known) if known else None)
        except QdqError as exc:  # a branch left float is always a valid model; the rest goes on
            notes.append(f"{branch.where} left float: {first_line(exc)}")
            continue
        if not result.report.quantized_nodes:
            notes.append(f"{branch.where}: nothing to quantize in it")
            continue
        put_back(quantized, branch, result.model)
        done.append((branch, result))
        notes.append(f"{branch.where}, on the {len(runs)} calibration runs that take it: quantized "
                     f"{result.report.quantized_nodes} of {result.report.total_nodes} nodes")
        notes += [f"{branch.where}: {note}" for note in result.report.notes]
    for note in notes:
        log.info("%s", note)
    return done, notes


def calibrate_branches(prepared: onnx.ModelProto, data: Dataset | None, config: QuantizeConfig,
                       calibrate: Callable[..., TensorRanges]) -> tuple[list[TensorRanges], list[str]]:
    """The ranges of each top-level If branch's tensors that ``quantize`` would quantize, as ``calibrate`` (qdq's
    own, the caller) finds them on the runs that take the branch; and notes. For ``qdq ranges``."""
    found, notes = [], []
    for branch, model, runs in branch_models(prepared, data, notes):
        try:
            with silenced(logging.getLogger("qdq")):
                found.append(calibrate(model, runs, config=dataclasses.replace(config, workers=1, ray_address=None)))
        except QdqError as exc:
            notes.append(f"{branch.where} has no ranges: {first_line(exc)}")
    for note in notes:
        log.info("%s", note)
    return found, notes


def branch_models(prepared: onnx.ModelProto, data: Dataset | None, notes: list[str]
                  ) -> Iterator[tuple[Branch, onnx.ModelProto, BranchRuns]]:
    """Each top-level If branch that calibration runs take, as a model and the runs for it; why the others are left
    out goes into ``notes``."""
    branches = []
    for branch in find_branches(prepared):
        if layers_in(graph_of(prepared, branch)):
            branches.append(branch)
        else:  # not built as a model, and no run of the data for it
            notes.append(f"{branch.where}: nothing to quantize in it (no Conv, ConvTranspose, Gemm or MatMul)")
    if not branches:
        return
    if data is None or not data.rereadable():
        why = "no calibration data" if data is None else f"{data.name} is a one-shot iterator, read once already"
        notes.append(f"{len(branches)} If branches left float: {why} (give a file, a folder or a list to quantize "
                     "them)")
        return
    try:
        probe = BranchProbe(prepared, branches)
        counts = probe.count(data)
    except QdqError as exc:
        notes.append(f"{len(branches)} If branches left float: {first_line(exc)}")
        return
    for branch in branches:
        if not counts[branch]:
            notes.append(f"{branch.where} left float: no calibration run takes it")
            continue
        try:
            outputs = [o.name for o in graph_of(prepared, branch).output]
            model = branch_model(prepared, branch, probe.types([*branch.reads, *outputs]))
        except QdqError as exc:
            notes.append(f"{branch.where} left float: {first_line(exc)}")
            continue
        yield branch, model, BranchRuns(probe, data, branch, counts[branch])


@contextlib.contextmanager
def silenced(logger: logging.Logger) -> Iterator[None]:
    """``logger`` quiet but for errors, for the duration."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class BranchProbe:
    """The float model cut down to what the Ifs' conditions and the branches' inputs need, in one session."""

    def __init__(self, model: onnx.ModelProto, branches: list[Branch]) -> None:
        self.model = model
        nodes = {n.name: n for n in model.graph.node}
        self.conditions = {b: nodes[b.node].input[0] for b in branches}
        self.constants = {c: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                          for c in self.conditions.values() if t.name == c}
        # Where a branch's outputs have no shape (a subgraph's need none), the If's outputs show their types:
        # (the branch's output, the If's) by position.
        self.outputs: dict[Branch, list[tuple[str, str]]] = {}
        for b in branches:
            outputs = graph_of(model, b).output
            if any(not o.type.tensor_type.HasField("shape") for o in outputs):
                self.outputs[b] = list(zip((o.name for o in outputs), nodes[b.node].output, strict=False))
        self.inputs = Exposed(model, [*self.conditions.values(), *(n for b in branches for n in b.reads)])
        self.seen: dict[str, np.ndarray] = {}  # one value per name, for its type

    def values(self, feeds: dict[str, np.ndarray], exposed: Exposed | None = None) -> dict[str, np.ndarray]:
        return {**feeds, **self.constants, **(exposed or self.inputs).run(feeds)}

    def count(self, data: Dataset) -> dict[Branch, int]:
        """How many runs of ``data`` take each branch; the types of what the taken branches read and give."""
        exposed = Exposed(self.model, [*self.inputs.names, *(n for pairs in self.outputs.values() for _, n in pairs)]
                          ) if self.outputs else self.inputs
        counts = dict.fromkeys(self.conditions, 0)
        for batch in data:
            values = self.values(batch.feeds, exposed)
            for branch, condition in self.conditions.items():
                if branch.taken(values[condition]):
                    counts[branch] += 1
                    for name, source in [*((n, n) for n in branch.reads), *self.outputs.get(branch, [])]:
                        self.seen.setdefault(name, values[source])
        return counts

    def types(self, names: list[str]) -> dict[str, tuple[int, int]]:
        """Per name seen in the calibration runs: (ONNX element type, rank)."""
        return {n: (onnx.helper.np_dtype_to_tensor_dtype(self.seen[n].dtype), self.seen[n].ndim)
                for n in names if isinstance(self.seen.get(n), np.ndarray)}


class Exposed:
    """The computed tensors among ``names``, by a session of just the nodes they need (unoptimised)."""

    def __init__(self, model: onnx.ModelProto, names: list[str]) -> None:
        given = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
        self.names = [n for n in dict.fromkeys(names) if n not in given]
        part = needed_part(model, self.names)
        self.feeds = [i.name for i in part.graph.input]
        self.session = session_exposing(part, self.names, optimize=False, what="the float model, for the If "
                                        "branches' inputs") if self.names else None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            return {}
        try:
            values = self.session.run(self.names, {n: feeds[n] for n in self.feeds})
        except Exception as exc:  # ORT's own error types
            raise DataError(f"ONNX Runtime failed computing the If branches' inputs: {first_line(exc)}") from exc
        return dict(zip(self.names, values, strict=True))


class BranchRuns:
    """The calibration runs whose condition takes ``branch``, as the branch model's feeds; read as often as the
    data (the float model's part that computes them runs again each time: nothing is kept)."""

    def __init__(self, probe: BranchProbe, data: Dataset, branch: Branch, runs: int) -> None:
        self.probe, self.data, self.branch, self.runs = probe, data, branch, runs

    def __len__(self) -> int:
        return self.runs

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        condition = self.probe.conditions[self.branch]
        for batch in self.data:
            values = self.probe.values(batch.feeds)
            if self.branch.taken(values[condition]):
                yield {name: values[name] for name in self.branch.reads}


def needed_part(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The nodes of ``model`` that ``names`` depend on (a node's subgraphs' reads count as its inputs), with the
    initializers and graph inputs they read; weights are shared with nothing: copied only if read."""
    producers = {o: n for n in model.graph.node for o in n.output}
    wanted, stack, seen = [], list(names), set()
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        wanted.append(node)
        stack += [*node.input, *(n for g in subgraphs(node) for n in outer_reads(g))]
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    nodes = sorted(wanted, key=lambda n: order[id(n)])
    read = {i for n in nodes for i in n.input} | {i for n in nodes for g in subgraphs(n) for i in outer_reads(g)}
    graph = onnx.helper.make_graph(nodes, "needed", [i for i in model.graph.input if i.name in read], [],
                                   [t for t in model.graph.initializer if t.name in read])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def graph_of(model: onnx.ModelProto, branch: Branch) -> onnx.GraphProto:
    node = next(n for n in model.graph.node if n.name == branch.node)
    return next(a.g for a in node.attribute if a.name == branch.attribute)


def branch_model(model: onnx.ModelProto, branch: Branch, types: dict[str, tuple[int, int]]) -> onnx.ModelProto:
    """The branch as a model: what it reads from outside becomes its inputs (any shape of the seen rank) and its
    initializers (the constants)."""
    graph = onnx.GraphProto()
    graph.CopyFrom(graph_of(model, branch))
    initializers = {t.name: t for t in model.graph.initializer}
    if untyped := [name for name in branch.reads if name not in types]:
        raise ModelError(f"it reads {untyped[0]!r} from outside, which is not a tensor (a sequence or optional)")
    graph.input.extend(onnx.helper.make_tensor_value_info(name, types[name][0], [None] * types[name][1])
                       for name in branch.reads)
    graph.initializer.extend(initializers[name] for name in branch.constants)
    graph.name = f"{branch.node}.{branch.attribute}"
    typed = [v for v in graph.value_info if v.type.tensor_type.HasField("shape")]
    del graph.value_info[:]  # a subgraph may list names without types or shapes; a model may not
    graph.value_info.extend(typed)
    for output in graph.output:
        if not output.type.tensor_type.HasField("shape"):  # the type the If's output had in the runs
            if output.name not in types:
                raise ModelError(f"the type of its output {output.name!r} is unknown")
            output.CopyFrom(onnx.helper.make_tensor_value_info(output.name, types[output.name][0],
                                                               [None] * types[output.name][1]))
    out = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    out.producer_name = model.producer_name
    return out


def put_back(model: onnx.ModelProto, branch: Branch, quantized: onnx.ModelProto) -> None:
    """Write the quantized branch model's graph into ``model``'s If, edited in place.

    Its inputs go (the names resolve to the graph around it again); an initializer copied in from outside and
    left as it was goes too. A name it defines that the rest of the model also defines is renamed: ONNX names
    are unique across a model and its subgraphs.
    """
    graph = onnx.GraphProto()
    graph.CopyFrom(quantized.graph)
    del graph.input[:]
    outside = {t.name: t for t in model.graph.initializer}
    kept = [t for t in graph.initializer if t.name not in outside or t.SerializeToString() !=
            outside[t.name].SerializeToString()]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    node = next(n for n in model.graph.node if n.name == branch.node)
    attribute = next(a for a in node.attribute if a.name == branch.attribute)
    attribute.g.Clear()  # its old names are not "elsewhere"
    elsewhere = defined_names(model.graph)
    taken = elsewhere | defined_names(graph) | set(outer_reads(graph))
    clashes = {name: fresh_name(name, taken) for name in sorted(defined_names(graph) & elsewhere)}
    if clashes:
        rename(graph, clashes)
    attribute.g.CopyFrom(graph)


def rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename names ``graph`` defines, their definitions and every use, in it and the subgraphs in it."""
    for collection in (graph.initializer, graph.input, graph.output, graph.value_info):
        for item in collection:
            item.name = mapping.get(item.name, item.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for inner in subgraphs(node):
            rename(inner, mapping)
