"""``--method auto``: each activation's amax chosen by the error it causes in the layer that reads it.

The histogram methods judge a range by the tensor itself (its KL divergence, its squared error). What matters is
the output of the layer the tensor feeds: a Conv sums thousands of rounded inputs, and clipping a few large inputs
may cost more (or less) there than the tensor's own error suggests. So, per quantized activation:

1. candidates from its histogram: the max, the other methods' choices (TensorRT's and the guarded entropy, MSE,
   percentiles 99.9/99.99/99.999) and a grid of fractions of the max;
2. on a bounded sample of the calibration data (the first ``AUTO_SAMPLES`` samples, kept as model inputs while the
   histograms are collected), each consuming layer (Conv/ConvTranspose/Gemm/MatMul) runs alone in ONNX Runtime
   (optimisations off) on the float input and on the input quantized with each candidate, with its weights
   quantized as they will be; the error of its output against the float layer (float input, float weights),
   relative to that output's energy, is summed over the tensor's consumers. A consumer without a weight (a
   residual Add, a pooling) is followed, with whatever it leads to, up to the weighted layers it reaches (at most
   ``REGION_NODES`` nodes): the tensor alone is quantized, every other input of that region stays float, and the
   error is read at the region's ends. A residual's skip input carries its error straight to the next block and
   on to the classifier, unlike anything its own error says (the digits CNN: 41.20 → 42.89 dB by this alone).
   Where that region cannot run alone, the tensor's own relative squared error counts;
3. the candidate with the least error wins (the larger amax among equals).

Streaming: one batch of the exposed tensors (at most ``max_tensors_per_pass`` at a time) is alive at once, and
each candidate's error is reduced to a sum as soon as it is computed. Cost: one extra inference over the sample,
plus every consuming layer run once per candidate on it (all candidates stacked into one run where the layer
reads nothing else that varies with the sample).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.calibrate.data import Batch, Dataset
from qdq.calibrate.histogram import Histogram
from qdq.calibrate.methods import amax_entropy, amax_entropy_guarded, amax_mse, amax_percentile
from qdq.errors import DataError
from qdq.graph import GraphIndex, subgraphs
from qdq.model_io import first_line
from qdq.ops import WEIGHTED_OPS
from qdq.placement import QuantPlan
from qdq.runtime import Session, make_session, session_exposing
from qdq.scheme import INT8, Scheme, weight_amax

log = logging.getLogger(__name__)

AUTO_SAMPLES = 128  # calibration samples the candidates are scored on (their inputs are kept)
GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # fractions of the max
PERCENTILES = (99.9, 99.99, 99.999)
STACK_ELEMENTS = 1 << 22  # at most this many input values (16 MB) per stacked run of candidates
# A consumer without a weight is followed to the weighted layers it leads to, through at most this many nodes (a
# residual trunk can reach far: where the walk stops, the tensors it reached are scored).
REGION_NODES = 64


@dataclass(frozen=True)
class Candidate:
    amax: float
    method: str


def candidates(hist: Histogram, scheme: Scheme = INT8) -> list[Candidate]:
    """The thresholds auto chooses among, largest first; one per distinct scale (the first name kept)."""
    found = [Candidate(hist.amax, "max"), Candidate(amax_entropy(hist), "entropy"),
             Candidate(amax_entropy_guarded(hist), "entropy-guarded"), Candidate(amax_mse(hist, scheme=scheme), "mse")]
    found += [Candidate(amax_percentile(hist, p), f"percentile {p:g}") for p in PERCENTILES]
    found += [Candidate(f * hist.amax, f"{f:g} x max") for f in GRID]
    unique: dict[float, Candidate] = {}
    for c in found:
        unique.setdefault(float(scheme.scale(c.amax)), Candidate(float(np.float32(c.amax)), c.method))
    return sorted(unique.values(), key=lambda c: -c.amax)


def fake_quantize(x: np.ndarray, amax: float, scheme: Scheme = INT8) -> np.ndarray:
    """What QuantizeLinear then DequantizeLinear compute, per tensor."""
    scale = scheme.scale(amax)
    return scheme.quantize(x, scale, None).astype(np.float32) * scale


class Recording:
    """A Dataset that passes its batches through and keeps the first ``limit`` samples' model inputs."""

    def __init__(self, data: Dataset, limit: int) -> None:
        self.data, self.limit, self.kept = data, limit, []
        self.name = data.name

    def runs(self) -> int | None:
        return self.data.runs()

    def rereadable(self) -> bool:
        return self.data.rereadable()

    def __iter__(self) -> Iterator[Batch]:
        kept, samples = [], 0
        for batch in self.data:
            if samples < self.limit:
                kept.append(Batch({k: np.array(v) for k, v in batch.feeds.items()}, batch.samples))
                samples += batch.samples
            yield batch
        self.kept = kept


def first_samples(data: Dataset, limit: int) -> list[Batch]:
    """The first batches of ``data`` holding ``limit`` samples (at least one batch); reads the data again."""
    return list(data.head(limit))


class LayerProbe:
    """Nodes cut out of the model: a float session and one with their planned weights quantized (optimisations
    off); outputs ``outputs``."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex, nodes: list[onnx.NodeProto], outputs: list[str],
                 quantized_weights: dict[str, int | None], scheme: Scheme) -> None:
        self.nodes, self.outputs = nodes, outputs
        made = {o for n in nodes for o in n.output}
        read = dict.fromkeys(i for n in nodes for i in n.input if i and i not in made)
        initializers = {t.name: t for t in model.graph.initializer}
        self.inputs = [name for name in read if name not in initializers]
        types = [index.elem_type(name) for name in self.inputs]
        if len(nodes) > 1 and None in types:  # fed as float, an integer tensor would fail mid-run, not here
            raise ValueError(f"no type known for {self.inputs[types.index(None)]!r}")
        self.types = [t or onnx.TensorProto.FLOAT for t in types]
        used = [initializers[name] for name in read if name in initializers]
        self.float = self.session(model, used)
        quantized = [fake_quantized_weight(t, quantized_weights[t.name], scheme) if t.name in quantized_weights else t
                     for t in used]
        self.quantized = self.session(model, quantized)
        # The candidates can be stacked along the batch axis into one run when a single layer reads nothing else
        # that varies with the sample and that axis comes first (not Gemm's transA).
        transposed = any(a.name == "transA" and a.i for a in nodes[0].attribute)
        self.stackable = len(nodes) == 1 and self.inputs == [nodes[0].input[0]] and not transposed

    def session(self, model: onnx.ModelProto, weights: list[onnx.TensorProto]) -> Session:
        graph = onnx.helper.make_graph(
            self.nodes, "probe", [onnx.helper.make_tensor_value_info(n, t, None)
                                  for n, t in zip(self.inputs, self.types, strict=True)],
            [onnx.helper.make_empty_tensor_value_info(o) for o in self.outputs], initializer=weights)
        probe = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        return make_session(probe, optimize=False, what=f"node {self.nodes[0].name!r} and what follows it")


def fake_quantized_weight(tensor: onnx.TensorProto, axis: int | None, scheme: Scheme) -> onnx.TensorProto:
    """The weight as DequantizeLinear will give it to its layer: per-channel max, rounded to the scheme."""
    values = numpy_helper.to_array(tensor).astype(np.float32)
    scale = scheme.scale(weight_amax(values, axis))
    dequantized = scheme.quantize(values, scale, axis).astype(np.float32)
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = -1
    return numpy_helper.from_array(dequantized * scale.reshape(shape), tensor.name)


@dataclass
class Score:
    """Per candidate: the squared error summed over the sample, per scored output (a consuming layer's, each end of
    a region, or the tensor itself); and each output's energy."""

    errors: np.ndarray  # [outputs, candidates]
    energy: np.ndarray  # [outputs]

    def relative(self) -> np.ndarray:
        return (self.errors / np.maximum(self.energy, 1e-30)[:, None]).sum(axis=0)


def choose(model: onnx.ModelProto, plan: QuantPlan, histograms: dict[str, Histogram], sample: list[Batch],
           group_size: int | None, scheme: Scheme = INT8) -> tuple[dict[str, float], dict[str, str]]:
    """The amax of each tensor in ``histograms`` and the candidate method that gave it (see the module doc)."""
    started = time.perf_counter()
    if not sample:
        raise DataError("--method auto: no calibration samples to score the candidates on")
    uses = plan.activations()
    weights = {(d.node, q.tensor): q.axis for d in plan.decisions for q in d.inputs if q.kind == "weight"}
    nodes = {n.name: n for n in model.graph.node}
    index = GraphIndex(model)
    graph_inputs = {i.name for i in model.graph.input}
    options = {name: candidates(hist, scheme) for name, hist in histograms.items()}
    probes: dict[str, LayerProbe | None] = {}
    amax, chosen = {}, {}
    names = list(histograms)
    for start in range(0, len(names), group_size or max(len(names), 1)):
        group = names[start:start + (group_size or len(names))]
        consumers = {name: consuming_nodes(name, uses, nodes) for name in group}
        for node in {n.name: n for c in consumers.values() for n in c}.values():
            if node.name not in probes:
                probes[node.name] = make_probe(model, index, node, weights, scheme)
        needed = list(dict.fromkeys([*group, *(i for c in consumers.values() for n in c if probes[n.name]
                                               for i in probes[n.name].inputs)]))
        exposed = [n for n in needed if n not in graph_inputs]
        session = session_exposing(model, exposed, what="the model prepared for calibration") if exposed else None
        rows = {name: sum(len(probes[n.name].outputs) if probes[n.name] else 1 for n in consumers[name]) or 1
                for name in group}
        scores = {name: Score(np.zeros((rows[name], len(options[name]))), np.zeros(rows[name])) for name in group}
        for batch in sample:
            values = dict(zip(exposed, session.run(exposed, batch.feeds), strict=True)) if session else {}
            values |= {n: batch.feeds[n] for n in needed if n in graph_inputs}
            for name in group:
                score_batch(scores[name], values, name, options[name], [probes[n.name] for n in consumers[name]],
                            scheme)
        for name in group:
            relative = scores[name].relative()
            best = options[name][int(np.argmin(np.where(np.isfinite(relative), relative, np.inf)))]
            amax[name], chosen[name] = best.amax, f"auto: {best.method}"
    log.info("auto: chose %d ranges by their consumers' output error on %d samples in %.1f s", len(amax),
             sum(b.samples for b in sample), time.perf_counter() - started)
    return amax, chosen


def consuming_nodes(name: str, uses: dict[str, list[tuple[str, int]]], nodes: dict[str, onnx.NodeProto]
                    ) -> list[onnx.NodeProto]:
    return [nodes[n] for n in dict.fromkeys(node for node, _ in uses.get(name, []))]


def region(node: onnx.NodeProto, index: GraphIndex, order: list[onnx.NodeProto]
           ) -> tuple[list[onnx.NodeProto], list[str]]:
    """``node`` and what follows it up to the next weighted layers (included), at most ``REGION_NODES`` nodes, in
    graph order; and the tensors where it ends (a layer's output, a graph output, a tensor read outside it)."""
    found: dict[str, onnx.NodeProto] = {}  # by name: the prepared model's node names are unique
    frontier = [node]
    while frontier and len(found) < REGION_NODES:
        n = frontier.pop(0)
        if n.name not in found:
            found[n.name] = n
            if n.op_type not in WEIGHTED_OPS:
                frontier += [r for o in n.output for r in index.consumers(o)]
    nodes = [n for n in order if n.name in found]
    ends = [o for n in nodes for o in n.output if o and (n.op_type in WEIGHTED_OPS or o in index.graph_outputs or any(
        r.name not in found for r in index.consumers(o)))]
    return nodes, list(dict.fromkeys(ends))


def make_probe(model: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto,
               weights: dict[tuple[str, str], int | None], scheme: Scheme) -> LayerProbe | None:
    """A probe for a weighted layer, or for another consumer and what follows it up to the next weighted layers;
    None where that cannot run alone (the tensor is then scored by its own error)."""
    if node.op_type in WEIGHTED_OPS:
        nodes, ends = [node], [node.output[0]]
    else:
        nodes, ends = region(node, index, model.graph.node)
    if any(next(subgraphs(n), None) is not None for n in nodes):
        return None
    names = {n.name for n in nodes}
    mine = {tensor: axis for (owner, tensor), axis in weights.items() if owner in names}
    try:
        return LayerProbe(model, index, nodes, ends, mine, scheme)
    except Exception as exc:  # nodes ORT will not run alone (missing types): fall back to the tensor's own error
        log.debug("auto: node %r scored by its input's own error (%s)", node.name, first_line(exc))
        return None


def score_batch(score: Score, values: dict[str, np.ndarray], name: str, options: list[Candidate],
                probes: list[LayerProbe | None], scheme: Scheme) -> None:
    """Add one batch's squared errors, per probe output and candidate."""
    x = values[name]
    if not np.isfinite(x).all():
        x = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    row = 0
    for probe in probes or [None]:
        if probe is None:
            score.energy[row] += float(np.square(x, dtype=np.float64).sum())
            for k, c in enumerate(options):
                error = fake_quantize(x, c.amax, scheme) - x
                score.errors[row, k] += float(np.square(error, dtype=np.float64).sum())
            row += 1
            continue
        feeds = {i: values[i] for i in probe.inputs}
        feeds[name] = x
        reference = [r.astype(np.float64) if r.dtype.kind == "f" and np.isfinite(r).all() else None
                     for r in probe.float.run(None, feeds)]
        for j, ref in enumerate(reference):
            if ref is not None:
                score.energy[row + j] += float(np.square(ref).sum())
        # Each candidate's outputs are reduced to sums at once: a region's outputs can be large.
        if probe.stackable and x.ndim >= 2 and reference[0] is not None:
            step = max(1, STACK_ELEMENTS // max(x.size, 1))
            for lo in range(0, len(options), step):
                part = options[lo:lo + step]
                stacked = np.concatenate([fake_quantize(x, c.amax, scheme) for c in part])
                for k, output in enumerate(np.split(probe.quantized.run(None, {name: stacked})[0], len(part))):
                    score.errors[row, lo + k] += float(np.square(output - reference[0]).sum())
        else:
            for k, c in enumerate(options):
                outputs = probe.quantized.run(None, {**feeds, name: fake_quantize(x, c.amax, scheme)})
                for j, ref in enumerate(reference):
                    if ref is not None:
                        score.errors[row + j, k] += float(np.square(outputs[j] - ref).sum())
        row += len(reference)
