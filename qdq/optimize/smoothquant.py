"""SmoothQuant: move activation outliers of a LayerNorm's output into the weights of the layers it feeds.

A LayerNorm's output often has a few channels far larger than the rest, and one per-tensor activation scale
then wastes most of its 255 levels on them. Dividing channel ``j`` by ``s_j`` (folded into the LayerNorm's
scale and bias) and multiplying row ``j`` of every consuming weight by ``s_j`` leaves the float model exactly
as it was (Xiao et al., 2023); with ``s_j = max|X_j|^α / max|W_j|^(1−α)`` the activation gets flatter and the
weights (quantized per output channel) absorb the difference. ``α`` is chosen per activation, among a few
values and "no migration", by the consuming layers' output error on calibration rows with both sides quantized
(activation amax = its max, weights per channel as the plan says).

Applies to every activation that quantized MatMul/Gemm layers with constant weights read, as Intel NNCF's
transformer mode does: a pre-norm LayerNorm's output takes the division in its scale and bias; anything else (a
post-norm LayerNorm that a residual also reads, a GELU output, an attention context) gets a ``Mul(1/s)`` on the
branch to the layers, where the activation is a sequence of rows (rank 3 or more).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.calibrate.data import Dataset, per_sample
from qdq.config import QuantizeConfig
from qdq.errors import DataError
from qdq.graph import fresh_name
from qdq.model_io import first_line
from qdq.optimize.bias_correction import new_constant, taken_names
from qdq.optimize.layers import Layer, find_layers
from qdq.placement.plan import QuantPlan
from qdq.runtime import session_exposing
from qdq.scheme import symmetric_scale, weight_amax

log = logging.getLogger(__name__)

ALPHAS = (0.3, 0.5, 0.65, 0.8, 0.95, 1.0)
SAMPLE_ROWS = 2048
# A Mul site (anything but a LayerNorm that absorbs the division) needs this many calibration samples: its channel
# maxima from 8 are not those of new data. A GRU's output (corpus gru_kws, 8 samples) had a channel 5x above its
# calibration maximum on held-out data; alpha 0.5 looked better on both halves of the 8 and lost 20 dB. LayerNorm
# outputs are normalised per row, and their maxima hold up (the corpus transformers keep their floors).
MIN_SAMPLES = 32  # calibration rows per LayerNorm kept for choosing alpha (a seeded random subset)


@dataclass(frozen=True)
class Site:
    """An activation read by quantized layers, where its division by the factors goes, and those layers.

    ``constants`` set: the tensor is a LayerNorm's output read only by the layers, and the division goes into the
    LayerNorm's scale and bias (no new op). Otherwise a ``Mul`` by ``1/s`` on the branch to the layers divides it;
    ``others`` (a post-norm residual, say) keep reading the unscaled tensor.
    """

    norm: str  # the producing node (a LayerNorm's name when ``constants`` is set)
    output: str
    layers: tuple[Layer, ...]
    constants: tuple[tuple[str, int], ...] = ()  # (node name, input slot) of the LayerNorm's scale and bias
    others: tuple[str, ...] = ()

    @property
    def needs_mul(self) -> bool:
        return not self.constants


def smoothing_sites(model: onnx.ModelProto, plan: QuantPlan) -> tuple[list[Site], list[str]]:
    """Where SmoothQuant applies, and each activation where it does not with the reason.

    A site is an activation that quantized MatMul/Gemm layers read as their first input, with constant weights.
    Its division goes into a LayerNorm when one makes it and nothing else reads it: a LayerNormalization over the
    last axis, or, as exporters for opsets below 17 write it, a ``Mul`` by a per-channel constant (γ) followed by
    an ``Add`` of one (β) at the end of the decomposition. Anywhere else (a post-norm LayerNorm that a residual
    also reads, a GELU, an attention context) it needs a ``Mul`` on the branch to the layers.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    nodes = {n.name: n for n in model.graph.node}
    grouped: dict[str, list[Layer]] = {}
    for layer in find_layers(model, plan)[0]:
        if layer.op in ("MatMul", "Gemm"):
            grouped.setdefault(nodes[layer.node].input[0], []).append(layer)
    constants = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    quantized_readers = {d.node for d in plan.quantized_nodes()}
    outputs = {o.name for o in model.graph.output}
    sites, skipped = [], []
    for tensor, own in grouped.items():
        producer = producers.get(tensor)
        name = producer.name if producer is not None else tensor
        found = norm_constants(producer, constants, producers, readers) if producer is not None else None
        if found is not None:
            name = found[0]
        own_names = {layer.node for layer in own}
        others = tuple(u.name for u in readers.get(tensor, []) if u.name not in own_names)
        if producer is None:
            why = "a graph input"
        elif tensor in outputs:
            why = "its output is a graph output"
        elif planned := [o for o in others if o in quantized_readers]:
            why = f"its output is also quantized for {planned[0]}, which would see the scaled tensor"
        elif shared := [layer.weight for layer in own if len(readers.get(layer.weight, [])) > 1]:
            why = f"weight {shared[0]} is shared with other nodes"
        else:
            why = ""
        if why:
            skipped.append(f"{name}: {why}")
        elif found is not None and not found[2] and not others:
            sites.append(Site(name, tensor, tuple(own), found[1]))
        else:
            sites.append(Site(name, tensor, tuple(own), (), others))
    return sites, skipped


def norm_constants(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto],
                   readers: dict[str, list[onnx.NodeProto]]) -> tuple[str, tuple[tuple[str, int], ...], str] | None:
    """If ``node`` ends a LayerNorm: its name, the (node, slot) constants to divide, and why not, if not."""
    if node.op_type == "LayerNormalization":
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        slots = tuple((node.name, i) for i in (1, 2) if len(node.input) > i and node.input[i])
        if axis != -1:
            return node.name, slots, "normalises more than the last axis"
        if any(node.input[i] not in constants for _, i in slots):
            return node.name, slots, "its scale or bias is not a constant"
        return node.name, slots, ""
    if node.op_type != "Add":
        return None
    beta = per_channel_slot(node, constants)
    scale_node = producers.get(node.input[1 - beta]) if beta is not None else None
    if scale_node is None or scale_node.op_type != "Mul" or len(readers.get(scale_node.output[0], [])) != 1:
        return None
    gamma = per_channel_slot(scale_node, constants)
    centred = producers.get(scale_node.input[1 - gamma]) if gamma is not None else None
    if centred is None or centred.op_type != "Div":  # (x - mean) / sqrt(var + eps): a decomposed LayerNorm
        return None
    channels = [onnx.numpy_helper.to_array(constants[n.input[i]]).size for n, i in ((node, beta), (scale_node, gamma))]
    if channels[0] != channels[1]:
        return None
    return f"{scale_node.name}+{node.name}", ((scale_node.name, gamma), (node.name, beta)), ""


def per_channel_slot(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> int | None:
    """The input slot holding a 1-D float constant (a per-channel vector over the last axis), if one does."""
    for slot in (0, 1):
        init = constants.get(node.input[slot]) if len(node.input) > slot else None
        if init is not None and len(init.dims) == 1 and init.dims[0] > 1 and init.data_type == onnx.TensorProto.FLOAT:
            return slot
    return None


def smooth(model: onnx.ModelProto, plan: QuantPlan, data: Dataset, config: QuantizeConfig, *,
           branches: bool = True) -> tuple[onnx.ModelProto, list[str], dict[str, float]]:
    """The model with SmoothQuant applied where it lowers the output error; notes say where and with which α;
    and the amax of each smoothed activation: its maximum over the calibration data.

    The amax is the maximum, whatever the method: α was chosen for it, and after smoothing the largest values are
    the outlier channels brought down to the others' level, not a tail to clip. On a trained MiniLM the smoothed
    model read 21.8 dB with max ranges and 17.4 dB with MSE's (benchmarks/minilm.py).

    ``branches``: also smooth activations whose division needs a ``Mul`` on the branch to the layers (post-norm
    LayerNorms, GELU outputs, attention contexts); without it, only LayerNorms that can absorb the division.
    """
    sites, skipped = smoothing_sites(model, plan)
    if not branches:
        skipped += [f"{site.norm}: needs a Mul on the branch to its layers, not done at this level"
                    for site in sites if site.needs_mul]
        sites = [site for site in sites if not site.needs_mul]
    notes = [f"smoothquant skipped {len(skipped)} activations: {'; '.join(skipped[:3])}"] if skipped else []
    if not sites:
        return model, notes, {}
    observed = observe(model, [site.output for site in sites], data)
    rng = np.random.default_rng(0)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    applied, classifier_inputs, few_samples = [], [], []
    peaks: dict[str, float] = {}
    for site in sites:
        seen = observed[site.output]
        if site.needs_mul and seen.rows_per_sample < 2:
            classifier_inputs.append(site.norm)  # [batch, features]: no token rows whose channels repeat
            continue
        if site.needs_mul and seen.samples < MIN_SAMPLES:
            few_samples.append(site.norm)
            continue
        factors, alpha = choose_factors(site, weights, seen, rng)
        if factors is None:
            continue
        migrate(out, site, factors, weights)
        xmax = seen.channel_max
        peaks[site.output] = float((xmax / factors).max())
        applied.append(f"{site.norm} (alpha {alpha}, {len(site.layers)} layers, channel max/median "
                       f"{spread(xmax):.1f} -> {spread(xmax / factors):.1f})")
    kept = len(sites) - len(applied) - len(classifier_inputs) - len(few_samples)
    notes.append(f"smoothquant on {len(applied)} of {len(sites)} activations: {', '.join(applied) or 'none'}"
                 + (f"; {len(classifier_inputs)} left alone (a Mul would be needed on a [batch, features] "
                    "input: a classifier's, with no token rows whose channels repeat)"
                    if classifier_inputs else "")
                 + (f"; {len(few_samples)} that need a Mul left alone: {observed[sites[0].output].samples} "
                    f"calibration samples, they need {MIN_SAMPLES}" if few_samples else "")
                 + (f"; {kept} kept as they were (no alpha lowered the output error)" if kept else ""))
    return out, notes, peaks


def spread(channel_max: np.ndarray) -> float:
    """How uneven the channels are: the largest channel max over the median one."""
    return float(channel_max.max() / max(np.median(channel_max), 1e-12))


@dataclass
class Observed:
    """One activation over the calibration data, split by sample into two halves (even and odd samples)."""

    rows_per_sample: int = 0  # the most rows (tokens) one sample gave: 1 for a classifier's [batch, features]
    samples: int = 0
    channel_max: np.ndarray | None = None  # per channel max|x| over all data
    half_max: list = field(default_factory=lambda: [None, None])  # the same over each half
    half_rows: list = field(default_factory=lambda: [[], []])  # a seeded sample of each half's rows

    def add(self, value: np.ndarray, samples: int, first_sample: int, rng: np.random.Generator) -> None:
        """Add one run's value of the activation, a run of ``samples`` samples."""
        rows = [chunk.reshape(-1, value.shape[-1]) for chunk in per_sample(value.reshape(1, -1) if value.ndim < 2
                                                                           else value, samples)]
        self.rows_per_sample = max(self.rows_per_sample, *(len(r) for r in rows))
        self.samples += len(rows)
        for half in (0, 1):
            parts = [r for i, r in enumerate(rows) if (first_sample + i) % 2 == half]
            if not parts:
                continue
            flat = np.concatenate(parts).astype(np.float64)
            peak = np.abs(flat).max(axis=0)
            self.half_max[half] = peak if self.half_max[half] is None else np.maximum(self.half_max[half], peak)
            self.half_rows[half].append(flat[rng.choice(len(flat), min(len(flat), SAMPLE_ROWS // 2), replace=False)])
        self.channel_max = np.maximum(*(m for m in self.half_max if m is not None)) if self.half_max[1] is not None \
            else self.half_max[0]

    def folds(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """(channel max of one half, sampled rows of the other), both ways; one sample alone: its own rows."""
        rows = []
        for parts in self.half_rows:
            stacked = np.concatenate(parts) if parts else np.zeros((0, len(self.channel_max)))
            rows.append(stacked[rng.choice(len(stacked), min(len(stacked), SAMPLE_ROWS // 2), replace=False)])
        if self.half_max[1] is None:
            return [(self.channel_max, rows[0])]
        return [(self.half_max[0], rows[1]), (self.half_max[1], rows[0])]


def observe(model: onnx.ModelProto, names: list[str], data: Dataset) -> dict[str, Observed]:
    """Each tensor's channel maxima (last axis) over all data and over each half of the samples, and sampled rows."""
    rng = np.random.default_rng(0)
    session = session_exposing(model, names, optimize=False, what="the model prepared for SmoothQuant")
    observed = {name: Observed() for name in names}
    first_sample = 0
    for number, batch in enumerate(data, start=1):
        try:
            values = session.run(names, batch.feeds)
        except Exception as exc:  # ORT's InvalidArgument / Fail
            raise DataError(f"ONNX Runtime failed on batch {number} of {data.name}: {first_line(exc)}") from exc
        for name, value in zip(names, values, strict=True):
            observed[name].add(value, batch.samples, first_sample, rng)
        first_sample += batch.samples
    return observed


def input_rows(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as ``[K, N]``: row ``j`` multiplies input channel ``j``."""
    return w.T if layer.trans_b else w


def choose_factors(site: Site, weights: dict[str, np.ndarray], seen: Observed, rng: np.random.Generator
                   ) -> tuple[np.ndarray | None, float | None]:
    """The factors with the least summed output error over the site's layers, or None if no migration wins.

    The error is cross-validated by sample: factors and activation amax from the channel maxima of the even
    samples, error on rows of the odd ones, and the other way round. Flattening the channels removes the headroom
    the smaller ones had below the largest: a channel that exceeds its calibration maximum on new data is
    clipped. Judged on the data the factors came from, that never shows (a ViT with 8 calibration samples lost
    2 dB, a T5 and a Llama block with random weights 10 and 7 dB). The maxima are those of all of a half's rows:
    taken from a 1024-row sample instead they were so much lower than the maxima the factors are applied with
    that the test priced in clipping that does not happen, and chose alpha 0.65-0.8 on a trained MiniLM where
    0.95-1.0 is 4 dB better end to end (benchmarks/minilm.py).
    """
    # float32 arithmetic: the errors only rank the candidates, and it halves the time
    mats = [input_rows(layer, weights[layer.weight]).astype(np.float32) for layer in site.layers]
    wmax = np.max([np.abs(m).max(axis=1) for m in mats], axis=0).astype(np.float64)
    folds = [(peak, test.astype(np.float32), [test.astype(np.float32) @ m for m in mats])
             for peak, test in seen.folds(rng)]

    def cross_error(alpha: float | None) -> float:
        total = 0.0
        for peak, test, reference in folds:
            factors = np.ones_like(peak) if alpha is None else migration_factors(peak, wmax, alpha)
            total += output_error(site, mats, test, peak, factors, reference)
        return total

    plain = best_error = cross_error(None)
    best_alpha = None
    for alpha in ALPHAS:
        if (error := cross_error(alpha)) < best_error:
            best_error, best_alpha = error, alpha
    log.debug("smoothquant %s: layer error %.2f dB below no migration", site.norm,
              10 * np.log10(plain / max(best_error, 1e-30)))
    if best_alpha is None:
        return None, None
    return migration_factors(seen.channel_max, wmax, best_alpha), best_alpha


def migration_factors(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    factors = np.where((xmax > 0) & (wmax > 0), xmax ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
    return np.clip(factors, 1e-4, 1e4)


def output_error(site: Site, mats: list[np.ndarray], rows: np.ndarray, xmax: np.ndarray, factors: np.ndarray,
                 reference: list[np.ndarray]) -> float:
    factors32 = factors.astype(np.float32)
    x = rows / factors32
    scale = symmetric_scale((xmax / factors).max())
    xq = np.clip(np.rint(x / scale), -127, 127) * scale
    error = 0.0
    for layer, m, ref in zip(site.layers, mats, reference, strict=True):
        w = m * factors32[:, None]  # [K, N]
        axis = None if layer.axis is None else 1  # per output channel: columns of the [K, N] view
        ws = symmetric_scale(weight_amax(w, axis))
        wq = np.clip(np.rint(w / ws), -127, 127) * ws
        error += float(np.square(xq @ wq - ref, dtype=np.float64).sum())
    return error


def migrate(model: onnx.ModelProto, site: Site, factors: np.ndarray, weights: dict[str, np.ndarray]) -> None:
    """Divide the LayerNorm's scale and bias by ``factors`` (new constants: others may read the old ones); multiply
    each layer's weight rows by them (in place: the plan names them, and only these layers read them)."""
    nodes = {n.name: n for n in model.graph.node}
    if site.needs_mul:
        divide_on_branch(model, site, factors, nodes)
    else:
        for name, slot in site.constants:
            node = nodes[name]
            values = weights[node.input[slot]]
            node.input[slot] = new_constant(model, f"{node.input[slot]}_smoothed",
                                            (values / factors).astype(values.dtype))
    for layer in site.layers:
        w = weights[layer.weight]
        scaled = w * (factors[None, :] if layer.trans_b else factors[:, None])
        replace = next(i for i in model.graph.initializer if i.name == layer.weight)
        replace.CopyFrom(numpy_helper.from_array(scaled.astype(w.dtype), layer.weight))


def divide_on_branch(model: onnx.ModelProto, site: Site, factors: np.ndarray, nodes: dict[str, onnx.NodeProto]
                     ) -> None:
    """A post-norm LayerNorm (its output also feeds a residual Add): the division cannot go into its constants.

    The LayerNorm's output is renamed for the other readers, and a ``Mul`` by ``1/s`` writes the original name,
    which the plan quantizes for the layers: ``LN -> x_unsmoothed -> Mul(1/s) -> x -> Q/DQ -> MatMul``. The
    residual keeps the unscaled values; TensorRT fuses the Mul into the quantization that follows it.
    """
    taken = taken_names(model)
    raw = fresh_name(f"{site.output}_unsmoothed", taken)
    producer = next(n for n in model.graph.node if site.output in n.output)
    producer.output[list(producer.output).index(site.output)] = raw
    for name in site.others:
        node = nodes[name]
        for i, value in enumerate(node.input):
            if value == site.output:
                node.input[i] = raw
    inverse = new_constant(model, f"{site.output}_smoothquant_inverse", (1 / factors).astype(np.float32))
    mul = onnx.helper.make_node("Mul", [raw, inverse], [site.output], name=fresh_name(f"{site.norm}_smoothquant",
                                                                                     taken))
    model.graph.node.insert(list(model.graph.node).index(producer) + 1, mul)
