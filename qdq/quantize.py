"""The pipeline: load → prepare → plan → calibrate → insert Q/DQ → check."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qdq import __version__
from qdq.branches import calibrate_branches, defined_names, quantize_branches
from qdq.calibrate.collect import collect_ranges
from qdq.calibrate.data import DataLike, Dataset, input_specs, open_data
from qdq.check import check_model
from qdq.compare import Comparison, compare_models
from qdq.config import QuantizeConfig
from qdq.errors import ArgumentError, CalibrationError, DataError, ModelError, OutputError, shown
from qdq.graph import nested_nodes, structure_only
from qdq.inspect import REASONS_KEY
from qdq.model_io import check_in_memory, first_line, load_model, save_model
from qdq.ops import CONTROL_FLOW_OPS, WEIGHTED_OPS
from qdq.optimize.pipeline import (
    after_calibration,
    before_calibration,
    describe_techniques,
    leave_dominant_layers,
    refine_plan,
)
from qdq.passes.attributes import DropEmptyAxes
from qdq.passes.base import run_passes
from qdq.passes.fold_batchnorm import FoldBatchNorm
from qdq.passes.fold_constants import FoldConstants
from qdq.passes.high_precision import FP16_MIN_OPSET, CastToFP16
from qdq.passes.identities import RemoveIdentities
from qdq.passes.materialize import MaterializeQDQ
from qdq.passes.names import NameNodes
from qdq.passes.opset import UpgradeOpset
from qdq.passes.shapes import InferShapes
from qdq.placement import QuantPlan, plan_quantization
from qdq.placement.planner import refuse_quantized
from qdq.ranges import TensorRanges, inherit_through_copies
from qdq.runtime import Session, check_qdq_opset, make_session, quantized_session
from qdq.scheme import INT8, Scheme, bounds_note
from qdq.sensitivity import Evaluator, Goal, SensitivityReport, fall_back, layer_sensitivity

log = logging.getLogger(__name__)
# Below this, an output is far from float's (faster-whisper's Silero VAD read 6.9 dB before the spectrum rule, with
# 77% of its speech decisions kept); the real models that work read 15-45 dB.
LOW_SQNR_DB = 10.0


@dataclass(frozen=True)
class Report:
    """What quantization did, for people: counts, notes from the passes, and the float-vs-int8 comparison."""

    quantized_nodes: int
    total_nodes: int
    activations: int
    weights: int
    notes: tuple[str, ...] = ()
    comparison: Comparison | None = None
    seconds: float = 0.0
    scheme: str = "int8"

    def summary(self) -> dict[str, int]:
        return {"quantized_nodes": self.quantized_nodes, "nodes": self.total_nodes,
                "activations": self.activations, "weights": self.weights}


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model, the ranges it was built from, the plan, and the report."""

    model: onnx.ModelProto
    ranges: TensorRanges
    plan: QuantPlan
    report: Report = field(repr=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model atomically (external data for models over 1.8 GB), after the full ONNX check."""
        return save_model(self.model, path)


def prepare(model: onnx.ModelProto, scheme: Scheme = INT8) -> tuple[onnx.ModelProto, list[str]]:
    """Opset ≥ the scheme's (13 for INT8), constants folded, Identity/Dropout removed, BatchNorm folded, shapes
    inferred, nodes named.

    This is the graph placement sees and the output is built from.
    """
    refuse_quantized(model)
    return run_passes(model, [DropEmptyAxes(), UpgradeOpset(scheme.min_opset), FoldConstants(), RemoveIdentities(),
                              FoldBatchNorm(), InferShapes(), NameNodes()])


def quantize(
    model: str | os.PathLike[str] | onnx.ModelProto,
    calibration_data: DataLike | None = None,
    *,
    config: QuantizeConfig | None = None,
    ranges: TensorRanges | None = None,
    evaluation_data: DataLike | None = None,
    labels: np.ndarray | None = None,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize a float ONNX model to explicit INT8 Q/DQ for TensorRT.

    Args:
        model: a path to an ``.onnx`` file or a ModelProto (never modified).
        calibration_data: an ``.npz`` path, a folder of them, ``{input: array}``, or an iterable of such dicts
            (each fed as one run). Needed unless ``ranges`` covers every tensor to quantize.
        config: options; the defaults are MSE calibration, ``optimize=1`` and int8 per-channel weights.
        ranges: known amax per tensor; tensors it lacks are calibrated.
        evaluation_data: data to compare the float and quantized models on (same forms as calibration_data).
        labels: class labels for ``evaluation_data``, for accuracy.
        progress: show a progress bar on stderr during calibration (only when it is a terminal).

    Raises:
        QdqError: with a message naming the file, tensor or node at fault.
    """
    config = checked_config(config)
    if ranges is not None and not isinstance(ranges, TensorRanges):
        raise ArgumentError(f"ranges must be a qdq.TensorRanges (e.g. qdq.range_files.read_ranges(path)), got a "
                            f"{type(ranges).__name__}")
    started = time.perf_counter()
    source = load_model(model)
    scheme = config.quant_scheme()
    prepared, notes = prepare(source, scheme)
    check_loads(prepared, source, model)
    note_constant_inputs(source, notes)
    specs = input_specs(prepared)
    calibration = None if calibration_data is None else open_data(calibration_data, specs, config.batch_size)
    evaluation = None if evaluation_data is None else open_data(evaluation_data, specs, config.batch_size)

    plan = plan_quantization(prepared, config.placement())
    if loops := [n.name for n in prepared.graph.node if n.op_type in CONTROL_FLOW_OPS - {"If"}]:
        notes.append(f"{len(loops)} Loop/Scan nodes ({', '.join(loops[:3])}): their bodies are left float")
        log.warning("%s", notes[-1])
    if ranges is not None:
        warn_unknown_names(ranges, source)
    # ``working`` is what gets quantized (float-exact rewrites, then re-rounded weights); ``prepared`` stays the
    # float reference the output is compared with.
    working, plan, used, rescaled = calibrated_plan(prepared, plan, calibration, config, ranges, notes,
                                                    progress=progress)
    check_weights(working, plan)  # before anything materializes them
    plan, technique_notes = leave_dominant_layers(working, plan, used, calibration, config)
    notes.extend(technique_notes)
    used = used.subset(plan.activation_names())
    if config.target_sqnr is not None or config.max_top1_drop is not None:
        plan, used, float_session = meet_target(working, plan, used, evaluation, config, notes, progress=progress)
    else:
        float_session = None
    used = dataclasses.replace(used, rescaled=rescaled)
    working, technique_notes = after_calibration(working, plan, used, calibration, config)
    notes.extend(technique_notes)

    note_bounds(used, scheme, notes)
    quantized = MaterializeQDQ(plan, used, weights=config.weights, scheme=scheme)(working).model
    branches, branch_notes = quantize_branches(prepared, quantized, calibration, config, ranges, quantize)
    notes.extend(branch_notes)
    for branch, inner in branches:
        if clashes := [n for n in inner.ranges if n in used and used.amax[n] != inner.ranges.amax[n]]:
            # Each branch calibrates an outer tensor it quantizes on its own runs; a range file has one entry.
            more = f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""
            notes.append(f"{branch.where} quantizes {shown(clashes[0])}{more} with a range of its own; saved ranges "
                         "keep the first, and given back they apply it everywhere")
            log.info("%s", notes[-1])
        used = dataclasses.replace(used.merged(inner.ranges), samples=used.samples or inner.ranges.samples)
    inside = [inner.report for _, inner in branches]
    if not plan and not any(r.quantized_nodes for r in inside):
        notes.append(f"nothing to quantize: {why_nothing_to_quantize(prepared, plan)}; the output is the prepared "
                     "float model")
        log.warning("%s", notes[-1])
    if config.high_precision == "fp16":
        quantized, fp16_notes = run_passes(quantized, [UpgradeOpset(FP16_MIN_OPSET), CastToFP16()])
        notes.extend(fp16_notes)
    report = Report(len(plan.quantized_nodes()) + sum(r.quantized_nodes for r in inside),
                    len(plan.decisions) + sum(r.total_nodes for r in inside), len(used),
                    len(plan.weights()) + sum(r.weights for r in inside), tuple(notes), scheme=config.scheme)
    stamp_metadata(quantized, config, report, used, plan)
    check_quantized(quantized)
    comparison = None if evaluation is None else compare_models(
        float_session or prepared, quantized, evaluation, labels, progress=progress)
    if comparison is not None and (low := [o for o in comparison.outputs if o.sqnr_db < LOW_SQNR_DB and not o.integer]):
        warning = (f"{', '.join(f'{shown(o.name)} reads {o.sqnr_db:.1f} dB' for o in low)} against the float model "
                   f"(below {LOW_SQNR_DB:g} dB): `qdq sensitivity MODEL --calib DATA` ranks the layers by what they "
                   "cost, and --exclude-nodes leaves the worst float")
        log.warning("%s", warning)
        report = dataclasses.replace(report, notes=(*report.notes, warning))
    report = dataclasses.replace(report, comparison=comparison, seconds=time.perf_counter() - started)
    return QuantizeResult(quantized, used, plan, report)


def calibrated_plan(prepared: onnx.ModelProto, plan: QuantPlan, calibration: Dataset | None, config: QuantizeConfig,
                    given: TensorRanges | None, notes: list[str], *, progress: bool = False
                    ) -> tuple[onnx.ModelProto, QuantPlan, TensorRanges, tuple[str, ...]]:
    """The techniques that rescale activations (a new model), the placement changes that need data (a new plan),
    and the ranges of that model and plan; and which techniques rescaled it. ``prepared`` is not modified."""
    working, technique_notes, smoothed, rescaled = before_calibration(prepared, plan, calibration, config,
                                                                      given=given)
    notes.extend(technique_notes)
    plan, technique_notes = refine_plan(working, plan, calibration, config)
    notes.extend(technique_notes)
    used = plan_ranges(working, plan, calibration, config, given, notes, progress=progress)
    # A given range wins over the smoothed maximum (the same value when the ranges come from an identical run).
    if smoothed := {name: amax for name, amax in smoothed.items() if name in used and name not in (given or {})}:
        used = TensorRanges(smoothed, method=used.method, sources=dict.fromkeys(smoothed, "smoothquant: max")
                            ).merged(used).shared(plan.shared_scales)
    return working, plan, used, rescaled


def calibrate(
    model: str | os.PathLike[str] | onnx.ModelProto,
    calibration_data: DataLike,
    *,
    config: QuantizeConfig | None = None,
    progress: bool = False,
) -> TensorRanges:
    """The ranges ``quantize`` would use for ``model`` on this data, without inserting Q/DQ (for range files); If
    branches' tensors included, each measured on the runs that take its branch."""
    config = checked_config(config)
    source = load_model(model)
    prepared, notes = prepare(source, config.quant_scheme())
    check_loads(prepared, source, model)
    calibration = open_data(calibration_data, input_specs(prepared), config.batch_size)
    plan = plan_quantization(prepared, config.placement())
    ranges = plan_ranges(prepared, plan, calibration, config, None, notes, progress=progress)
    for inside in calibrate_branches(prepared, calibration, config, calibrate)[0]:
        ranges = ranges.merged(inside)
    return ranges


def meet_target(model: onnx.ModelProto, plan: QuantPlan, ranges: TensorRanges, evaluation: Dataset | None,
                config: QuantizeConfig, notes: list[str], *, progress: bool
                ) -> tuple[QuantPlan, TensorRanges, Session]:
    """Leave the most sensitive layers float until the target SQNR or top-1 drop is met.

    Also returns the float model's session, which the final comparison reuses.
    """
    goal = Goal(config.target_sqnr, config.max_top1_drop)
    if evaluation is None:
        raise DataError(f"a target ({goal}) needs evaluation data to measure it on (--eval, or evaluation_data)")
    float_session = make_session(model, what="the float model")
    evaluator = Evaluator(model, ranges, evaluation, float_session, config.weights, config.quant_scheme())
    result = fall_back(plan, evaluator, goal, progress=progress)
    if result.left_float:
        notes.append(f"to reach {goal}, {len(result.left_float)} layers stay float "
                     f"({', '.join(result.left_float[:5])}{', ...' if len(result.left_float) > 5 else ''}): "
                     f"{result.before} -> {result.after}")
        log.info("%s", notes[-1])
    if not result.met:
        notes.append(f"target ({goal}) not reached: {result.after} with every layer float")
        log.warning("%s", notes[-1])
    return result.plan, ranges.subset(result.plan.activation_names()), float_session


def sensitivity(
    model: str | os.PathLike[str] | onnx.ModelProto,
    calibration_data: DataLike,
    evaluation_data: DataLike,
    *,
    config: QuantizeConfig | None = None,
    progress: bool = False,
) -> SensitivityReport:
    """Rank the layers ``quantize`` would quantize by the output SQNR they cost (one at a time, and all but one).

    The layers and ranges are those ``quantize`` uses before its weight techniques: after SmoothQuant and
    equalization, with the depthwise Convs ``uneven-depthwise`` leaves float left out (its ``--target-sqnr``
    ranks the same way).
    """
    config = checked_config(config)
    source = load_model(model)
    prepared, notes = prepare(source, config.quant_scheme())
    check_loads(prepared, source, model)
    specs = input_specs(prepared)
    calibration = open_data(calibration_data, specs, config.batch_size)
    evaluation = open_data(evaluation_data, specs, config.batch_size)
    plan = plan_quantization(prepared, config.placement())
    working, plan, ranges, _ = calibrated_plan(prepared, plan, calibration, config, None, notes, progress=progress)
    evaluator = Evaluator(working, ranges, evaluation, make_session(prepared, what="the float model"),
                          config.weights, config.quant_scheme())
    return layer_sensitivity(plan, evaluator, progress=progress)


def explain(model: str | os.PathLike[str] | onnx.ModelProto, *, config: QuantizeConfig | None = None) -> QuantPlan:
    """The placement plan ``quantize`` would follow for ``model``: every node's decision, rule and reason."""
    return explained(model, checked_config(config))[1]


def explain_techniques(model: str | os.PathLike[str] | onnx.ModelProto, *,
                       config: QuantizeConfig | None = None) -> list[str]:
    """What the accuracy techniques of ``config.optimize`` would do on ``model`` (data-free part), one per line."""
    config = checked_config(config)
    return describe_techniques(*explained(model, config), config)


def explained(model: str | os.PathLike[str] | onnx.ModelProto, config: QuantizeConfig
              ) -> tuple[onnx.ModelProto, QuantPlan]:
    """The prepared model and its plan, as ``quantize`` makes them before any data is read."""
    prepared, _ = prepare(load_model(model), config.quant_scheme())
    return prepared, plan_quantization(prepared, config.placement())


def note_constant_inputs(model: onnx.ModelProto, notes: list[str]) -> None:
    """Graph inputs that also have an initializer are constants here (their default is used, nothing is fed)."""
    initializers = {i.name for i in model.graph.initializer}
    if both := [i.name for i in model.graph.input if i.name in initializers]:
        notes.append(f"{len(both)} graph inputs also have an initializer ({', '.join(map(shown, both[:3]))}"
                     f"{', ...' if len(both) > 3 else ''}): qdq treats them as constants and feeds them no data")
        log.info("%s", notes[-1])


def checked_config(config: object) -> QuantizeConfig:
    """``config``, or the defaults for ``None``; anything else is an error saying what is expected."""
    if config is None:
        return QuantizeConfig()
    if not isinstance(config, QuantizeConfig):
        raise ArgumentError(f"config must be a qdq.QuantizeConfig, e.g. QuantizeConfig(method=\"max\"); got a "
                            f"{type(config).__name__}")
    return config


def why_nothing_to_quantize(model: onnx.ModelProto, plan: QuantPlan) -> str:
    """Why a plan quantizes nothing: the layers the rules left float (by rule), and those inside control flow."""
    kinds = "Conv/ConvTranspose/Gemm/MatMul nodes"
    rules = Counter(d.rule for d in plan.decisions if d.op in WEIGHTED_OPS)
    inside = sum(inner.op_type in WEIGHTED_OPS for n in model.graph.node for inner in nested_nodes(n))
    why = []
    if rules:
        by_rule = ", ".join(f"{rule}: {count}" for rule, count in rules.most_common())
        why.append(f"the placement rules leave its {rules.total()} {kinds} float ({by_rule}; `qdq explain` says "
                   "why for each)")
    if inside:
        why.append(f"{inside} more are inside If/Loop/Scan subgraphs, which qdq leaves float" if rules else
                   f"its {inside} {kinds} are all inside If/Loop/Scan subgraphs, which qdq leaves float")
    return "; ".join(why) or "the model has no Conv, ConvTranspose, Gemm or MatMul"


def check_loads(prepared: onnx.ModelProto, source: onnx.ModelProto, model: object) -> None:
    """ONNX Runtime must load the float model before any work: an opset or op it lacks is the input's problem,
    unless the input loads and only its prepared form does not, which is qdq's.

    Loaded without their large weights (they become inputs) and unoptimised: a check, not a session to keep.
    """
    where = f"the input model {model}" if isinstance(model, str | os.PathLike) else "the input model"
    try:
        make_session(structure_only(prepared), optimize=False, what=f"{where} (before quantization)")
    except ModelError as failed:
        make_session(structure_only(source), optimize=False, what=where)
        raise ModelError(f"qdq's preparation of {where} (opset upgrade, constant folding, BatchNorm folding) made a "
                         f"model ONNX Runtime cannot load, though the input loads: {failed}. This is a bug in qdq: "
                         "please report it with the model") from failed
    check_qdq_opset(next((o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx")), 13), where)


def plan_ranges(model: onnx.ModelProto, plan: QuantPlan, calibration: Dataset | None, config: QuantizeConfig,
                given: TensorRanges | None, notes: list[str], *, progress: bool = False) -> TensorRanges:
    """A range for every planned activation: from ``given`` (directly or through copy ops), else calibrated.

    Tensors the plan groups (a Concat and its quantized inputs) then share the group's largest range.
    """
    needed = plan.activation_names()
    known = given or TensorRanges({}, method=config.method)
    if given is not None:
        known, inherited = inherit_through_copies(model, needed, known)
        notes.extend(inherited)
    if missing := [name for name in needed if name not in known]:
        if calibration is None:
            raise CalibrationError(f"{len(missing)} tensors to quantize have no range: "
                                   f"{describe_missing(missing, known)}; pass calibration data to calibrate them")
        known = known.merged(collect_ranges(model, missing, calibration, config.calibration(), plan=plan,
                                            progress=progress))
    return known.subset(needed).shared(plan.shared_scales)


def check_weights(model: onnx.ModelProto, plan: QuantPlan) -> None:
    """Weights to quantize must be finite and not empty: their scales come from max|w|."""
    initializers = {i.name: i for i in model.graph.initializer}
    for name in dict.fromkeys(name for name, _ in plan.weights()):
        values = onnx.numpy_helper.to_array(initializers[name])
        if values.size == 0:
            raise ModelError(f"weight {shown(name)} is empty (shape {list(values.shape)}): the model is damaged")
        if not np.isfinite(values).all():
            raise ModelError(f"weight {shown(name)} holds {values.size - np.count_nonzero(np.isfinite(values))} "
                             "NaN/Inf values: fix the model, or exclude the layers that use it (--exclude-nodes)")


def note_bounds(ranges: TensorRanges, scheme: Scheme, notes: list[str]) -> None:
    """Say which ranges the scheme's floor or ceiling changed (each Q node's doc string gives the value used)."""
    changed = [f"{shown(name)} {ranges.amax[name]:.3g} {note}" for name in ranges
               if (name not in ranges.scales or scheme != INT8) and (note := bounds_note(scheme, ranges.amax[name]))]
    if changed:
        notes.append(f"{len(changed)} ranges are outside [{scheme.amax_floor:.6g}, {scheme.amax_ceiling:.6g}], the "
                     "amax its scales can hold: "
                     + "; ".join(changed[:5]) + ("; ..." if len(changed) > 5 else ""))
        log.warning("%s", notes[-1])


def warn_unknown_names(ranges: TensorRanges, model: onnx.ModelProto) -> None:
    """List the names of a range file that the user's model (before preparation) does not have (If branches'
    tensors count: their ranges are used)."""
    present = defined_names(model.graph)
    if unknown := [name for name in ranges if name not in present]:
        log.warning("%d names in the range file are not tensors of this model and are ignored: %s",
                    len(unknown), ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))


def describe_missing(missing: list[str], known: TensorRanges) -> str:
    parts = []
    for name in missing[:5]:
        near = difflib.get_close_matches(name, list(known), n=1)
        parts.append(shown(name) + (f" (did you mean {shown(near[0])}?)" if near else ""))
    return ", ".join(parts) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")


def float_reasons(plan: QuantPlan) -> str:
    """Why each Conv/ConvTranspose/Gemm/MatMul stayed float, as compact JSON (read back by ``qdq inspect``)."""
    reasons = {d.node: f"[{d.rule}] {d.reason}" for d in plan.decisions
               if not d.quantized and d.op in WEIGHTED_OPS}
    return json.dumps(reasons, sort_keys=True, separators=(",", ":"))


def stamp_metadata(model: onnx.ModelProto, config: QuantizeConfig, report: Report, ranges: TensorRanges,
                   plan: QuantPlan) -> None:
    """Record tool, options and a summary in the model's metadata (shown by Netron's model properties)."""
    entries = {
        "qdq.version": __version__,
        REASONS_KEY: float_reasons(plan),
        "qdq.options": config.to_json(),
        "qdq.summary": json.dumps({**report.summary(), "method": ranges.method, "samples": ranges.samples},
                                  sort_keys=True, separators=(",", ":")),
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def check_quantized(model: onnx.ModelProto) -> None:
    """The output must pass ONNX's full check, TensorRT's rules, and load in ONNX Runtime; else it is qdq's bug."""
    try:
        check_in_memory(model, full=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OutputError(f"the quantized model fails the ONNX checker: {first_line(exc)}") from exc
    findings = check_model(model)
    if errors := [f for f in findings if f.severity == "error"]:
        raise OutputError(f"the quantized model breaks {len(errors)} TensorRT rules (a qdq bug, please report): "
                          + "; ".join(map(str, errors[:3])))
    for finding in findings:
        log.warning("%s", finding)
    quantized_session(model)  # a load check
