"""The ``qdq`` command: thin subcommands over the library API.

Exit codes: 0 success, 1 bad input or a failed check (one line on stderr), 2 usage error,
3 a missing optional dependency, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from qdq import __version__
from qdq.calibrate.data import input_specs, open_data
from qdq.check import check_model
from qdq.compare import Comparison, attribute_error, compare_models, load_labels
from qdq.config import HIGH_PRECISIONS, METHODS, WEIGHT_FORMATS, QuantizeConfig
from qdq.errors import MissingDependencyError, QdqError
from qdq.inspect import inspect_model
from qdq.model_io import check_writable, load_model
from qdq.quantize import QuantizeResult, calibrate, explain, quantize, sensitivity
from qdq.range_files import FORMATS, format_for_path, read_ranges, write_ranges
from qdq.report import write_report

log = logging.getLogger("qdq")


class UsageError(QdqError):
    """Arguments that parse but do not go together."""

    exit_code = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = setup_logging(quiet=args.quiet, debug=args.debug)
    try:
        return args.run(args)
    except QdqError as exc:
        print(f"qdq: error: {exc}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        print("qdq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in qdq: still one line, with the way to learn more
        print(f"qdq: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return 1
    finally:
        log.removeHandler(handler)
        log.propagate = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdq", description="Quantize float ONNX models to explicit INT8 "
                                     "Q/DQ for TensorRT.")
    parser.add_argument("--version", action="version", version=f"qdq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    q = commands.add_parser("quantize", parents=[common], help="quantize a float model",
                            description="Insert Q/DQ pairs (INT8, symmetric, per-channel weights) and write the "
                                        "quantized model.")
    q.add_argument("model", type=Path, help="float ONNX model")
    q.add_argument("-o", "--output", type=Path, required=True, help="where to write the quantized model")
    add_data_args(q)
    add_method_args(q)
    q.add_argument("--weights", choices=WEIGHT_FORMATS, default="int8",
                   help="store quantized weights as int8 + DequantizeLinear (default, 4x smaller) or float + Q/DQ")
    add_placement_args(q)
    q.add_argument("--high-precision", choices=HIGH_PRECISIONS, default="fp32",
                   help="precision of the parts left out of INT8: fp32 (default) or fp16, with normalisations, "
                        "Softmax, reductions and exp/log/pow kept in fp32")
    q.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    q.add_argument("--report", type=Path, metavar="FILE",
                   help="write an HTML report (comparison, range histograms with the chosen amax)")
    q.add_argument("--target-sqnr", type=float, metavar="DB",
                   help="leave the most sensitive layers float until the first output's SQNR on --eval reaches DB")
    q.add_argument("--max-top1-drop", type=float, metavar="PCT",
                   help="leave the most sensitive layers float until top-1 agreement with float on --eval is at "
                        "least 100-PCT percent")
    q.add_argument("--explain", action="store_true", help="print each node's placement decision and reason")
    q.add_argument("--ranges", type=Path, metavar="FILE",
                   help="known ranges: name:amax text, TensorRT calibration cache or qdq JSON; tensors it lacks "
                        "are calibrated with --calib")
    q.add_argument("--ranges-format", choices=FORMATS, help="the --ranges file's format (default: from its content)")
    q.add_argument("--save-ranges", type=Path, metavar="FILE",
                   help="also write the ranges used (.txt, .cache or .json)")
    q.set_defaults(run=run_quantize)

    e = commands.add_parser("explain", parents=[common], help="show where Q/DQ would go, and why",
                            description="Print, for each node of the prepared model, whether it would be quantized "
                                        "and the rule and reason that decided. Needs no data.")
    e.add_argument("model", type=Path, help="float ONNX model")
    add_placement_args(e)
    e.add_argument("--json", action="store_true", help="print the plan as JSON")
    e.set_defaults(run=run_explain)

    c = commands.add_parser("check", parents=[common], help="check a Q/DQ model against what TensorRT accepts",
                            description="Validate an explicitly quantized model against TensorRT's rules (scales, "
                                        "zero points, per-channel axes, pairing, unsupported ops). Needs no "
                                        "TensorRT. Exit 1 when there are errors.")
    c.add_argument("model", type=Path, help="quantized ONNX model (from qdq or any other tool)")
    c.add_argument("--json", action="store_true", help="print the findings as JSON")
    c.set_defaults(run=run_check)

    b = commands.add_parser("build", parents=[common], help="build a TensorRT engine from a Q/DQ model",
                            description="Build a TensorRT engine (strongly typed: INT8 where the graph has Q/DQ) "
                                        "and report which layers run in which precision. Needs TensorRT and a GPU; "
                                        "prints the equivalent trtexec command either way.")
    b.add_argument("model", type=Path, help="quantized ONNX model")
    b.add_argument("-o", "--output", type=Path, required=True, help="where to write the engine")
    b.add_argument("--workspace-mb", type=int, metavar="N", help="builder workspace limit in MiB")
    b.add_argument("--timing-cache", type=Path, metavar="FILE", help="read and update this timing cache")
    b.add_argument("--shapes", nargs="+", default=[], metavar="NAME:SHAPE",
                   help="input shapes for dynamic dims: name:1x3x224x224 or name:MIN,OPT,MAX")
    b.add_argument("--verify", metavar="DATA", help="run the engine on DATA and compare with ONNX Runtime")
    b.add_argument("--batch-size", type=int, metavar="N", help="samples per run for --verify")
    b.set_defaults(run=run_build)

    cmp = commands.add_parser("compare", parents=[common], help="compare a quantized model with the float one",
                              description="Per output: SQNR, cosine similarity, max and mean abs error, top-1 "
                                          "agreement; accuracy with --labels; with --per-tensor, the quantized "
                                          "tensors that add the most error.")
    cmp.add_argument("float_model", type=Path, help="float ONNX model")
    cmp.add_argument("quant_model", type=Path, help="quantized ONNX model")
    cmp.add_argument("--data", required=True, metavar="DATA", help="evaluation data (.npz or a folder of them)")
    cmp.add_argument("--labels", type=Path, metavar="FILE", help=".npy of class labels, for accuracy")
    cmp.add_argument("--batch-size", type=int, metavar="N", help="samples per run for a dynamic batch axis")
    cmp.add_argument("--per-tensor", type=int, nargs="?", const=10, metavar="N",
                     help="also list the N quantized tensors (default 10) that add the most error")
    cmp.add_argument("--json", action="store_true", help="print the results as JSON")
    cmp.add_argument("--report", type=Path, metavar="FILE", help="also write an HTML report")
    cmp.set_defaults(run=run_compare)

    sens = commands.add_parser("sensitivity", parents=[common], help="rank layers by the accuracy they cost",
                               description="Quantize one layer at a time, and all but one layer at a time, and "
                                           "rank the layers by the first output's SQNR against the float model.")
    sens.add_argument("model", type=Path, help="float ONNX model")
    add_data_args(sens, evaluation=False)
    sens.add_argument("--eval", metavar="DATA", help="data to measure on (default: --calib)")
    add_method_args(sens)
    add_placement_args(sens)
    sens.add_argument("--json", action="store_true", help="print the ranking as JSON")
    sens.add_argument("--report", type=Path, metavar="FILE", help="also write an HTML report with the chart")
    sens.set_defaults(run=run_sensitivity)

    view = commands.add_parser("view", parents=[common], help="open a model in Netron, served on localhost",
                               description="Serve the model with Netron (pip install 'qdq[view]') on localhost and "
                                           "open a browser, until interrupted.")
    view.add_argument("model", type=Path, help="ONNX model")
    view.add_argument("--port", type=int, default=8080, help="port on localhost (default 8080)")
    view.add_argument("--no-browser", action="store_true", help="only serve; print the address")
    view.set_defaults(run=run_view)

    ins = commands.add_parser("inspect", parents=[common], help="list a quantized model's Q/DQ pairs and scales",
                              description="Q/DQ pairs, per-channel or per-tensor, the scale table, the ops that "
                                          "take int8 inputs, and the weighted layers left float (with qdq's "
                                          "reasons when qdq made the model). Works on models from other tools.")
    ins.add_argument("model", type=Path, help="quantized ONNX model")
    ins.add_argument("--json", action="store_true", help="print as JSON")
    ins.set_defaults(run=run_inspect)

    r = commands.add_parser("ranges", parents=[common], help="collect ranges, or convert a range file",
                            description="Calibrate a model and write its ranges, or convert a range file between "
                                        "formats (text name:amax, TensorRT calibration cache, qdq JSON).")
    r.add_argument("model", type=Path, nargs="?", help="float ONNX model to calibrate (not with --from)")
    r.add_argument("-o", "--output", type=Path, required=True, help="ranges file to write: .txt, .cache or .json")
    r.add_argument("--format", choices=FORMATS, help="output format (default: from the output's suffix)")
    r.add_argument("--from", dest="source", type=Path, metavar="FILE", help="convert this range file instead")
    r.add_argument("--from-format", choices=FORMATS, help="the --from file's format (default: from its content)")
    add_data_args(r, evaluation=False)
    add_method_args(r)
    r.set_defaults(run=run_ranges)
    return parser


def add_data_args(parser: argparse.ArgumentParser, *, evaluation: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--calib", metavar="DATA",
                       help=".npz keyed by input name (first axis: samples), or a folder of them")
    if evaluation:
        group.add_argument("--eval", metavar="DATA", help="data to compare float and int8 on (default: --calib)")
        group.add_argument("--labels", type=Path, metavar="FILE",
                           help=".npy of class labels for the evaluation data, to report accuracy")
    group.add_argument("--batch-size", type=int, metavar="N",
                       help="samples per run for a dynamic batch axis (default: the model's fixed batch, else 16)")


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("placement")
    group.add_argument("--exclude-nodes", nargs="+", default=[], metavar="REGEX",
                       help="keep nodes whose name matches a regular expression in float")
    group.add_argument("--exclude-op-types", nargs="+", default=[], metavar="OP",
                       help="keep these op types in float (e.g. MatMul)")
    group.add_argument("--include-op-types", nargs="+", default=[], metavar="OP",
                       help="also quantize these op types (e.g. Add Mul Resize)")
    group.add_argument("--per-tensor-weights", action="store_true",
                       help="one scale per weight tensor instead of one per output channel")


def add_method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument("--method", choices=METHODS, default="entropy",
                       help="activation range method (default: entropy, as TensorRT's entropy calibrator)")
    group.add_argument("--percentile", type=float, default=99.99, metavar="P",
                       help="percentile of |x| for --method percentile (default: 99.99)")
    group.add_argument("--num-bins", type=int, default=2048, metavar="N",
                       help="histogram bins for entropy/percentile/mse (default: 2048)")
    group.add_argument("--max-tensors-per-pass", type=int, metavar="N",
                       help="observe at most N tensors per pass over the data (bounds memory on big models)")


def make_config(args: argparse.Namespace, **extra) -> QuantizeConfig:
    """The QuantizeConfig of whichever option groups this command has."""
    options = {name: getattr(args, name) for name in ("method", "percentile", "num_bins", "max_tensors_per_pass",
                                                      "batch_size", "exclude_nodes", "exclude_op_types",
                                                      "include_op_types") if hasattr(args, name)}
    if hasattr(args, "per_tensor_weights"):
        options["per_channel"] = not args.per_tensor_weights
    try:
        return QuantizeConfig(**options, **extra)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_quantize(args: argparse.Namespace) -> int:
    output = check_writable(args.output, not_same_as=args.model)  # fail before the long work
    config = make_config(args, weights=args.weights, high_precision=args.high_precision, target_sqnr=args.target_sqnr,
                         max_top1_drop=args.max_top1_drop)
    ranges = read_ranges(args.ranges, args.ranges_format) if args.ranges else None
    labels = load_labels(args.labels) if args.labels else None
    evaluation = args.eval or args.calib
    if args.save_ranges:
        check_writable(args.save_ranges)
        format_for_path(args.save_ranges)
    if args.report:
        check_writable(args.report)
    result = quantize(args.model, args.calib, config=config, ranges=ranges, evaluation_data=evaluation,
                      labels=labels, progress=not args.quiet)
    if args.explain:
        print(result.plan.explain())
    result.save(output)
    if args.save_ranges:
        result.ranges.save(args.save_ranges)
    if args.report:
        write_report(args.report, title=f"qdq quantize {args.model.name}", comparison=result.report.comparison,
                     ranges=result.ranges, notes=result.report.notes)
    if args.json:
        comparison = result.report.comparison
        print(json.dumps({"output": str(output), **result.report.summary(), "notes": list(result.report.notes),
                          "ranges": dict(result.ranges.amax), "method": result.ranges.method,
                          "comparison": None if comparison is None else comparison.to_dict(),
                          "seconds": result.report.seconds}, indent=1))
        return 0
    print_summary(result, output, evaluation)
    return 0


def run_explain(args: argparse.Namespace) -> int:
    plan = explain(args.model, config=make_config(args))
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.explain())
    if not args.json:
        quantized = plan.quantized_nodes()
        print(f"{len(quantized)} of {len(plan.decisions)} nodes quantized, {len(plan.activation_names())} "
              f"activations and {len(plan.weights())} weights with Q/DQ")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from qdq import trt  # TensorRT itself is imported inside, on use

    shapes = trt.parse_shapes(args.shapes)
    model = load_model(args.model)
    print(trt.trtexec_command(args.model, args.output, workspace_mb=args.workspace_mb, timing_cache=args.timing_cache,
                              shapes=shapes))
    result = trt.build_engine(args.model, args.output, workspace_mb=args.workspace_mb, timing_cache=args.timing_cache,
                              shapes=shapes, quantized_nodes=quantized_node_names(model))
    print(result.summary.describe())
    print(f"wrote {result.engine}")
    if args.verify:
        comparison = trt.verify_engine(model, result.engine, args.verify, batch_size=args.batch_size)
        print_comparison(comparison, f"{args.verify} (TensorRT vs ONNX Runtime)")
    return 0


def quantized_node_names(model) -> set[str]:
    """Nodes reading at least one DequantizeLinear output: the layers that should run INT8."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type != "QuantizeLinear" and set(n.input) & dequantized}


def run_compare(args: argparse.Namespace) -> int:
    if args.report:
        check_writable(args.report)
    float_model, quant_model = load_model(args.float_model), load_model(args.quant_model)
    specs = input_specs(float_model)
    labels = load_labels(args.labels) if args.labels else None
    comparison = compare_models(float_model, quant_model, open_data(args.data, specs, args.batch_size), labels,
                                progress=not args.quiet)
    errors = [] if args.per_tensor is None else attribute_error(
        float_model, quant_model, open_data(args.data, specs, args.batch_size), progress=not args.quiet
    )[:args.per_tensor]
    if args.report:
        write_report(args.report, title=f"qdq compare {args.quant_model.name}", comparison=comparison,
                     attribution=errors)
    if args.json:
        doc = comparison.to_dict() | {"tensors": [
            {"tensor": e.tensor, "local": vars(e.local), "total": vars(e.total), "worst_channel": e.worst_channel,
             "worst_channel_db": e.worst_channel_db} for e in errors]}
        print(json.dumps(doc, indent=1))
        return 0
    print_comparison(comparison, args.data, full=True)
    if errors:
        print("quantized tensors adding the most error (SQNR of the Q/DQ output against its input: whole tensor "
              "and worst channel; and against the float model):")
        for e in errors:
            print(f"  {e.tensor:<40} added {e.local.sqnr_db:7.2f} dB (channel {e.worst_channel}: "
                  f"{e.worst_channel_db:7.2f} dB)   accumulated {e.total.sqnr_db:7.2f} dB")
    return 0


def run_sensitivity(args: argparse.Namespace) -> int:
    if not args.calib:
        raise UsageError("sensitivity needs --calib DATA (and optionally --eval DATA)")
    if args.report:
        check_writable(args.report)
    report = sensitivity(args.model, args.calib, args.eval or args.calib, config=make_config(args),
                         progress=not args.quiet)
    if args.report:
        write_report(args.report, title=f"qdq sensitivity {args.model.name}", sensitivity=report)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.describe())
    return 0


def run_view(args: argparse.Namespace) -> int:
    try:
        import netron
    except ImportError as exc:
        raise MissingDependencyError("Netron is not installed: pip install 'qdq[view]' (or open the file at "
                                     "netron.app)") from exc
    if not args.model.is_file():
        raise UsageError(f"{args.model}: no such file")
    address = netron.start(str(args.model), address=("localhost", args.port), browse=not args.no_browser)
    host, port = address if isinstance(address, tuple) else ("localhost", args.port)
    print(f"serving {args.model} at http://{host}:{port} (Ctrl-C to stop)", flush=True)
    netron.wait()
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    found = inspect_model(load_model(args.model))
    print(json.dumps(found.to_dict(), indent=1) if args.json else found.describe())
    return 0


def run_check(args: argparse.Namespace) -> int:
    findings = check_model(load_model(args.model))
    errors = sum(f.severity == "error" for f in findings)
    if args.json:
        print(json.dumps([dataclasses.asdict(f) for f in findings], indent=1))
    else:
        for finding in findings:
            print(finding)
        print(f"{args.model}: {errors} errors, {len(findings) - errors} warnings")
    return 1 if errors else 0


def run_ranges(args: argparse.Namespace) -> int:
    fmt = args.format or format_for_path(args.output)
    if args.source is not None:
        if args.model is not None or args.calib:
            raise UsageError("give either --from FILE (convert) or MODEL --calib DATA (calibrate), not both")
        ranges = read_ranges(args.source, args.from_format)
    else:
        if args.model is None or not args.calib:
            raise UsageError("give MODEL and --calib DATA to calibrate, or --from FILE to convert")
        check_writable(args.output, not_same_as=args.model)
        ranges = calibrate(args.model, args.calib, config=make_config(args), progress=not args.quiet)
    write_ranges(ranges, args.output, fmt)
    print(f"wrote {len(ranges)} ranges to {args.output} ({fmt})")
    return 0


def print_summary(result: QuantizeResult, output: Path, evaluation: str | None) -> None:
    report = result.report
    print(f"quantized {report.quantized_nodes} of {report.total_nodes} nodes: {report.activations} activations "
          f"(per tensor, {result.ranges.method} on {result.ranges.samples} samples), {report.weights} weights")
    if report.comparison is not None:
        print_comparison(report.comparison, evaluation)
    size = output.stat().st_size
    print(f"wrote {output} ({size / 1e6:.2f} MB) in {report.seconds:.1f} s")


def print_comparison(comparison: Comparison, source: str | None, *, full: bool = False) -> None:
    print(f"int8 vs float on {comparison.samples} samples of {source}:")
    width = max(len("output"), *(len(o.name) for o in comparison.outputs))
    extra = f"  {'cosine':>9}  {'mean abs err':>12}" if full else ""
    print(f"  {'output':<{width}}  {'SQNR dB':>8}  {'max abs err':>11}  {'top-1 agree':>11}{extra}")
    for o in comparison.outputs:
        agree = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%"
        more = f"  {o.cosine:>9.6f}  {o.mean_abs_error:>12.4g}" if full else ""
        print(f"  {o.name:<{width}}  {o.sqnr_db:>8.2f}  {o.max_abs_error:>11.4g}  {agree:>11}{more}")
    if comparison.float_accuracy is not None and comparison.quant_accuracy is not None:
        print(f"accuracy: float {100 * comparison.float_accuracy:.2f}%  int8 {100 * comparison.quant_accuracy:.2f}%")


def setup_logging(*, quiet: bool, debug: bool) -> logging.Handler:
    """Log qdq's progress and warnings to stderr, one ``qdq: ...`` line each, for this command only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("qdq: %(levelname)s: %(message)s" if debug else "qdq: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    return handler


if __name__ == "__main__":
    sys.exit(main())
