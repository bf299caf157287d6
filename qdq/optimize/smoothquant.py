"""SmoothQuant: move activation outliers of a LayerNorm's output into the weights of the layers it feeds.

A LayerNorm's output often has a few channels far larger than the rest, and one per-tensor activation scale
then wastes most of its 255 levels on them. Dividing channel ``j`` by ``s_j`` (folded into the LayerNorm's
scale and bias) and multiplying row ``j`` of every consuming weight by ``s_j`` leaves the float model exactly
as it was (Xiao et al., 2023); with ``s_j = max|X_j|^α / max|W_j|^(1−α)`` the activation gets flatter and the
weights (quantized per output channel) absorb the difference. ``α`` is chosen per LayerNorm, among a few
values and "no migration", by the consuming layers' output error on calibration rows with both sides
quantized (activation amax = its max, weights per channel as the plan says).

Applies to LayerNormalization nodes whose output is read only by quantized MatMul/Gemm layers with constant
weights (the Q/K/V projections of a pre-norm block, an MLP's first layer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.calibrate.data import Dataset
from qdq.config import QuantizeConfig
from qdq.errors import DataError
from qdq.model_io import first_line
from qdq.optimize.bias_correction import new_constant
from qdq.optimize.layers import Layer, find_layers
from qdq.placement.plan import QuantPlan
from qdq.runtime import session_exposing
from qdq.scheme import symmetric_scale, weight_amax

log = logging.getLogger(__name__)

ALPHAS = (0.3, 0.5, 0.65, 0.8, 0.95)
SAMPLE_ROWS = 2048  # calibration rows per LayerNorm kept for choosing alpha (a seeded random subset)


@dataclass(frozen=True)
class Site:
    """A LayerNormalization and the quantized layers that read its output."""

    norm: str
    output: str
    layers: tuple[Layer, ...]


def smoothing_sites(model: onnx.ModelProto, plan: QuantPlan) -> tuple[list[Site], list[str]]:
    """Where SmoothQuant applies, and each LayerNorm where it does not with the reason."""
    layers = {layer.node: layer for layer in find_layers(model, plan)[0]}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    constants = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    sites, skipped = [], []
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        users = readers.get(node.output[0], [])
        why = ""
        if axis != -1:
            why = "normalises more than the last axis"
        elif any(name not in constants for name in node.input[1:] if name):
            why = "its scale or bias is not a constant"
        elif node.output[0] in outputs or not users:
            why = "its output is a graph output"
        elif bad := [u.name for u in users if u.name not in layers or u.input[0] != node.output[0]]:
            why = f"its output is also read by {bad[0]}, which is not a quantized MatMul/Gemm"
        elif shared := [layers[u.name].weight for u in users if len(readers.get(layers[u.name].weight, [])) > 1]:
            why = f"weight {shared[0]} is shared with other nodes"
        if why:
            skipped.append(f"{node.name}: {why}")
        else:
            sites.append(Site(node.name, node.output[0], tuple(layers[u.name] for u in users)))
    return sites, skipped


def smooth(model: onnx.ModelProto, plan: QuantPlan, data: Dataset, config: QuantizeConfig
           ) -> tuple[onnx.ModelProto, list[str]]:
    """The model with SmoothQuant applied where it lowers the output error; notes say where and with which α."""
    sites, skipped = smoothing_sites(model, plan)
    notes = [f"smoothquant skipped {len(skipped)} LayerNorms: {'; '.join(skipped[:3])}"] if skipped else []
    if not sites:
        return model, notes
    channel_max, rows = observe(model, [site.output for site in sites], data)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    applied = []
    for site in sites:
        factors, alpha = choose_factors(site, weights, channel_max[site.output], rows[site.output])
        if factors is None:
            continue
        migrate(out, site, factors, weights)
        xmax = channel_max[site.output]
        applied.append(f"{site.norm} (alpha {alpha}, {len(site.layers)} layers, channel max/median "
                       f"{spread(xmax):.1f} -> {spread(xmax / factors):.1f})")
    kept = len(sites) - len(applied)
    notes.append(f"smoothquant on {len(applied)} of {len(sites)} LayerNorms: {', '.join(applied) or 'none'}"
                 + (f"; {kept} kept as they were (no alpha lowered the output error)" if kept else ""))
    return out, notes


def spread(channel_max: np.ndarray) -> float:
    """How uneven the channels are: the largest channel max over the median one."""
    return float(channel_max.max() / max(np.median(channel_max), 1e-12))


def observe(model: onnx.ModelProto, names: list[str], data: Dataset
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per channel max|x| of each tensor (last axis) over all data, and a seeded sample of its rows."""
    rng = np.random.default_rng(0)
    session = session_exposing(model, names, optimize=False, what="the model prepared for SmoothQuant")
    channel_max: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for number, batch in enumerate(data, start=1):
        try:
            values = session.run(names, batch.feeds)
        except Exception as exc:  # ORT's InvalidArgument / Fail
            raise DataError(f"ONNX Runtime failed on batch {number} of {data.name}: {first_line(exc)}") from exc
        for name, value in zip(names, values, strict=True):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            peak = np.abs(flat).max(axis=0)
            channel_max[name] = peak if name not in channel_max else np.maximum(channel_max[name], peak)
            keep = min(len(flat), SAMPLE_ROWS)
            samples[name].append(flat[rng.choice(len(flat), keep, replace=False)])
    rows = {}
    for name, parts in samples.items():
        stacked = np.concatenate(parts)
        rows[name] = stacked[rng.choice(len(stacked), min(len(stacked), SAMPLE_ROWS), replace=False)]
    return channel_max, rows


def input_rows(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as ``[K, N]``: row ``j`` multiplies input channel ``j``."""
    return w.T if layer.trans_b else w


def choose_factors(site: Site, weights: dict[str, np.ndarray], xmax: np.ndarray, rows: np.ndarray
                   ) -> tuple[np.ndarray | None, float | None]:
    """The factors with the least summed output error over the site's layers, or None if no migration wins."""
    mats = [input_rows(layer, weights[layer.weight]).astype(np.float64) for layer in site.layers]
    wmax = np.max([np.abs(m).max(axis=1) for m in mats], axis=0)
    reference = [rows @ m for m in mats]
    best_error = output_error(site, mats, rows, xmax, np.ones_like(xmax), reference)
    best: tuple[np.ndarray | None, float | None] = (None, None)
    for alpha in ALPHAS:
        factors = np.where((xmax > 0) & (wmax > 0), xmax ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
        factors = np.clip(factors, 1e-4, 1e4)
        error = output_error(site, mats, rows, xmax, factors, reference)
        if error < best_error:
            best_error, best = error, (factors, alpha)
    return best


def output_error(site: Site, mats: list[np.ndarray], rows: np.ndarray, xmax: np.ndarray, factors: np.ndarray,
                 reference: list[np.ndarray]) -> float:
    x = rows / factors
    scale = float(symmetric_scale((xmax / factors).max()))
    xq = np.clip(np.rint(x / scale), -127, 127) * scale
    error = 0.0
    for layer, m, ref in zip(site.layers, mats, reference, strict=True):
        w = m * factors[:, None]  # [K, N]
        axis = None if layer.axis is None else 1  # per output channel: columns of the [K, N] view
        ws = symmetric_scale(weight_amax(w, axis)).astype(np.float64)
        wq = np.clip(np.rint(w / ws), -127, 127) * ws
        error += float(((xq @ wq - ref) ** 2).sum())
    return error


def migrate(model: onnx.ModelProto, site: Site, factors: np.ndarray, weights: dict[str, np.ndarray]) -> None:
    """Divide the LayerNorm's scale and bias by ``factors``; multiply each layer's weight rows by them."""
    node = next(n for n in model.graph.node if n.name == site.norm)
    for slot in (1, 2):
        if len(node.input) > slot and node.input[slot]:
            values = weights[node.input[slot]]
            node.input[slot] = new_constant(model, f"{node.input[slot]}_smoothed",
                                            (values / factors).astype(values.dtype))
    for layer in site.layers:
        w = weights[layer.weight]
        scaled = w * (factors[None, :] if layer.trans_b else factors[:, None])
        replace = next(i for i in model.graph.initializer if i.name == layer.weight)
        replace.CopyFrom(numpy_helper.from_array(scaled.astype(w.dtype), layer.weight))
