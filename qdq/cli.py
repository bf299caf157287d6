"""The ``qdq`` command: thin subcommands over the library API.

Exit codes: 0 success, 1 bad input or a failed check (one line on stderr), 2 usage error,
3 a missing optional dependency, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from qdq import __version__
from qdq.commands import (
    run_build,
    run_check,
    run_compare,
    run_explain,
    run_inspect,
    run_quantize,
    run_ranges,
    run_sensitivity,
    run_view,
)
from qdq.config import DEFAULT_METHOD, HIGH_PRECISIONS, METHODS, WEIGHT_FORMATS
from qdq.errors import QdqError, printable
from qdq.optimize import TECHNIQUES
from qdq.range_files import FORMATS
from qdq.scheme import SCHEMES

log = logging.getLogger("qdq")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = setup_logging(quiet=args.quiet, debug=args.debug)
    try:
        # stderr carries qdq's own lines only: numpy's RuntimeWarnings and ONNX Runtime's log lines only with --debug.
        with warnings.catch_warnings():
            warnings.simplefilter("default" if args.debug else "ignore")
            ort.set_default_logger_severity(2 if args.debug else 4)
            return args.run(args)
    except QdqError as exc:
        print(printable(f"qdq: error: {exc}").replace("\n", " "), file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        print("qdq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in qdq: still one line, with the way to learn more
        print(printable(f"qdq: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                        "traceback)").replace("\n", " "), file=sys.stderr)
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
    add_optimize_args(q)
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
    add_optimize_args(e)
    add_method_args(e)
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
                                        "prints the equivalent trtexec command either way (--dry-run: only what "
                                        "would be built).")
    b.add_argument("model", type=Path, help="quantized ONNX model")
    b.add_argument("-o", "--output", type=Path, required=True, help="where to write the engine")
    b.add_argument("--workspace-mb", type=int, metavar="N", help="builder workspace limit in MiB")
    b.add_argument("--timing-cache", type=Path, metavar="FILE", help="read and update this timing cache")
    b.add_argument("--shapes", nargs="+", default=[], metavar="NAME:SHAPE",
                   help="input shapes for dynamic dims: name:1x3x224x224 or name:MIN,OPT,MAX")
    b.add_argument("--verify", metavar="DATA", help="run the engine on DATA and compare with ONNX Runtime")
    b.add_argument("--batch-size", type=int, metavar="N", help="samples per run for --verify")
    b.add_argument("--dry-run", action="store_true",
                   help="print the profiles, the precision expected per node and the trtexec line; needs no TensorRT")
    b.add_argument("--trt-version", type=int, choices=(10, 11), metavar="10|11",
                   help="TensorRT version the printed trtexec line is for (default: the installed one, else 10)")
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


def add_optimize_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accuracy techniques")
    group.add_argument("--optimize", type=int, choices=(0, 1, 2), default=1,
                       help="0: nearest rounding only (fastest); 1 (default): cross-layer equalization where "
                            "predicted to pay, SmoothQuant, bias correction, and depthwise Convs with very uneven "
                            "input channels left float; 2: also learned rounding, kept where the outputs get "
                            "closer (slower)")
    group.add_argument("--techniques", type=technique_list, metavar="LIST",
                       help=f"exactly these techniques, comma-separated, instead of the level's "
                            f"({', '.join(TECHNIQUES)}; 'none' for none)")


def technique_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if names == ("none",):
        return ()
    if unknown := [t for t in names if t not in TECHNIQUES]:
        raise argparse.ArgumentTypeError(f"unknown technique {unknown[0]!r}: choose from {', '.join(TECHNIQUES)}")
    return names


def add_method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                       help=f"activation range method (default: {DEFAULT_METHOD}; entropy is TensorRT's entropy "
                            "calibration)")
    group.add_argument("--percentile", type=float, default=99.99, metavar="P",
                       help="percentile of |x| for --method percentile (default: 99.99)")
    group.add_argument("--num-bins", type=int, default=2048, metavar="N",
                       help="histogram bins for entropy/percentile/mse (default: 2048)")
    group.add_argument("--scheme", choices=tuple(SCHEMES), default="int8",
                       help="int8 (default: scale amax/127) or fp8 (E4M3, scale amax/448, opset 19)")
    group.add_argument("--workers", type=int, default=1, metavar="N",
                       help="calibrate in N local processes, each over a shard of the data (same ranges as one)")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", dest="ray_address",
                       help="calibrate the shards as Ray tasks: on the cluster at ADDRESS, or a local Ray without "
                            "one (pip install \"qdq[ray]\")")
    group.add_argument("--max-tensors-per-pass", type=int, metavar="N",
                       help="observe at most N tensors per pass over the data (bounds memory on big models)")


class PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped and overlong names shortened (names come from user files)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(*, quiet: bool, debug: bool) -> logging.Handler:
    """Log qdq's progress and warnings to stderr, one ``qdq: ...`` line each, for this command only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("qdq: %(levelname)s: %(message)s" if debug else "qdq: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    return handler


if __name__ == "__main__":
    sys.exit(main())
