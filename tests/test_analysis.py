"""compare, per-tensor attribution, sensitivity, --target-sqnr, inspect: metrics and rankings that could fail."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import DIGITS, parse, quantize_with_onnxruntime, run_ort, sqnr_db
from onnx import numpy_helper

import qdq
from qdq.calibrate.data import input_specs, open_data
from qdq.cli import main
from qdq.compare import OutputAccumulator, OutputMetrics, attribute_error
from qdq.inspect import inspect_model
from qdq.sensitivity import Goal, dominant_layer, fall_back, layer_sensitivity

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'

# Three Convs; the first gives channel 0 values 1000x the others, so the per-tensor Q/DQ on the second Conv's
# input has no resolution left for channels 1-15. The second Conv reads channel 0 through tiny weights, so the
# float output does not depend on it: only quantization makes that layer matter.
FRAGILE = HEADER + """
g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y)
<float[16, 16, 3, 3] w1 = {0.0}, float[16, 16, 3, 3] w2 = {0.0}, float[16, 16, 3, 3] w3 = {0.0}> {
  a = Conv <pads = [1, 1, 1, 1]> (x, w1)
  ra = Relu (a)
  b = Conv <pads = [1, 1, 1, 1]> (ra, w2)
  rb = Relu (b)
  y = Conv <pads = [1, 1, 1, 1]> (rb, w3)
}"""


CHAIN4 = HEADER + """
g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y)
<float[16, 16, 1, 1] w1 = {0.0}, float[16, 16, 1, 1] w2 = {0.0}, float[16, 16, 1, 1] w3 = {0.0},
 float[16, 16, 1, 1] w4 = {0.0}> {
  a = Conv (x, w1)
  b = Conv (a, w2)
  c = Conv (b, w3)
  y = Conv (c, w4)
}"""

def fragile_model(rng) -> onnx.ModelProto:
    model = parse(FRAGILE, rng, weight_scale=0.1)
    weights = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    weights["w1"][0] *= 1000.0
    weights["w2"][:, 0] *= 1e-6
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    return model


def test_metrics_match_numpy_formulas(rng):
    ref, test = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    acc = OutputAccumulator()
    acc.update(ref[:4], test[:4])
    acc.update(ref[4:], test[4:])
    m = acc.metrics("y")
    assert m.sqnr_db == pytest.approx(10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2)), rel=1e-12)
    assert m.cosine == pytest.approx(np.dot(ref.ravel(), test.ravel()) / np.linalg.norm(ref) / np.linalg.norm(test),
                                     rel=1e-12)
    assert m.max_abs_error == pytest.approx(np.abs(ref - test).max(), rel=1e-12)
    assert m.mean_abs_error == pytest.approx(np.abs(ref - test).mean(), rel=1e-12)
    assert m.top1_agreement == pytest.approx(np.mean(ref.argmax(1) == test.argmax(1)), rel=1e-12)


def test_sensitivity_ranks_the_fragile_layer_first_and_the_target_leaves_it_float(rng):
    model = fragile_model(rng)
    calib = {"x": rng.normal(size=(16, 16, 8, 8)).astype(np.float32)}
    evaluation = {"x": rng.normal(size=(16, 16, 8, 8)).astype(np.float32)}
    config = qdq.QuantizeConfig(method="max")
    report = qdq.sensitivity(model, calib, evaluation, config=config)
    assert report.layers[0].node == "Conv_b", report.describe()
    gain = report.layers[0].without_db - report.all_db
    assert gain > 10, report.describe()

    target = report.all_db + gain / 2
    # optimize=0: dominant-layer would leave Conv_b float before the target is looked at (the next test)
    result = qdq.quantize(model, calib, evaluation_data=evaluation,
                          config=qdq.QuantizeConfig(method="max", target_sqnr=target, optimize=0))
    assert result.report.comparison.outputs[0].sqnr_db >= target
    assert not next(d for d in result.plan.decisions if d.node == "Conv_b").quantized
    assert next(d for d in result.plan.decisions if d.node == "Conv_y").quantized, "only what the target needs"
    assert any("stay float (Conv_b)" in note for note in result.report.notes)


class VectorErrors:
    """An evaluator for ``fall_back`` whose output error is the sum of fixed error vectors, one per quantized
    layer, on an output of unit power: errors of layers can cancel, as they do in real models."""

    float_session = SimpleNamespace(get_outputs=lambda: [SimpleNamespace(name="y")])

    def __init__(self, errors: dict[str, list[float]]) -> None:
        self.errors = {node: np.array(e) for node, e in errors.items()}

    def metrics(self, plan) -> OutputMetrics:
        error = sum((self.errors[d.node] for d in plan.quantized_nodes()), np.zeros(3))
        return OutputMetrics("y", -10 * np.log10(max(float(error @ error), 1e-30)), float(np.abs(error).max()))

    def __call__(self, plan) -> float:
        return self.metrics(plan).sqnr_db


def test_fallback_ranks_by_added_noise_and_reaches_the_target_through_cancelling_layers():
    plan = qdq.explain(parse(CHAIN4, np.random.default_rng(0)))
    a, b, c, d = (x.node for x in plan.quantized_nodes())
    # a and b cancel to 0.1 in x; leaving either float alone lowers the SQNR (19.0 dB with all four quantized).
    evaluate = VectorErrors({a: [1.0, 0, 0], b: [-0.9, 0, 0], c: [0, 0.05, 0], d: [0, 0, 0.01]})
    report = layer_sensitivity(plan, evaluate)
    assert [x.node for x in report.layers] == [a, b, c, d], report.describe()
    assert report.layers[0].without_db < report.all_db, "a's error partly cancels b's"

    result = fall_back(plan, evaluate, Goal(min_sqnr_db=30.0))
    # Ranked by what leaving each float gains alone (c, d, then a and b, which lose), every layer went float.
    assert result.met and result.left_float == (a, b, c), result
    assert result.after == "40.00 dB"


@pytest.mark.parametrize("errors, expected", [
    pytest.param({"a": [0, .2, 0], "b": [0, 0, .2], "c": [.9, 0, 0], "d": [0, .1, .1]}, ("c", 0.82), id="one-loud"),
    pytest.param({"a": [.3, 0, 0], "b": [0, .3, 0], "c": [0, 0, .3], "d": [.2, .2, 0]}, None, id="even"),
])
def test_dominant_layer_is_found_by_halving(errors, expected):
    plan = qdq.explain(parse(CHAIN4, np.random.default_rng(0)))
    nodes = {letter: d.node for letter, d in zip("abcd", plan.quantized_nodes(), strict=True)}
    evaluate = VectorErrors({nodes[k]: e for k, e in errors.items()})
    found = dominant_layer(plan, evaluate, evaluate(plan), 0.5)
    if expected is None:
        assert found is None, found
    else:
        assert found.node == nodes[expected[0]] and found.share == pytest.approx(expected[1], abs=0.005), found


def test_a_dominant_layer_is_left_float_by_default_and_said(rng):
    """The fragile model's second Conv reads a channel 1000x the others: it makes nearly all the noise (one more
    Conv after it: with fewer than four layers, one of them often holds half the noise)."""
    model = fragile_model(rng)
    tail = parse(FRAGILE.replace("y = Conv <pads = [1, 1, 1, 1]> (rb, w3)",
                                 "c = Conv <pads = [1, 1, 1, 1]> (rb, w3)\n  rc = Relu (c)\n"
                                 "  y = Conv <pads = [1, 1, 1, 1]> (rc, w4)").replace(
        "float[16, 16, 3, 3] w3 = {0.0}>", "float[16, 16, 3, 3] w3 = {0.0}, float[16, 16, 3, 3] w4 = {0.0}>"),
        rng, weight_scale=0.1)
    for init in model.graph.initializer:  # the fragile weights, and a plain fourth Conv
        next(i for i in tail.graph.initializer if i.name == init.name).CopyFrom(init)
    model = tail
    calib = {"x": rng.normal(size=(16, 16, 8, 8)).astype(np.float32)}
    result = qdq.quantize(model, calib)
    decision = next(d for d in result.plan.decisions if d.node == "Conv_b")
    assert not decision.quantized and decision.rule == "dominant-layer", decision
    assert any(n.startswith("dominant-layer: Conv_b left float") for n in result.report.notes), result.report.notes
    off = qdq.quantize(model, calib, config=qdq.QuantizeConfig(
        techniques=("equalize", "smoothquant", "bias-correction", "uneven-depthwise")))
    assert next(d for d in off.plan.decisions if d.node == "Conv_b").quantized
    reference = run_ort(model, calib)[0]
    assert sqnr_db(reference, run_ort(result.model, calib)[0]) > sqnr_db(reference, run_ort(off.model, calib)[0]) + 10


def test_target_sqnr_needs_evaluation_data(rng):
    with pytest.raises(qdq.QdqError, match="needs evaluation data"):
        qdq.quantize(fragile_model(rng), {"x": np.ones((2, 16, 8, 8), np.float32)},
                     config=qdq.QuantizeConfig(target_sqnr=40))


def test_per_tensor_attribution_finds_the_fragile_tensor(rng):
    model = fragile_model(rng)
    data = {"x": rng.normal(size=(16, 16, 8, 8)).astype(np.float32)}
    # optimize=0: bias correction and learned rounding would spread the fragile channel's error to its neighbours
    result = qdq.quantize(model, data, config=qdq.QuantizeConfig(method="max", optimize=0))
    prepared, _ = qdq.prepare(model)
    errors = attribute_error(prepared, result.model, open_data(data, input_specs(prepared)))
    assert errors[0].tensor == "ra" and errors[0].worst_channel != 0, "a small channel next to the huge one"
    assert errors[0].worst_channel_db < errors[-1].worst_channel_db - 20


def test_compare_cli_with_labels_per_tensor_and_json(tmp_path, capsys):
    quantized = tmp_path / "q.onnx"
    assert main(["quantize", str(DIGITS / "digits.onnx"), "--calib", str(DIGITS / "calib.npz"), "-o", str(quantized),
                 "-q"]) == 0
    capsys.readouterr()
    args = ["compare", str(DIGITS / "digits.onnx"), str(quantized), "--data", str(DIGITS / "eval.npz"),
            "--labels", str(DIGITS / "labels.npy"), "--per-tensor", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cosine" in out and "accuracy: float 98.89%" in out and out.count(" added ") == 3
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["samples"] == 450 and len(doc["tensors"]) == 3 and doc["outputs"][0]["cosine"] > 0.999


def test_inspect_a_qdq_model_with_reasons(tmp_path, capsys):
    result = qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz")
    found = inspect_model(result.model)
    assert sum(p.kind == "activation" for p in found.pairs) == 6
    assert all(p.granularity.startswith("per channel (axis 0") for p in found.pairs if p.kind == "weight")
    assert found.float_layers == (("node_linear", "Gemm",
                                   "[tiny-gemm] N=10 below 16 (K=64, N=10): INT8 gains nothing"),)
    onnx.save(result.model, str(tmp_path / "q.onnx"))
    assert main(["inspect", str(tmp_path / "q.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["qdq.version"] == qdq.__version__


def test_inspect_a_model_quantized_by_onnx_runtime(tmp_path, rng):
    model = parse(HEADER + """
    g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) <float[16, 16, 3, 3] w = {0.0}, float[16] b = {0.0}> {
      y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    }""", rng)
    found = inspect_model(quantize_with_onnxruntime(model, tmp_path, rng, per_channel=True))
    assert {p.kind for p in found.pairs} == {"activation", "weight"}
    assert any(p.granularity.startswith("per channel (axis 0, 16") for p in found.pairs if p.kind == "weight")
    assert any(n[1] == "Conv" and n[2] >= 2 for n in found.int8_nodes)


def test_max_top1_drop_leaves_layers_float_until_agreement_is_met():
    # every eval sample must keep its float argmax; entropy-guarded loses one of 450 with every layer int8 (the
    # default, mse, loses none, which would leave nothing to fall back)
    config = qdq.QuantizeConfig(method="entropy-guarded", max_top1_drop=0.0)
    result = qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz", evaluation_data=DIGITS / "eval.npz",
                          config=config)
    assert result.report.comparison.outputs[0].top1_agreement == 1.0
    assert any("a top-1 drop of at most 0%" in note for note in result.report.notes)
    with pytest.raises(ValueError, match="max_top1_drop"):
        qdq.QuantizeConfig(max_top1_drop=120)


def test_reported_sqnr_is_the_graph_arithmetic(rng):
    """The SQNR qdq reports is what the Q/DQ graph computes (ORT, optimisations off), not ORT's int8 kernels.

    With its optimisations on, ORT fuses Q/DQ into int8 CPU kernels chosen by instruction set (u8s8 saturates
    without VNNI), so the figure would depend on the machine; the graph's arithmetic does not.
    """
    calib = DIGITS / "calib.npz"
    result = qdq.quantize(DIGITS / "digits.onnx", calibration_data=calib, evaluation_data=calib)
    reported = result.report.comparison.outputs[0]
    float_model = onnx.load(DIGITS / "digits.onnx")
    data = np.load(calib)
    feeds = {name: data[name] for name in data.files}
    name = reported.name
    ref = run_ort(float_model, feeds, [name])[0]
    test = run_ort(result.model, feeds, [name])[0]
    assert reported.sqnr_db == pytest.approx(sqnr_db(ref, test), abs=0.01)
