"""The subcommands behind ``qdq``: each a thin function from parsed arguments to the library API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from qdq.calibrate.data import input_specs, open_data
from qdq.check import check_model
from qdq.compare import Comparison, attribute_error, compare_models, load_labels
from qdq.config import QuantizeConfig
from qdq.errors import MissingDependencyError, ModelError, QdqError, printable
from qdq.files import RunFiles, regular_file
from qdq.inspect import inspect_model
from qdq.model_io import load_model
from qdq.optimize.pipeline import describe_techniques
from qdq.quantize import QuantizeResult, calibrate, explained, quantize, sensitivity
from qdq.range_files import format_for_path, read_ranges, write_ranges
from qdq.report import write_report


class UsageError(QdqError):
    """Arguments that parse but do not go together."""

    exit_code = 2


def make_config(args: argparse.Namespace, **extra) -> QuantizeConfig:
    """The QuantizeConfig of whichever option groups this command has."""
    options = {name: getattr(args, name) for name in ("method", "percentile", "num_bins", "max_tensors_per_pass",
                                                      "batch_size", "exclude_nodes", "exclude_op_types",
                                                      "include_op_types", "scheme", "workers",
                                                      "ray_address", "optimize", "techniques")
               if hasattr(args, name)}
    if hasattr(args, "per_tensor_weights"):
        options["per_channel"] = not args.per_tensor_weights
    try:
        return QuantizeConfig(**options, **extra)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_quantize(args: argparse.Namespace) -> int:
    config = make_config(args, weights=args.weights, high_precision=args.high_precision, target_sqnr=args.target_sqnr,
                         max_top1_drop=args.max_top1_drop)
    evaluation = args.eval or args.calib
    if args.save_ranges:
        format_for_path(args.save_ranges)
    with RunFiles() as files:  # every output checked against every input before the long work; committed together
        files.reads_model(args.model)
        files.reads(args.calib, "--calib data")
        files.reads(args.eval, "--eval data")
        files.reads(args.labels, "--labels")
        files.reads(args.ranges, "--ranges")
        output = files.writes(args.output, "-o")
        save_ranges = files.writes(args.save_ranges, "--save-ranges") if args.save_ranges else None
        report = files.writes(args.report, "--report") if args.report else None
        ranges = read_ranges(args.ranges, args.ranges_format) if args.ranges else None
        labels = load_labels(args.labels) if args.labels else None
        result = quantize(args.model, args.calib, config=config, ranges=ranges, evaluation_data=evaluation,
                          labels=labels, progress=not args.quiet)
        result.save(output)
        if save_ranges:
            write_ranges(result.ranges, save_ranges, format_for_path(args.save_ranges))
        if report:
            write_report(report, title=f"qdq quantize {args.model.name}", comparison=result.report.comparison,
                         ranges=result.ranges, notes=result.report.notes)
        size = output.stat().st_size
    if args.json:
        comparison = result.report.comparison
        print_json({"output": str(args.output), **result.report.summary(), "notes": list(result.report.notes),
                    "ranges": dict(result.ranges.amax), "method": result.ranges.method,
                    "chosen_by": {n: result.ranges.source(n) for n in result.ranges},
                    "comparison": None if comparison is None else comparison.to_dict(),
                    "seconds": result.report.seconds} | ({"plan": result.plan.to_dict()} if args.explain else {}))
        return 0
    if args.explain:
        say(result.plan.explain())
        for name in result.ranges:
            say(f"range: {name}  amax={result.ranges.amax[name]:.6g}  chosen by {result.ranges.source(name)}")
    print_summary(result, args.output, size, evaluation)
    return 0


def describe_method(method: str) -> str:
    """How ``qdq explain`` says the ranges will be chosen (it runs no data, so no amax yet)."""
    if method == "auto":
        return ("--method auto: per tensor, the candidate (max, entropy, MSE, percentiles, a grid) with the least "
                "error in the consuming layers' outputs (past an Add or a pooling, in the layers they lead to); the "
                "chosen one is listed by quantize --explain, the report, and each QuantizeLinear's doc string")
    return f"--method {method} for every tensor"


def run_explain(args: argparse.Namespace) -> int:
    config = make_config(args)
    prepared, plan = explained(args.model, config)  # prepared once: its notes are said once
    techniques = describe_techniques(prepared, plan, config)
    if args.json:
        print_json({**plan.to_dict(), "techniques": techniques})
    else:
        say(plan.explain())
        say("\n".join(techniques))
        quantized = plan.quantized_nodes()
        say(f"{len(quantized)} of {len(plan.decisions)} nodes quantized, {len(plan.activation_names())} "
              f"activations and {len(plan.weights())} weights with Q/DQ")
        say(f"activation ranges: {describe_method(args.method)}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from qdq import trt_plan  # TensorRT itself is imported by qdq.trt, on use

    shapes = trt_plan.parse_shapes(args.shapes)
    model = load_model(args.model)
    trt_plan.check_shapes(model, shapes)
    version = args.trt_version or trt_plan.installed_tensorrt_major() or 10
    options = {"workspace_mb": args.workspace_mb, "timing_cache": args.timing_cache, "shapes": shapes}
    if args.dry_run:
        plan = trt_plan.build_plan(model, args.model, args.output, trt_version=version, **options)
        say(plan.describe(with_command=False))
        say_command(plan.trtexec)
        return 0
    say_command(trt_plan.trtexec_command(args.model, args.output, trt_version=version, **options))
    from qdq import trt

    with RunFiles() as files:
        files.reads_model(args.model)
        files.reads(args.verify, "--verify")
        if args.timing_cache:
            # A cache is read and rewritten in place (merged, as Polygraphy does): never the engine's path.
            files.updates(args.timing_cache, "--timing-cache")
        engine = files.writes(args.output, "-o")
        result = trt.build_engine(args.model, engine, **options,
                                  quantized_nodes=trt_plan.quantized_node_names(model),
                                  node_order=[n.name for n in model.graph.node])
        say(result.summary.describe())
        if args.verify:
            comparison = trt.verify_engine(model, result.engine, args.verify, batch_size=args.batch_size)
            print_comparison(comparison, f"{args.verify} (TensorRT vs ONNX Runtime)")
    say(f"wrote {args.output}")
    return 0


def say_command(line: str) -> None:
    """A shell command line is printed whole (long paths are not shortened) unless it holds control characters."""
    if line.isprintable():
        print(line)
    else:
        say(line)


def run_compare(args: argparse.Namespace) -> int:
    with RunFiles() as files:
        files.reads_model(args.float_model)
        files.reads_model(args.quant_model)
        files.reads(args.data, "--data")
        files.reads(args.labels, "--labels")
        report = files.writes(args.report, "--report") if args.report else None
        float_model, quant_model = load_model(args.float_model), load_model(args.quant_model)
        specs = input_specs(float_model)
        labels = load_labels(args.labels) if args.labels else None
        comparison = compare_models(float_model, quant_model, open_data(args.data, specs, args.batch_size), labels,
                                    progress=not args.quiet)
        errors = [] if args.per_tensor is None else attribute_error(
            float_model, quant_model, open_data(args.data, specs, args.batch_size), progress=not args.quiet
        )[:args.per_tensor]
        if report:
            write_report(report, title=f"qdq compare {args.quant_model.name}", comparison=comparison,
                         attribution=errors)
    if args.json:
        doc = comparison.to_dict() | {"tensors": [
            {"tensor": e.tensor, "local": vars(e.local), "total": vars(e.total), "worst_channel": e.worst_channel,
             "worst_channel_db": e.worst_channel_db} for e in errors]}
        print_json(doc)
        return 0
    print_comparison(comparison, args.data, full=True)
    if errors:
        say("quantized tensors adding the most error (SQNR of the Q/DQ output against its input: whole tensor "
            "and worst channel; and against the float model):")
        for e in errors:
            total = ("rescaled by SmoothQuant: no float tensor to compare with" if math.isnan(e.total.sqnr_db)
                     else f"{e.total.sqnr_db:7.2f} dB")
            say(f"  {e.tensor:<40} added {e.local.sqnr_db:7.2f} dB (channel {e.worst_channel}: "
                f"{e.worst_channel_db:7.2f} dB)   accumulated {total}")
    return 0


def run_sensitivity(args: argparse.Namespace) -> int:
    if not args.calib:
        raise UsageError("sensitivity needs --calib DATA (and optionally --eval DATA)")
    with RunFiles() as files:
        files.reads_model(args.model)
        files.reads(args.calib, "--calib data")
        files.reads(args.eval, "--eval data")
        report_path = files.writes(args.report, "--report") if args.report else None
        report = sensitivity(args.model, args.calib, args.eval or args.calib, config=make_config(args),
                             progress=not args.quiet)
        if report_path:
            write_report(report_path, title=f"qdq sensitivity {args.model.name}", sensitivity=report)
    if args.json:
        print_json(report.to_dict())
    else:
        say(report.describe())
    return 0


def run_view(args: argparse.Namespace) -> int:
    regular_file(args.model, "model", error=ModelError)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: a TCP port is between 1 and 65535")
    try:
        import netron
    except ImportError as exc:
        raise MissingDependencyError("Netron is not installed: pip install 'qdq[view]' (or open the file at "
                                     "netron.app)") from exc
    address = netron.start(str(args.model), address=("localhost", args.port), browse=not args.no_browser)
    host, port = address if isinstance(address, tuple) else ("localhost", args.port)
    print(printable(f"serving {args.model} at http://{host}:{port} (Ctrl-C to stop)"), flush=True)
    netron.wait()
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    found = inspect_model(load_model(args.model))
    if args.json:
        print_json(found.to_dict())
    else:
        say(found.describe())
    return 0


def run_check(args: argparse.Namespace) -> int:
    findings = check_model(load_model(args.model))
    errors = sum(f.severity == "error" for f in findings)
    if args.json:
        print_json([dataclasses.asdict(f) for f in findings])
    else:
        for finding in findings:
            say(str(finding))
        say(f"{args.model}: {errors} errors, {len(findings) - errors} warnings")
    return 1 if errors else 0


def run_ranges(args: argparse.Namespace) -> int:
    fmt = args.format or format_for_path(args.output)
    if args.source is not None and (args.model is not None or args.calib):
        raise UsageError("give either --from FILE (convert) or MODEL --calib DATA (calibrate), not both")
    if args.source is None and (args.model is None or not args.calib):
        raise UsageError("give MODEL and --calib DATA to calibrate, or --from FILE to convert")
    with RunFiles() as files:
        if args.source is not None:
            files.reads(args.source, "--from")
        else:
            files.reads_model(args.model)
            files.reads(args.calib, "--calib data")
        output = files.writes(args.output, "-o")
        if args.source is not None:
            ranges = read_ranges(args.source, args.from_format)
        else:
            ranges = calibrate(args.model, args.calib, config=make_config(args), progress=not args.quiet)
        write_ranges(ranges, output, fmt)
    say(f"wrote {len(ranges)} ranges to {args.output} ({fmt})")
    return 0


def print_summary(result: QuantizeResult, output: Path, size: int, evaluation: str | None) -> None:
    report = result.report
    say(f"quantized {report.quantized_nodes} of {report.total_nodes} nodes: {report.activations} activations "
        f"(per tensor, {result.ranges.method} on {result.ranges.samples} samples), {report.weights} weights")
    if report.comparison is not None:
        print_comparison(report.comparison, evaluation, quantized=report.scheme)
    say(f"wrote {output} ({size / 1e6:.2f} MB) in {report.seconds:.1f} s")


def print_comparison(comparison: Comparison, source: str | None, *, full: bool = False,
                     quantized: str = "int8") -> None:
    say(f"{quantized} vs float on {comparison.samples} samples of {source}:")
    width = max(len("output"), *(len(o.name) for o in comparison.outputs))
    extra = f"  {'cosine':>9}  {'mean abs err':>12}" if full else ""
    say(f"  {'output':<{width}}  {'SQNR dB':>8}  {'max abs err':>11}  {'top-1 agree':>11}{extra}")
    for o in comparison.outputs:
        agree = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%"
        more = f"  {o.cosine:>9.6f}  {o.mean_abs_error:>12.4g}" if full else ""
        say(f"  {o.name:<{width}}  {o.sqnr_db:>8.2f}  {o.max_abs_error:>11.4g}  {agree:>11}{more}")
    for o in comparison.outputs:
        if o.shape_mismatches:
            say(f"  {o.name}: float and {quantized} gave it different shapes on {o.shape_mismatches} runs (a length "
                "that depends on the values, as detections above a threshold): "
                + ("its figures cover the other runs" if not math.isnan(o.sqnr_db) else "no run to compare it on"))
    if comparison.float_accuracy is not None and comparison.quant_accuracy is not None:
        say(f"accuracy: float {100 * comparison.float_accuracy:.2f}%  "
            f"{quantized} {100 * comparison.quant_accuracy:.2f}%")


def say(text: str) -> None:
    """Print for people: control characters (from model or file names) escaped, overlong names shortened."""
    print(printable(text))


def print_json(doc: object) -> None:
    """Print strict JSON: NaN and infinities (an SQNR of a perfect match, say) become null."""
    print(json.dumps(finite_only(doc), indent=1, allow_nan=False))


def finite_only(value: object) -> object:
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): finite_only(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_only(v) for v in value]
    return value
