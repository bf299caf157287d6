"""Where the techniques run in ``quantize``: float-exact rewrites before calibration, weights after it."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from qdq.calibrate.collect import collect_ranges
from qdq.calibrate.data import Dataset
from qdq.compare import compare_models, worst_sqnr
from qdq.config import QuantizeConfig
from qdq.errors import DataError
from qdq.graph import tensor_bytes
from qdq.optimize import RELAXATION_ITERATIONS, RESCALING, chosen_techniques
from qdq.optimize.depthwise import depthwise_sites, leave_uneven_depthwise
from qdq.optimize.equalize import PREDICTED_GAIN_DB, equalization_pairs, equalize, worth_balancing
from qdq.optimize.smoothquant import smooth
from qdq.optimize.weights import not_measured, optimize_weights, quantized_model
from qdq.placement.plan import QuantPlan
from qdq.ranges import TensorRanges
from qdq.runtime import LARGE_MODEL_BYTES, make_session
from qdq.sensitivity import Evaluator, dominant_layer

log = logging.getLogger(__name__)
# dominant-layer judges on this many calibration samples, leaves float a layer adding this share of the output
# noise if the output then gains this much, and at most this many layers. Share 0.5: a layer making more noise
# than all the others together. On 17 models of benchmarks/versus.py it left float one layer of NudeNet's YOLOv8n,
# BlazeFace (back) and PP-LCNet orientation each and two of the PP-OCRv4 detector, and nothing elsewhere; a share
# of 0.35 also took two layers of PLCMOS, which then lost 1.2 dB on held-out audio.
DOMINANT_SAMPLES = 8
DOMINANT_SHARE = 0.5
DOMINANT_GAIN_DB = 1.0
DOMINANT_LAYERS = 2
# Equalization's keep-or-drop check calibrates and scores both variants on this many calibration samples.
EQUALIZE_SAMPLES = 32
# ... and keeps it only for this much gain: on PP-OCR's classifier the check read +0.7 dB and held-out images
# -0.7; on BlazeFace +7.8 and +8.9.
EQUALIZE_MARGIN_DB = 1.0


def before_calibration(model: onnx.ModelProto, plan: QuantPlan, data: Dataset | None, config: QuantizeConfig, *,
                       given: TensorRanges | None) -> tuple[onnx.ModelProto, list[str], dict[str, float],
                                                            tuple[str, ...]]:
    """Equalization and SmoothQuant: they rescale activations, so they come before the ranges are measured.

    Also returns the amax SmoothQuant fixes for the activations it smoothed (their maximum: see ``smooth``), and
    the techniques that did rescale the model (what ranges measured on it must say: ``TensorRanges.rescaled``).
    With ``given`` ranges, exactly the techniques they were measured after run (a range file from TensorRT, or
    one measured without them, describes the untransformed model's tensors; one qdq saved after SmoothQuant
    describes the smoothed model's, whatever the level asked now).
    """
    chosen = [t for t in RESCALING if t in techniques_of(config)]
    wanted = chosen if given is None else [t for t in RESCALING if t in given.rescaled]
    notes: list[str] = []
    if given is not None and (left := [t for t in chosen if t not in wanted]):
        notes.append(f"{' and '.join(left)} skipped: ranges were given, and they describe the model without it")
    if given is not None and wanted:
        notes.append(f"{' and '.join(wanted)} redone: the given ranges were measured on the model after it")
        for technique, name in (("equalize", "equalization"), ("smoothquant", "SmoothQuant")):
            if technique in wanted and (missing := unusable(technique, data)):
                raise DataError(f"the given ranges were measured after {name}, which must be redone for them to "
                                f"fit, and {missing.removeprefix(f'{technique} skipped: ')}: give the calibration "
                                "data they were measured on (--calib)")
    if "equalize" in wanted and given is None and config.scheme != "int8":
        wanted.remove("equalize")
        notes.append(f"equalize skipped: its prediction and check model the int8 grid, not {config.scheme}")
    if not wanted:
        return model, logged(notes), {}, ()
    if too_large := over_budget(model, wanted):
        return model, logged([*notes, too_large]), {}, ()
    peaks: dict[str, float] = {}
    rescaled: list[str] = []
    if "equalize" in wanted:
        # Ranges measured after equalization need it again as it was; otherwise it must earn its place.
        balanced, more = equalized(model, plan, data) if given is not None else equalized_if_better(model, plan, data,
                                                                                                    config)
        notes.extend(more)
        if balanced is not model:  # the input comes back when no pair was balanced or the check left it out
            rescaled.append("equalize")
        model = balanced
    if "smoothquant" in wanted:
        if missing := unusable("smoothquant", data):
            notes.append(missing)
        else:
            model, more, peaks = smooth(model, plan, data, config)
            notes.extend(more)
            if peaks:  # one amax per smoothed activation
                rescaled.append("smoothquant")
    return model, logged(notes), peaks, tuple(rescaled)


def equalized_if_better(model: onnx.ModelProto, plan: QuantPlan, data: Dataset | None, config: QuantizeConfig
                        ) -> tuple[onnx.ModelProto, list[str]]:
    """The equalized model if, quantized, it is closer to the float model than the model as it is, else the model.

    Equalization evens out weight ranges, and with them the activation between each pair, channel by channel;
    whether one per-tensor scale then suits that activation better depends on the model and the pair: balancing
    every pair took mediapipe's BlazeFace (tf2onnx) from 13.9 and 5.9 dB to 23.2 and 12.5, and cost the PP-OCRv4
    detector 4.3 dB. So only the pairs predicted to gain much are balanced (``worth_balancing``: one float pass
    over a few samples), and then the model must earn its place: each variant is calibrated (the configured
    method) and scored on the first ``EQUALIZE_SAMPLES`` calibration samples, its weights rounded to nearest (the
    comparison, not the final model); equalization must gain EQUALIZE_MARGIN_DB.
    """
    balanced, notes = equalized(model, plan, data)
    if balanced is model:
        return model, notes
    judged, done, *rest = notes
    check = data.head(EQUALIZE_SAMPLES)
    reference = make_session(model, optimize=False, what="the float model")
    names = plan.activation_names()

    def score(variant: onnx.ModelProto) -> float:
        ranges = collect_ranges(variant, names, check, config.calibration(), plan=plan).shared(plan.shared_scales)
        return worst_sqnr(compare_models(reference, quantized_model(variant, plan, ranges), check).outputs)

    without, with_ = score(model), score(balanced)
    if unmeasurable := not_measured("equalization", check.name, without, with_):
        return model, [judged, unmeasurable, *rest]
    if with_ < without + EQUALIZE_MARGIN_DB:
        return model, [judged, f"equalization measured and left out: the output SQNR on {check.name} would go from "
                               f"{without:.2f} to {with_:.2f} dB (it must gain {EQUALIZE_MARGIN_DB:g})", *rest]
    return balanced, [judged, f"{done}; SQNR on {check.name} {without:.2f} -> {with_:.2f} dB", *rest]


def equalized(model: onnx.ModelProto, plan: QuantPlan, data: Dataset | None) -> tuple[onnx.ModelProto, list[str]]:
    """The model with the Conv pairs worth balancing on ``data`` balanced (``model`` itself when none is), and
    notes: the prediction, then the balanced pairs (when some are), then the skipped chains."""
    pairs, skipped = equalization_pairs(model, plan)
    if not pairs:
        return equalize(model, plan)
    if missing := unusable("equalize", data):
        return model, [missing.replace("equalize skipped", "equalization skipped")]
    chosen, judged = worth_balancing(model, pairs, data)
    balanced, notes = equalize(model, plan, chosen)
    return balanced, [judged, *notes]


def refine_plan(model: onnx.ModelProto, plan: QuantPlan, data: Dataset | None, config: QuantizeConfig
                ) -> tuple[QuantPlan, list[str]]:
    """Placement changes that need data: depthwise Convs with uneven input channels left float.

    Runs on the model calibration will see (after equalization, which can even the channels out).
    """
    if "uneven-depthwise" not in techniques_of(config) or not plan:
        return plan, []
    if missing := unusable("uneven-depthwise", data):
        return plan, logged([missing])
    plan, notes = leave_uneven_depthwise(model, plan, data)
    return plan, logged(notes)


def leave_dominant_layers(model: onnx.ModelProto, plan: QuantPlan, ranges: TensorRanges, data: Dataset | None,
                          config: QuantizeConfig) -> tuple[QuantPlan, list[str]]:
    """Layers whose quantization alone makes most of the output noise, left float (``dominant_layer``): at most
    DOMINANT_LAYERS, each only if the first output then gains DOMINANT_GAIN_DB on the first DOMINANT_SAMPLES
    calibration samples.

    A single layer can hold most of a network's quantization noise: on NudeNet's YOLOv8n one 1x1 Conv of 32
    channels at 80x80 (behind a SiLU whose channels mostly span about one INT8 step) held 86% of it, and left float
    it took the output from 26.8 to 32.7 dB; mediapipe's BlazeFace (back camera) 14.8 -> 19.8 with its first
    separable Conv float. Such a layer is a small share of the compute, and no range or rounding fixes it.
    """
    if "dominant-layer" not in techniques_of(config) or not plan:
        return plan, []
    if missing := unusable("dominant-layer", data):
        return plan, logged([missing])
    if too_large := over_budget(model, ["dominant-layer"]):
        return plan, logged([too_large])
    check = data.head(DOMINANT_SAMPLES)
    evaluate = Evaluator(model, ranges, check, make_session(model, optimize=False, what="the float model"),
                         config.weights, config.quant_scheme())
    first = evaluate.metrics(plan)
    if first.integer or not np.isfinite(first.sqnr_db):
        return plan, logged([f"dominant-layer skipped: the first output {first.name} reads {first.sqnr_db:.2f} dB "
                             f"on {check.name}{' (integer)' if first.integer else ''}, no noise to share out"])
    notes, current = [], first.sqnr_db
    for _ in range(DOMINANT_LAYERS):
        found = dominant_layer(plan, evaluate, current, DOMINANT_SHARE)
        if found is None:
            notes.append(f"dominant-layer: no {'other ' if notes else ''}layer adds {DOMINANT_SHARE:.0%} of the "
                         f"output noise on {check.name} ({current:.2f} dB)")
            break
        why = f"alone adds {found.share:.0%} of the output noise on {check.name}"
        trial = plan.leaving_float({found.node: ("dominant-layer", why)})
        gained = evaluate(trial)
        if gained < current + DOMINANT_GAIN_DB:
            notes.append(f"dominant-layer: {found.node} {why}, and left float it would read {gained:.2f} against "
                         f"{current:.2f} dB (it must gain {DOMINANT_GAIN_DB:g}): kept quantized")
            break
        notes.append(f"dominant-layer: {found.node} left float: it {why}; {current:.2f} -> {gained:.2f} dB")
        plan, current = trial, gained
    return plan, logged(notes)


def after_calibration(model: onnx.ModelProto, plan: QuantPlan, ranges: TensorRanges, data: Dataset | None,
                      config: QuantizeConfig) -> tuple[onnx.ModelProto, list[str]]:
    """Learned rounding and bias correction, measured through the model quantized with ``ranges``."""
    chosen = techniques_of(config)
    rounding = "adaround" in chosen and config.weights in ("int8", "float")
    bias = "bias-correction" in chosen
    if not (rounding or bias) or not plan:
        return model, []
    if config.scheme != "int8":
        return model, logged([f"adaround and bias-correction skipped: they model the int8 grid, not {config.scheme}"])
    if missing := unusable("adaround and bias-correction", data):
        return model, logged([missing])
    if too_large := over_budget(model, [t for t, on in (("adaround", rounding), ("bias-correction", bias)) if on]):
        return model, logged([too_large])
    model, notes = optimize_weights(model, plan, ranges, data,
                                    rounding_iterations=RELAXATION_ITERATIONS if rounding else None,
                                    bias_correction=bias)
    return model, logged(notes)


def techniques_of(config: QuantizeConfig) -> tuple[str, ...]:
    return chosen_techniques(config.optimize, config.techniques)


def unusable(technique: str, data: Dataset | None) -> str | None:
    """Why ``technique`` cannot read ``data`` besides calibration, or None. A one-shot iterator is read once, by
    calibration: a technique reading it too would take samples from calibration."""
    if data is None:
        return f"{technique} skipped: it needs calibration data"
    if not data.rereadable():
        return (f"{technique} skipped: it reads the calibration data besides calibration, and {data.name} is a "
                "one-shot iterator; give a file, a folder, a dict of arrays or a list to use it")
    return None


def over_budget(model: onnx.ModelProto, techniques: list[str]) -> str | None:
    """A note when the model's weights are too large for the techniques, which rewrite them in in-memory copies.

    From LARGE_MODEL_BYTES of weights on, qdq feeds weights to ONNX Runtime zero-copy and keeps peak memory near
    2.3x the weights; a copy of the model per technique would multiply that (8x seen on a 2.2 GB model).
    """
    weights = sum(tensor_bytes(i) for i in model.graph.initializer)
    if weights < LARGE_MODEL_BYTES:
        return None
    return (f"{' and '.join(techniques)} skipped: the model holds {weights / 2**30:.1f} GiB of weights, and these "
            f"techniques rewrite copies of them in memory (from {LARGE_MODEL_BYTES / 2**30:.0f} GiB on, qdq keeps "
            "memory near 2.3x the weights); --optimize 0 says the same without this note")


def logged(notes: list[str]) -> list[str]:
    for note in notes:
        log.info("%s", note)
    return notes


def describe_techniques(model: onnx.ModelProto, plan: QuantPlan, config: QuantizeConfig) -> list[str]:
    """What each chosen technique would do on ``model``, without data (for ``qdq explain``)."""
    from qdq.optimize.layers import find_layers
    from qdq.optimize.smoothquant import smoothing_sites

    chosen = techniques_of(config)
    lines = [f"techniques at --optimize {config.optimize}: {', '.join(chosen) or 'none'}"]
    if "equalize" in chosen:
        pairs, skipped = equalization_pairs(model, plan)
        lines += [f"  equalize candidate: {p.first} -> {p.second} ({p.between})" for p in pairs]
        if pairs:
            lines.append(f"  equalize balances only the pairs whose predicted rounding noise drops by "
                         f"{PREDICTED_GAIN_DB:g} dB on the calibration data, and is kept only if that brings the "
                         f"quantized outputs {EQUALIZE_MARGIN_DB:g} dB closer")
        lines += [f"  equalize skips {s}" for s in skipped]
    if "smoothquant" in chosen:
        sites, skipped = smoothing_sites(model, plan)
        lines += [f"  smoothquant candidate: {s.norm} -> {', '.join(layer.node for layer in s.layers)} "
                  f"({'a Mul on the branch' if s.needs_mul else 'into the LayerNorm'}; alpha chosen on the "
                  "calibration data, or left alone)" for s in sites]
        lines += [f"  smoothquant skips {s}" for s in skipped]
    if "uneven-depthwise" in chosen:
        sites = depthwise_sites(model, plan)
        lines.append(f"  uneven-depthwise: {len(sites)} depthwise Convs, each left float if its input channels' ranges "
                     "turn out uneven on the calibration data")
    if "dominant-layer" in chosen:
        lines.append(f"  dominant-layer: after calibration, a layer adding {DOMINANT_SHARE:.0%} of the output noise on "
                     f"the first {DOMINANT_SAMPLES} calibration samples is left float if that gains "
                     f"{DOMINANT_GAIN_DB:g} dB (at most {DOMINANT_LAYERS})")
    if "adaround" in chosen or "bias-correction" in chosen:
        layers, skipped = find_layers(model, plan)
        which = " and ".join(t for t in ("adaround", "bias-correction") if t in chosen)
        lines.append(f"  {which}: {len(layers)} layers")
        lines += [f"  {which} skip {s}" for s in skipped]
    return lines
