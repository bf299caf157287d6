"""Per-layer sensitivity and automatic float fallback: which quantized layers cost the most output accuracy.

Ranges are calibrated once; each variant of the plan is then materialised and compared with the float model on
the evaluation data (one float session for all of them). The measure is the SQNR of the model's first output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from tqdm import tqdm

from qdq.calibrate.data import Dataset
from qdq.compare import OutputMetrics, compare_models
from qdq.errors import DataError
from qdq.passes.materialize import MaterializeQDQ
from qdq.placement.plan import QuantPlan
from qdq.ranges import TensorRanges
from qdq.runtime import Session
from qdq.scheme import INT8, Scheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSensitivity:
    """One quantized layer: the output SQNR with only it quantized, and with all but it quantized."""

    node: str
    op: str
    only_db: float
    without_db: float


@dataclass(frozen=True)
class SensitivityReport:
    output: str
    all_db: float  # every planned layer quantized
    layers: tuple[LayerSensitivity, ...]  # most sensitive first: the most output noise added (``added_noise``)

    def describe(self) -> str:
        lines = [f"output {self.output}: {self.all_db:.2f} dB with every layer quantized",
                 f"  {'layer':<40} {'op':<14} {'only this':>10} {'all but this':>13} {'gain':>7}"]
        for layer in self.layers:
            lines.append(f"  {layer.node:<40} {layer.op:<14} {layer.only_db:>10.2f} {layer.without_db:>13.2f} "
                         f"{layer.without_db - self.all_db:>+7.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"output": self.output, "all_db": self.all_db, "layers": [vars(x) for x in self.layers]}


def restrict(plan: QuantPlan, quantized: set[str]) -> QuantPlan:
    """The plan with only the nodes in ``quantized`` keeping their Q/DQ."""
    return plan.leaving_float({d.node: ("fallback", "left float by sensitivity analysis")
                               for d in plan.quantized_nodes() if d.node not in quantized})


class Evaluator:
    """Materialises a plan variant and measures the first output's SQNR against the float model."""

    def __init__(self, model: onnx.ModelProto, ranges: TensorRanges, data: Dataset, float_session: Session,
                 weights: str, scheme: Scheme = INT8) -> None:
        self.model, self.ranges, self.data, self.float_session, self.weights = (
            model, ranges, data, float_session, weights)
        self.scheme = scheme

    def __call__(self, plan: QuantPlan) -> float:
        return self.metrics(plan).sqnr_db

    def metrics(self, plan: QuantPlan) -> OutputMetrics:
        ranges = self.ranges.subset(plan.activation_names())
        quantized = MaterializeQDQ(plan, ranges, weights=self.weights, scheme=self.scheme)(self.model).model
        return compare_models(self.float_session, quantized, self.data).outputs[0]


def layer_sensitivity(plan: QuantPlan, evaluate: Evaluator, *, progress: bool = False) -> SensitivityReport:
    """Quantize one layer at a time, and all but one layer at a time; rank layers by the output noise they add."""
    layers = plan.quantized_nodes()
    everything = {d.node for d in layers}
    all_db = evaluate(plan)
    results = []
    for layer in tqdm(layers, desc="sensitivity", unit="layer", disable=None if progress else True, leave=False):
        only = evaluate(restrict(plan, {layer.node}))
        without = evaluate(restrict(plan, everything - {layer.node}))
        results.append(LayerSensitivity(layer.node, layer.op, only, without))
    results.sort(key=lambda r: (-added_noise(r, all_db), r.only_db, r.node))
    output = evaluate.float_session.get_outputs()[0].name
    return SensitivityReport(output, all_db, tuple(results))


def added_noise(layer: LayerSensitivity, all_db: float) -> float:
    """The output noise a layer adds, relative to the signal: the larger of its noise alone and the noise that
    leaving it float removes from the fully quantized model.

    The two agree where the layers' errors add up. Where they do not, either can miss a layer: on PP-OCRv5's
    detector two Convs each read about 16 dB alone, and leaving either float lowers the fully quantized model's
    8.5 dB (their errors partly cancel others'); ranked by what leaving them float gains, they came last, and a
    15 dB target left 53 layers float instead of 3.
    """
    def noise(db: float) -> float:
        return 10 ** (-db / 10)

    return max(noise(layer.only_db), noise(all_db) - noise(layer.without_db))


@dataclass(frozen=True)
class Dominant:
    """A layer whose quantization alone adds ``share`` of the fully quantized model's output noise."""

    node: str
    share: float


def dominant_layer(plan: QuantPlan, evaluate: Evaluator, all_db: float, share: float) -> Dominant | None:
    """The quantized layer adding at least ``share`` (at least a half) of the output noise of ``plan`` fully
    quantized (``all_db``), or None; found by halving the layers, following the noisier half: two evaluations
    per halving, where ranking every layer alone (``layer_sensitivity``) takes one per layer.

    Where errors add up, a layer holding over half the noise always lies in the noisier half. Where they cancel,
    a half can hold less than the layer in it alone; so the search goes down to one layer, whose share alone is
    what counts (a layer alone can add more noise than the whole model makes: 115% on ddddocr's detector).
    """
    part, held = [d.node for d in plan.quantized_nodes()], 1.0
    if len(part) * share < 2:  # fewer layers than twice an even share: one of so few often holds that much
        return None
    total = 10 ** (-all_db / 10)
    while len(part) > 1:
        halves = (part[:len(part) // 2], part[len(part) // 2:])
        noises = [10 ** (-evaluate(restrict(plan, set(half))) / 10) for half in halves]
        loudest = int(noises[1] > noises[0])
        part, held = halves[loudest], noises[loudest] / total
    return Dominant(part[0], held) if held >= share else None


@dataclass(frozen=True)
class Goal:
    """What the fallback must reach: a first-output SQNR in dB, or at most a top-1 agreement drop in percent."""

    min_sqnr_db: float | None = None
    max_top1_drop: float | None = None

    def met(self, metrics: OutputMetrics) -> bool:
        if self.min_sqnr_db is not None and metrics.sqnr_db < self.min_sqnr_db:
            return False
        if self.max_top1_drop is not None:
            if metrics.top1_agreement is None:
                raise DataError(f"a top-1 target needs a [batch, classes] first output; {metrics.name} is not one")
            return 100 * (1 - metrics.top1_agreement) <= self.max_top1_drop
        return True

    def describe(self, metrics: OutputMetrics) -> str:
        parts = [f"{metrics.sqnr_db:.2f} dB"]
        if metrics.top1_agreement is not None:
            parts.append(f"top-1 agreement {100 * metrics.top1_agreement:.2f}%")
        return ", ".join(parts)

    def __str__(self) -> str:
        wanted = ([f"{self.min_sqnr_db:g} dB"] if self.min_sqnr_db is not None else []) + (
            [f"a top-1 drop of at most {self.max_top1_drop:g}%"] if self.max_top1_drop is not None else [])
        return " and ".join(wanted)


@dataclass(frozen=True)
class Fallback:
    plan: QuantPlan
    left_float: tuple[str, ...]
    before: str
    after: str
    met: bool


def fall_back(plan: QuantPlan, evaluate: Evaluator, goal: Goal, *, progress: bool = False) -> Fallback:
    """Leave the most sensitive layers float (the order of ``layer_sensitivity``), one more at a time, until
    ``goal`` is met on the evaluation data; then quantize again, last first, each of them the goal can do without.

    The second step matters because errors of layers can cancel: leaving one float can lower the SQNR until its
    partner is float too, and a layer that helped early can be unneeded once a later one is float.
    """
    first = evaluate.metrics(plan)
    if goal.met(first):
        return Fallback(plan, (), goal.describe(first), goal.describe(first), True)
    ranking = layer_sensitivity(plan, evaluate, progress=progress)
    quantized = {d.node for d in plan.quantized_nodes()}
    left: list[str] = []
    current, metrics = plan, first
    for layer in ranking.layers:
        left.append(layer.node)
        current = restrict(plan, quantized - set(left))
        metrics = evaluate.metrics(current)
        log.info("left %s float: %s", layer.node, goal.describe(metrics))
        if goal.met(metrics):
            break
    else:
        return Fallback(current, tuple(left), goal.describe(first), goal.describe(metrics), False)
    for node in reversed(left[:-1]):  # the last one was needed: without it the goal was not met
        trial = restrict(plan, quantized - set(left) | {node})
        if goal.met(measured := evaluate.metrics(trial)):
            log.info("quantized %s again: %s", node, goal.describe(measured))
            left.remove(node)
            current, metrics = trial, measured
    return Fallback(current, tuple(left), goal.describe(first), goal.describe(metrics), True)
