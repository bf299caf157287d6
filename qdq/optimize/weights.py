"""The weight side: learned rounding, then bias correction, on the model the Q/DQ pass will quantize.

Learned rounding writes each chosen grid point back as the float weight (``s·q``), so that the Q/DQ pass,
which rounds to nearest, stores exactly the chosen integers with the same scales. Bias correction then
measures the mean input of every layer through the model quantized that way and folds the shift into the
biases. The float reference the output is compared with is the model before either.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx

from qdq.calibrate.data import Batch, Dataset
from qdq.compare import OutputAccumulator, compare_models, worst_sqnr
from qdq.optimize.adaround import learned_rounding, nearest
from qdq.optimize.bias_correction import apply_correction
from qdq.optimize.layers import Layer, find_layers, initializer_values, replace_initializer
from qdq.optimize.moments import Moments, collect_moments
from qdq.passes.materialize import MaterializeQDQ
from qdq.placement.plan import QuantPlan
from qdq.ranges import TensorRanges
from qdq.runtime import make_session

log = logging.getLogger(__name__)

# Below this many calibration samples the mean shifts are not trusted: with 8, a trained PaddleOCR classifier's
# correction raised the calibration data's SQNR and lost 2.9 dB on held-out images; the digits models (128) gained.
MIN_SAMPLES = 32
CHECK_SAMPLES = 128  # the keep-or-drop check of bias correction runs on at most this many calibration samples


def optimize_weights(model: onnx.ModelProto, plan: QuantPlan, ranges: TensorRanges, data: Dataset, *,
                     rounding_iterations: int | None, bias_correction: bool) -> tuple[onnx.ModelProto, list[str]]:
    """The model with re-rounded weights (``rounding_iterations`` not None: 0 is the greedy polish only) and
    corrected biases. ``model`` is not modified."""
    layers, skipped = find_layers(model, plan)
    notes = [f"weight techniques skip {len(skipped)} layers: {', '.join(skipped[:5])}"] if skipped else []
    if not layers:
        return model, notes
    out = onnx.ModelProto()
    out.CopyFrom(model)
    original = initializer_values(model, {layer.weight for layer in layers})
    if rounding_iterations is not None:
        kept, note = rounded_if_better(out, model, layers, plan, ranges, data, original, rounding_iterations)
        notes.append(note)
        rounding_iterations = rounding_iterations if kept else None
    if bias_correction:
        corrected = onnx.ModelProto()
        corrected.CopyFrom(out)
        # Kept only if the quantized model's outputs on the calibration data get closer to the float model's:
        # correcting the weights' mean shift alone can undo a lucky cancellation with the activations' (a ViT
        # lost 2 dB, on the calibration data too). The quantized model runs without ORT's optimisations, so each
        # sample costs (MiniLM: 4.5 s a pass over 64 samples): the uncorrected version is scored during the
        # moments pass, which runs it anyway, and the check stops at CHECK_SAMPLES. Fewer would be noisy: on 32
        # of the row transformer's 128 samples the check dropped a correction that gains 0.26 dB on held-out data.
        uncorrected = OutputCheck(model, CHECK_SAMPLES)
        note = correct_biases(corrected, layers, plan, ranges, data, original, rounded=rounding_iterations is not None,
                              on_outputs=uncorrected)
        if note.startswith("bias correction skipped"):
            return out, [*notes, note]
        check = data.head(CHECK_SAMPLES)
        comparison = compare_models(uncorrected.session, quantized_model(corrected, plan, ranges), check)
        without, with_ = uncorrected.sqnr(), worst_sqnr(comparison.outputs)
        if unmeasurable := not_measured("bias correction", check.name, without, with_):
            notes.append(unmeasurable)
        elif with_ >= without:
            out = corrected
            notes.append(f"{note}; SQNR on {check.name} {without:.2f} -> {with_:.2f} dB")
        else:
            notes.append(f"bias correction measured and left out: the output SQNR on {check.name} would drop "
                         f"from {without:.2f} to {with_:.2f} dB")
    return out, notes


class OutputCheck:
    """Scores quantized outputs against the float model's on the first ``limit`` samples of the batches it is
    given (the batches of ``Dataset.head(limit)``): the worst output's SQNR."""

    def __init__(self, reference: onnx.ModelProto, limit: int) -> None:
        self.session = make_session(reference, what="the float model")
        self.names = [o.name for o in self.session.get_outputs()]
        self.sums = {name: OutputAccumulator() for name in self.names}
        self.limit, self.seen = limit, 0

    def __call__(self, batch: Batch, outputs: dict[str, np.ndarray]) -> None:
        if self.seen >= self.limit:
            return
        self.seen += batch.samples
        for name, expected in zip(self.names, self.session.run(self.names, batch.feeds), strict=True):
            self.sums[name].update(expected, outputs[name])

    def sqnr(self) -> float:
        return worst_sqnr([self.sums[name].metrics(name) for name in self.names])


def rounded_if_better(out: onnx.ModelProto, model: onnx.ModelProto, layers: list[Layer], plan: QuantPlan,
                      ranges: TensorRanges, data: Dataset, original: dict[str, np.ndarray], iterations: int
                      ) -> tuple[bool, str]:
    """Whether learned rounding was kept, and its note. The rounding is written into ``out`` (a copy of
    ``model``) if it brings the quantized model's outputs on the calibration data (the first CHECK_SAMPLES
    samples) closer to the float model's; else ``out`` is left as it is.

    Each layer's rounding lowers that layer's output error, which need not lower the model's: on the PP-OCRv4
    detector it cost 0.7 dB on the calibration data and 1.0 dB on held-out images. Nearest rounding is scored
    during the pass that measures the layers' inputs, which runs that model anyway; the rounded one in one more.
    """
    nearest_check = OutputCheck(model, CHECK_SAMPLES)
    rounded = onnx.ModelProto()
    rounded.CopyFrom(out)
    note = round_weights(rounded, layers, plan, ranges, data, original, iterations, on_outputs=nearest_check)
    check = data.head(CHECK_SAMPLES)
    comparison = compare_models(nearest_check.session, quantized_model(rounded, plan, ranges), check)
    without, with_ = nearest_check.sqnr(), worst_sqnr(comparison.outputs)
    if unmeasurable := not_measured("learned rounding", check.name, without, with_):
        return False, unmeasurable
    if with_ < without:
        return False, (f"learned rounding measured and left out: the output SQNR on {check.name} would drop from "
                       f"{without:.2f} to {with_:.2f} dB")
    out.CopyFrom(rounded)
    return True, f"{note}; SQNR on {check.name} {without:.2f} -> {with_:.2f} dB"


def not_measured(technique: str, data: str, without: float, with_: float) -> str | None:
    """The note for a keep-or-drop check that cannot decide: an output SQNR is NaN (non-finite calibration data
    that calibration itself only warned about, or outputs whose float and quantized shapes always differ)."""
    if not (np.isnan(without) or np.isnan(with_)):
        return None
    return (f"{technique} left out: the model's outputs on {data} are not finite, or have shapes that depend on their "
            "values, so whether it brings them closer cannot be measured")


def round_weights(model: onnx.ModelProto, layers: list[Layer], plan: QuantPlan, ranges: TensorRanges,
                  data: Dataset, original: dict[str, np.ndarray], iterations: int, *,
                  on_outputs: Callable[[Batch, dict[str, np.ndarray]], None] | None = None) -> str:
    started = time.perf_counter()
    users = defaultdict(list)
    for layer in layers:
        users[layer.weight].append(layer)
    readers = defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            readers[name].add(node.name)
    shared = [w for w, group in users.items() if readers[w] - {layer.node for layer in group}]
    moments = collect_moments(quantized_model(model, plan, ranges), layers, data, with_gram=True,
                              on_outputs=on_outputs)
    before = after = 0.0
    for weight, group in users.items():
        if weight in shared:
            continue  # a float node reads it too: its values must stay
        layer = group[0]
        if any(g.matrix(original[weight]).shape != layer.matrix(original[weight]).shape for g in group):
            continue
        w = layer.matrix(original[weight]).astype(np.float64)
        scale = layer.channel_scales(original[weight])
        second = combined_second(group, moments)
        rounding = learned_rounding(w, scale, second, iterations=iterations)
        before += rounding.nearest_error
        after += rounding.error
        replace_initializer(model, weight, layer.unmatrix(scale[..., None] * rounding.q, original[weight]))
    gain = 10 * np.log10(before / after) if after > 0 and before > 0 else 0.0
    how = "greedy flips" if iterations == 0 else f"AdaRound, {iterations} iterations, then greedy flips"
    return (f"learned rounding ({how}) on {len(users) - len(shared)} weights: their layers' output error on the "
            f"calibration data {gain:.1f} dB below nearest rounding ({time.perf_counter() - started:.1f} s)"
            + (f"; {len(shared)} weights also read by float nodes kept nearest" if shared else ""))


def combined_second(group: list[Layer], moments: dict[str, Moments]) -> np.ndarray:
    """``E[x x^T]`` over every use of a shared weight (an unrolled RNN's steps), weighted by rows."""
    grams = [moments[layer.node] for layer in group]
    rows = sum(m.gram_rows for m in grams)
    return sum(m.gram for m in grams) / max(rows, 1)


def correct_biases(model: onnx.ModelProto, layers: list[Layer], plan: QuantPlan, ranges: TensorRanges,
                   data: Dataset, original: dict[str, np.ndarray], *, rounded: bool,
                   on_outputs: Callable[[Batch, dict[str, np.ndarray]], None] | None = None) -> str:
    started = time.perf_counter()
    current = initializer_values(model, {layer.weight for layer in layers}) if rounded else original
    deltas = {}
    for layer in layers:
        scale = layer.channel_scales(current[layer.weight])
        weight = layer.matrix(original[layer.weight]).astype(np.float64)
        deltas[layer.node] = scale[..., None] * nearest(layer.matrix(current[layer.weight]), scale) - weight
    moments = collect_moments(quantized_model(model, plan, ranges), layers, data, with_gram=False, deltas=deltas,
                              on_outputs=on_outputs)
    if (samples := moments[layers[0].node].samples) < MIN_SAMPLES:
        return (f"bias correction skipped: {samples} calibration samples, it needs {MIN_SAMPLES} to estimate mean "
                "shifts that hold on new data")
    largest = 0.0
    dropped = channels = 0
    for layer in layers:
        stats = moments[layer.node]
        shift = np.einsum("gnk,gk->gn", deltas[layer.node], stats.mean()).reshape(-1)
        if (error := stats.shift_error()) is not None:
            # A channel's shift is kept only if it is more than twice its standard error over the samples. With
            # few samples of inputs whose mean varies from sample to sample, the measured shift is noise, and
            # correcting it cost 1.9 dB on held-out data for a GRU calibrated on 8 samples.
            noisy = np.abs(shift) <= 2 * error
            dropped += int(noisy.sum())
            channels += noisy.size
            shift = np.where(noisy, 0.0, shift)
        apply_correction(model, layer, shift)
        largest = max(largest, float(np.abs(shift).max(initial=0.0)))
    return (f"bias correction (empirical: mean inputs through the quantized model) on {len(layers)} layers, "
            f"{dropped} of {channels} channel shifts left out as within 2 standard errors of 0, "
            f"largest shift {largest:.3g} ({time.perf_counter() - started:.1f} s)")


def quantized_model(model: onnx.ModelProto, plan: QuantPlan, ranges: TensorRanges) -> onnx.ModelProto:
    """``model`` with Q/DQ as the output will have them (float weights behind Q/DQ: the same arithmetic)."""
    return MaterializeQDQ(plan, ranges, weights="float")(model).model
