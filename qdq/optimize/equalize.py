"""Cross-layer equalization: balance the per-channel weight ranges of two convolutions in a chain.

For ``Conv A -> f -> Conv B`` with ``f`` positively homogeneous (``f(x/s) = f(x)/s`` for ``s > 0``: ReLU,
PReLU and LeakyReLU, whatever their slopes, or nothing), dividing A's output channel ``c`` (weights and bias) by
``s_c`` and multiplying B's input channel ``c`` by ``s_c`` leaves the float model unchanged.
``s_c = sqrt(r1_c / r2_c)``, with ``r1`` A's per-output-channel weight range and ``r2`` B's per-input-channel
one, makes both ranges ``sqrt(r1·r2)`` (Nagel et al., 2019, data-free quantization). That matters most for
depthwise-separable nets, whose depthwise channels have wildly different ranges. Chains longer than two are
balanced by sweeping over the pairs until the factors settle.

ReLU6 (Clip to [0, 6]) is not homogeneous: ``clip(x/s, 0, 6)·s = clip(x, 0, 6s)`` moves the bound, so such
pairs are skipped and said so, as are pairs where another node reads the intermediate tensor.

With per-channel weight scales, balancing a pair changes what per-tensor activation rounding costs between them,
and the second Conv's rows; that can go either way, so only the pairs it clearly helps are balanced
(``worth_balancing``): predicted from the tensor's channel statistics on calibration data, without running a
quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.calibrate.data import Dataset
from qdq.optimize.bias_correction import new_constant
from qdq.optimize.channels import SAMPLES, Channels, channel_statistics
from qdq.optimize.layers import find_layers, replace_initializer
from qdq.placement.plan import QuantPlan

SWEEPS = 20
HOMOGENEOUS = ("Relu", "PRelu", "LeakyRelu")
# A pair is balanced only if the predicted rounding noise at its second Conv drops by this much. Measured on the
# 29 models and streams of benchmarks/versus.py (17 with pairs): mediapipe's BlazeFace has one pair at +16.2 dB (a
# channel 173x the median), and balancing it alone took the model from 13.9 to 24.3 dB; the next were PP-OCRv5's
# recogniser at +11.4 (balanced, its calibration outputs got further from float), PP-OCR's classifier at +10.0
# (balancing it cost 2.0 dB) and PP-OCRv5's detector at +8.4. Balancing every pair cost the PP-OCRv4 detector
# 4.3 dB and three more models 0.5-1.0 dB.
PREDICTED_GAIN_DB = 14.0


@dataclass(frozen=True)
class Pair:
    first: str  # Conv A
    second: str  # Conv B
    between: str  # "identity" or the activation's op


def equalization_pairs(model: onnx.ModelProto, plan: QuantPlan) -> tuple[list[Pair], list[str]]:
    """The Conv -> (ReLU | identity) -> Conv pairs to equalize, and the Conv chains skipped with the reason."""
    convs = {layer.node: layer for layer in find_layers(model, plan)[0] if layer.op == "Conv"}
    nodes = {n.name: n for n in model.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    constants = {i.name: i for i in model.graph.initializer}
    pairs, skipped = [], []
    for name in convs:
        first = nodes[name]
        tensor, between = first.output[0], "identity"
        users = readers.get(tensor, [])
        if len(users) == 1 and users[0].op_type not in ("Conv",):
            act = users[0]
            between = describe_activation(act, constants)
            tensor = act.output[0]
            users = readers.get(tensor, [])
        if not (len(users) == 1 and users[0].name in convs and users[0].input[0] == tensor):
            continue  # not a chain into a quantized Conv: nothing to report
        second = users[0]
        why = ""
        if between not in ("identity", *HOMOGENEOUS):
            why = (f"{between} clips at a fixed bound (scaling moves it)" if between.startswith("Clip")
                   else f"{between} is not positively homogeneous")
        elif first.output[0] in outputs or tensor in outputs:
            why = "the tensor between them is a graph output"
        elif len(readers.get(convs[name].weight, [])) > 1 or len(readers.get(convs[second.name].weight, [])) > 1:
            why = "a weight is shared with other nodes"
        # A shared bias is no reason: the first Conv gets a rescaled copy of its own (tf2onnx merges equal biases).
        if why:
            skipped.append(f"{name} -> {second.name}: {why}")
        else:
            pairs.append(Pair(name, second.name, between))
    return pairs, skipped


def describe_activation(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str:
    """``Relu``, ``Clip[0, 6]``, or the op type; a Clip with min 0 and no max is a ReLU."""
    if node.op_type != "Clip":
        return node.op_type
    bounds = [float(numpy_helper.to_array(constants[i])) if i in constants else None for i in node.input[1:3]]
    bounds += [None] * (2 - len(bounds))
    low, high = bounds
    if low == 0.0 and high is None:
        return "Relu"
    return f"Clip[{low}, {high}]" + (" (ReLU6)" if (low, high) == (0.0, 6.0) else "")


def worth_balancing(model: onnx.ModelProto, pairs: list[Pair], data: Dataset) -> tuple[list[Pair], str]:
    """The pairs whose balancing lowers the predicted rounding noise at the second Conv by PREDICTED_GAIN_DB, and
    a note on the best prediction (channel statistics on the first calibration samples of the float model)."""
    nodes = {n.name: n for n in model.graph.node}
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer
               if i.name in {nodes[name].input[1] for p in pairs for name in (p.first, p.second)}}
    stats, samples = channel_statistics(model, sorted({nodes[p.second].input[0] for p in pairs}), data,
                                        why="reading the channels between Conv pairs")
    if samples < SAMPLES:
        return [], (f"equalization skipped: {samples} calibration samples, it needs {SAMPLES} to judge the channels "
                    f"between {len(pairs)} Conv pairs")
    gains = {}
    for p in pairs:
        channels = stats.get(nodes[p.second].input[0])
        if channels is not None:
            first, second = weights[nodes[p.first].input[1]], weights[nodes[p.second].input[1]]
            gains[p] = predicted_gain(first, second, group_count(nodes[p.second]), channels)
    chosen = [p for p in pairs if gains.get(p, -np.inf) >= PREDICTED_GAIN_DB]
    best = max(gains, key=gains.get, default=None)
    if best is None:
        return [], "equalization skipped: no Conv pair's channels could be read"
    return chosen, (f"equalization: {len(chosen)} of {len(pairs)} Conv pairs predicted to lower rounding noise by "
                    f"{PREDICTED_GAIN_DB:g} dB or more on {samples} samples (best {gains[best]:+.1f} dB: "
                    f"{best.first} -> {best.second})")


def predicted_gain(first: np.ndarray, second: np.ndarray, groups: int, channels: Channels) -> float:
    """How much balancing the pair alone lowers the rounding noise power at the second Conv's output, in dB.

    The noise model: activation rounding with one step ``max_c m_c / 127`` adds ``step²/12 · Σ‖B[:, c]‖²``; weight
    rounding with one step per output row ``max|B[n]| / 127`` adds ``step_n²/12 · Σ_c taps · E[x_c²]`` over the
    row's input channels. Balancing divides channel ``c`` of the tensor by ``s_c`` and multiplies B's input
    channel ``c`` by it (per-channel scales make A's rounding independent of ``s``).
    """
    factors = balancing_factors(first, second, groups)
    maxima, squares = channels.max.astype(np.float64), channels.mean_square.astype(np.float64)
    if maxima.shape != factors.shape or not (np.isfinite(maxima).all() and np.isfinite(squares).all()):
        return -np.inf

    def noise(scale: np.ndarray) -> float:
        weight = by_group(second, groups) * scale.reshape(groups, 1, -1, 1)
        activation = (maxima / scale).max() ** 2 * np.sum(weight ** 2)
        energy = (squares / scale ** 2).reshape(groups, -1).sum(axis=1) * weight.shape[3]  # per group
        rows = np.abs(weight).max(axis=(2, 3)) ** 2 * energy[:, None]
        return float(activation + rows.sum()) / (12 * 127 ** 2)

    before, after = noise(np.ones_like(factors)), noise(factors)
    return float(10 * np.log10(before / after)) if before > 0 and after > 0 else -np.inf


def balancing_factors(first: np.ndarray, second: np.ndarray, groups: int) -> np.ndarray:
    """``s_c = sqrt(r1_c / r2_c)`` per channel between the pair: ``r1`` the first Conv's output-channel weight
    range, ``r2`` the second's input-channel one (1 where either is 0)."""
    r1 = np.abs(first).reshape(first.shape[0], -1).max(axis=1)
    r2 = np.abs(by_group(second, groups)).max(axis=(1, 3)).reshape(-1)
    return np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)


def by_group(weight: np.ndarray, groups: int) -> np.ndarray:
    """A Conv weight as ``[groups, out channels per group, in channels per group, taps]``."""
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)


def equalize(model: onnx.ModelProto, plan: QuantPlan, only: list[Pair] | None = None
             ) -> tuple[onnx.ModelProto, list[str]]:
    """The model with its equalizable Conv pairs (or ``only`` these of them) balanced; notes list the pairs and
    the skipped ones."""
    pairs, skipped = equalization_pairs(model, plan)
    if only is not None:
        pairs = [p for p in pairs if p in only]
    notes = []
    if pairs:
        model = balance(model, pairs)
        notes.append(f"equalized {len(pairs)} Conv pairs: "
                     + ", ".join(f"{p.first} -> {p.second} ({p.between})" for p in pairs[:6])
                     + (", ..." if len(pairs) > 6 else ""))
    if skipped:
        notes.append(f"equalization skipped {len(skipped)} Conv pairs: {'; '.join(skipped[:6])}"
                     + ("; ..." if len(skipped) > 6 else ""))
    return model, notes


def balance(model: onnx.ModelProto, pairs: list[Pair]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    values = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in out.graph.initializer}
    weights = {name: values[nodes[name].input[1]] for p in pairs for name in (p.first, p.second)}
    biases = {p.first: values[nodes[p.first].input[2]].copy() if len(nodes[p.first].input) > 2
              and nodes[p.first].input[2] else None for p in pairs}
    for _ in range(SWEEPS):
        largest = 0.0
        for p in pairs:
            a, b = weights[p.first], weights[p.second]
            groups = group_count(nodes[p.second])
            factors = balancing_factors(a, b, groups)
            weights[p.first] = a / factors.reshape(-1, *[1] * (a.ndim - 1))
            if biases[p.first] is not None:
                biases[p.first] = biases[p.first] / factors
            weights[p.second] = (by_group(b, groups) * factors.reshape(groups, 1, -1, 1)).reshape(b.shape)
            largest = max(largest, float(np.abs(np.log(factors)).max(initial=0.0)))
        if largest < 1e-4:
            break
    for name, w in weights.items():
        # In place, under the same name: the plan refers to weights by name (and no other node reads them).
        replace_initializer(out, nodes[name].input[1], w)
    for name, bias in biases.items():
        if bias is not None:
            node = nodes[name]
            node.input[2] = new_constant(out, f"{node.input[2]}_equalized", bias.astype(np.float32))
    used = {t for n in out.graph.node for t in n.input}
    kept = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def group_count(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1) or 1
