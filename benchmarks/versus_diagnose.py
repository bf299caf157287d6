"""Where a model loses accuracy under qdq and under Model Optimizer: weights or activations, placement or ranges.

Run by hand after ``benchmarks/real_models.py`` (same venv as ``benchmarks/versus.py``):

    python benchmarks/versus_diagnose.py ppocr_det --eval-n 16
    python benchmarks/versus_diagnose.py ppocr_det --exclude-types Add GlobalAveragePool --configs ...

What it measures (SQNR of the main output against the float model, ``qdq.runtime.quantized_session``, on the first
``--eval-n`` evaluation samples; the model's full calibration set):

- ``qdq`` at ``--optimize 0`` (mse ranges, nearest rounding), split into weights only (activation Q/DQ pairs
  removed) and activations only (weight Q/DQ removed, float weights back);
- Model Optimizer's ``max`` (or ``--mo-method``) split the same way;
- placement: how many activation tensors each quantizes, by the op types that consume them, and the tensors only
  one of them quantizes;
- ranges: qdq's placement with Model Optimizer's amax (``ranges=`` for the tensors both quantize) and the
  per-tensor amax ratio where they differ most;
- optional qdq variants (``--variants``): ``QuantizeConfig`` fields as JSON, e.g. ``'{"method": "max"}'``;
- ``--attribute``: per quantized activation, in graph order, its own Q/DQ error (local), the error accumulated up
  to it, and its worst channel (``qdq.compare.attribute_error``, default configuration);
- ``--imbalance THR``: depthwise Convs whose input's channel ranges are imbalanced (median over channels of the
  per-channel max |x|, over the tensor's max |x|, below THR, on 8 calibration samples), and the default
  configuration with those Convs left float (``exclude_nodes``).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from versus import MODELS, batch_of, batches, load, metrics, quantize_modelopt, run, task_text  # noqa: E402

from qdq import QuantizeConfig, TensorRanges, prepare, quantize  # noqa: E402
from qdq.calibrate.data import input_specs, open_data  # noqa: E402
from qdq.compare import attribute_error  # noqa: E402
from qdq.runtime import quantized_session  # noqa: E402


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def constant_outputs(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def rewire(model: onnx.ModelProto, mapping: dict[str, str]) -> onnx.ModelProto:
    """Every consumer of a key reads its value instead; graph outputs keep their names (an Identity)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph_outputs = {o.name for o in out.graph.output}
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            while name in mapping:
                name = mapping[name]
            node.input[i] = name
    for name in graph_outputs & set(mapping):
        source = name
        while source in mapping:
            source = mapping[source]
        out.graph.node.append(onnx.helper.make_node("Identity", [source], [name]))
    return out


def qdq_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(QuantizeLinear, DequantizeLinear) pairs: a DQ fed by a Q."""
    by_output = {o: n for n in model.graph.node for o in n.output}
    return [(by_output[n.input[0]], n) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and by_output.get(n.input[0]) is not None
            and by_output[n.input[0]].op_type == "QuantizeLinear"]


def is_weight(model: onnx.ModelProto, name: str) -> bool:
    return name in initializers(model) or name in constant_outputs(model)


def weights_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove every activation Q/DQ pair (a Q whose input is computed, not a constant)."""
    return rewire(model, {dq.output[0]: q.input[0] for q, dq in qdq_pairs(model) if not is_weight(model, q.input[0])})


def activations_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove every weight Q/DQ pair (a float constant behind Q/DQ): the float weight goes back."""
    return rewire(model, {dq.output[0]: q.input[0] for q, dq in qdq_pairs(model) if is_weight(model, q.input[0])})


def activation_amax(model: onnx.ModelProto) -> dict[str, float]:
    """Per quantized activation tensor (the Q's input), amax = scale * 127."""
    inits = initializers(model)
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    out = {}
    for q, _ in qdq_pairs(model):
        if is_weight(model, q.input[0]):
            continue
        scale = inits.get(q.input[1]) or consts.get(q.input[1])
        out[q.input[0]] = float(numpy_helper.to_array(scale).max()) * 127
    return out


def consumers_by_op(model: onnx.ModelProto, names: set[str]) -> collections.Counter:
    """Op types of the nodes that read the DQ of each quantized activation."""
    pairs = {q.input[0]: dq.output[0] for q, dq in qdq_pairs(model)}
    count: collections.Counter = collections.Counter()
    for node in model.graph.node:
        for name in names:
            if pairs.get(name) in node.input:
                count[node.op_type] += 1
    return count


def attribution(model, eval_n: int) -> None:
    """Per quantized activation in graph order: local and accumulated SQNR, worst channel, amax and its source."""
    prepared, _ = prepare(onnx.load(str(model.path)))
    result = quantize(model.path, model.calib)
    data = open_data({k: v[:eval_n] for k, v in load(model.eval).items()}, input_specs(prepared))
    order = [i.name for i in prepared.graph.input] + [o for n in prepared.graph.node for o in n.output]
    position = {t: i for i, t in enumerate(order)}
    print("\n| tensor | local dB | accumulated dB | worst channel dB | amax |\n|---|---:|---:|---:|---:|")
    for e in sorted(attribute_error(prepared, result.model, data), key=lambda e: position.get(e.tensor, 0)):
        print(f"| {e.tensor} | {e.local.sqnr_db:.2f} | {e.total.sqnr_db:.2f} | {e.worst_channel_db:.2f} | "
              f"{result.ranges.amax.get(e.tensor, float('nan')):.4g} ({result.ranges.source(e.tensor)}) |")


def imbalanced_depthwise(model, threshold: float) -> list[str]:
    """Depthwise Convs whose input has median(channel max |x|) / max |x| below ``threshold`` (8 calib samples)."""
    prepared, _ = prepare(onnx.load(str(model.path)))
    depthwise = [n for n in prepared.graph.node if n.op_type == "Conv"
                 and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
    names = sorted({n.input[0] for n in depthwise})
    session = quantized_session(prepared, exposing=names)
    channel_max = dict.fromkeys(names, 0.0)
    for feed in batches({k: v[:8] for k, v in load(model.calib).items()}, batch_of(prepared)):
        for name, value in zip(names, session.run(names, feed), strict=True):
            channel_max[name] = np.maximum(channel_max[name], np.abs(value).max(axis=(0, 2, 3)))
    ratio = {t: float(np.median(c) / c.max()) for t, c in channel_max.items()}
    print(f"\ndepthwise Convs: {len(depthwise)}; input ratios, lowest:",
          sorted((round(r, 3), t) for t, r in ratio.items())[:8])
    return [n.name for n in depthwise if ratio[n.input[0]] < threshold]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("--eval-n", type=int, default=16)
    parser.add_argument("--mo-method", default="max")
    parser.add_argument("--variants", nargs="*", default=[], help="QuantizeConfig fields as JSON, one per variant")
    parser.add_argument("--skip-mo", action="store_true")
    parser.add_argument("--attribute", action="store_true")
    parser.add_argument("--imbalance", type=float, help="e.g. 0.15")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    model = MODELS[args.model]
    proto = onnx.load(str(model.path))
    data = load(model.eval)
    data = {k: v[:args.eval_n] for k, v in data.items()}
    feeds = batches(data, batch_of(proto))
    reference = run(proto, feeds, model)

    def score(label: str, quantized: onnx.ModelProto) -> None:
        m = metrics(model, reference, run(quantized, feeds, model))
        print(f"| {args.model} | {label} | {m['sqnr']:.2f} | {task_text(m, 4)} |", flush=True)

    print("| model | variant | SQNR dB | task metric |\n|---|---|---:|---:|")
    ours = quantize(model.path, model.calib, config=QuantizeConfig(optimize=0))
    score("qdq --optimize 0", ours.model)
    float_weights = quantize(model.path, model.calib, config=QuantizeConfig(optimize=0, weights="float")).model
    score("qdq --optimize 0, weights only", weights_only(float_weights))
    score("qdq --optimize 0, activations only", activations_only(float_weights))
    for variant in args.variants:
        score(f"qdq {variant}", quantize(model.path, model.calib, config=QuantizeConfig(**json.loads(variant))).model)
    if args.attribute:
        attribution(model, args.eval_n)
    if args.imbalance is not None:
        chosen = imbalanced_depthwise(model, args.imbalance)
        pattern = "^(" + "|".join(re.escape(n) for n in chosen) + ")$"
        print(f"left float ({len(chosen)}): {chosen}")
        config = QuantizeConfig(exclude_nodes=(pattern,) if chosen else ())
        score(f"qdq default, {len(chosen)} imbalanced depthwise Convs float",
              quantize(model.path, model.calib, config=config).model)
    if args.skip_mo:
        return
    with tempfile.TemporaryDirectory() as tmp:
        theirs = quantize_modelopt(model, args.mo_method, Path(tmp) / "mo.onnx")
    score(f"Model Optimizer {args.mo_method}", theirs)
    score(f"Model Optimizer {args.mo_method}, weights only", weights_only(theirs))
    score(f"Model Optimizer {args.mo_method}, activations only", activations_only(theirs))

    mine, other = activation_amax(ours.model), activation_amax(theirs)
    common = set(mine) & set(other)
    print(f"\nactivation tensors quantized: qdq {len(mine)}, Model Optimizer {len(other)}, both {len(common)}")
    print(f"consumers, qdq only: {dict(consumers_by_op(ours.model, set(mine) - common))}")
    print(f"consumers, Model Optimizer only: {dict(consumers_by_op(theirs, set(other) - common))}")
    ratios = sorted(((other[n] / mine[n], n) for n in common if mine[n] > 0), reverse=True)
    print("amax Model Optimizer / qdq, largest:", [(n, round(r, 2)) for r, n in ratios[:8]])
    print("amax Model Optimizer / qdq, smallest:", [(n, round(r, 2)) for r, n in ratios[-8:]])
    print("median ratio:", round(float(np.median([r for r, _ in ratios])), 3) if ratios else "-")
    borrowed = TensorRanges({n: other[n] for n in common}, method="modelopt")
    with_theirs = quantize(model.path, model.calib, config=QuantizeConfig(optimize=0), ranges=borrowed)
    score(f"qdq placement, Model Optimizer {args.mo_method} amax where both quantize, --optimize 0", with_theirs.model)


if __name__ == "__main__":
    main()
