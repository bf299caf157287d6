"""The TensorRT rules check: clean on qdq's outputs, one finding per deliberate break, useful on other tools'."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import DIGITS, parse, quantize_with_onnxruntime
from onnx import helper, numpy_helper

import qdq
from qdq.check import check_model
from qdq.cli import main

CONV = """<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) <float[16, 16, 3, 3] w = {0.0}, float[16] b = {0.0}> {
  y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
}"""


@pytest.fixture
def quantized(rng) -> onnx.ModelProto:
    """A Conv quantized by qdq with float weights behind a Q/DQ pair (so both pairs can be broken)."""
    model = parse(CONV, rng)
    data = {"x": rng.normal(size=(4, 16, 8, 8)).astype(np.float32)}
    return qdq.quantize(model, data, config=qdq.QuantizeConfig(weights="float")).model


def rules(model: onnx.ModelProto, severity: str = "error") -> set[str]:
    return {f.rule for f in check_model(model) if f.severity == severity}


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(value, name))


def test_qdq_outputs_are_clean(quantized):
    assert check_model(quantized) == []
    digits = qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz").model
    assert [f for f in check_model(digits) if f.severity == "error"] == []


@pytest.mark.parametrize("value", [0.0, -0.1, np.nan, np.inf, 1e-45],
                         ids=["zero", "negative", "nan", "inf", "subnormal"])
def test_bad_scale_values(quantized, value):
    set_initializer(quantized, "x_scale", np.array(value, np.float32))
    assert "scale-value" in rules(quantized)


def test_non_constant_scale(quantized):
    quantized.graph.input.append(helper.make_tensor_value_info("runtime_scale", onnx.TensorProto.FLOAT, []))
    node(quantized, "x_QuantizeLinear").input[1] = "runtime_scale"
    assert "scale-constant" in rules(quantized)


def test_zero_points(quantized):
    set_initializer(quantized, "x_zero_point", np.array(3, np.int8))
    assert "zero-point" in rules(quantized)
    set_initializer(quantized, "x_zero_point", np.array(128, np.uint8))
    assert "zero-point" in rules(quantized, "warning")
    del node(quantized, "x_QuantizeLinear").input[2]
    assert any("uint8" in f.message for f in check_model(quantized) if f.rule == "zero-point")


def test_per_channel_on_an_activation(quantized):
    set_initializer(quantized, "x_scale", np.full(16, 0.01, np.float32))
    set_initializer(quantized, "x_zero_point", np.zeros(16, np.int8))
    for name in ("x_QuantizeLinear", "x_DequantizeLinear"):
        node(quantized, name).attribute.append(helper.make_attribute("axis", 1))
    assert "per-channel" in rules(quantized)


def test_per_channel_on_the_wrong_weight_axis(quantized):
    for name in ("w_QuantizeLinear", "w_DequantizeLinear"):
        n = node(quantized, name)
        del n.attribute[:]
        n.attribute.append(helper.make_attribute("axis", 1))  # Conv weights: output channels are axis 0
    findings = [f for f in check_model(quantized) if f.rule == "per-channel"]
    assert findings and "axis 0" in findings[0].message


def test_int32_bias_dequantize_and_unsupported_ops(quantized):
    quantized.graph.initializer.extend([numpy_helper.from_array(np.zeros(16, np.int32), "b_int32"),
                                        numpy_helper.from_array(np.array(0.001, np.float32), "b_scale")])
    dq = helper.make_node("DequantizeLinear", ["b_int32", "b_scale"], ["b_dq"], name="b_DequantizeLinear")
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    conv.input[2] = "b_dq"
    quantized.graph.node.insert(0, dq)
    quantized.graph.node.append(helper.make_node("ConvInteger", ["a", "b"], ["c"], name="legacy"))
    assert {"int32-bias", "qlinear-op"} <= rules(quantized)


def test_unpaired_and_dangling_and_partly_quantized(quantized):
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    conv.input[0] = "x_quantized"  # the Q output straight into the Conv; its DQ now reads nothing useful
    assert {"unpaired", "dangling"} <= rules(quantized)
    conv.input[0] = "x"
    assert "partly-quantized" in rules(quantized, "warning")


def test_low_opset(quantized):
    quantized.opset_import[0].version = 11
    assert "opset" in rules(quantized)


def test_cli_check_exit_codes_and_json(tmp_path, quantized, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(quantized, str(good))
    assert main(["check", str(good)]) == 0
    assert "0 errors, 0 warnings" in capsys.readouterr().out
    set_initializer(quantized, "x_scale", np.array(0.0, np.float32))
    onnx.save(quantized, str(bad))
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "error: [scale-value] x_QuantizeLinear" in out
    assert main(["check", str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[0]["rule"] == "scale-value"


def test_findings_on_a_model_quantized_by_onnx_runtime(tmp_path, rng):
    # ONNX Runtime's defaults: asymmetric uint8 activations and an int32 quantized bias.
    found = rules(quantize_with_onnxruntime(parse(CONV, rng), tmp_path, rng))
    assert "int32-bias" in found and "zero-point" in found


def test_a_broken_pair_inside_an_if_branch_is_found_and_named_by_its_path(quantized):
    """The quantized Conv moved into the then branch of an If (its scales read from outside, as qdq writes them
    into branches too): clean; then a zero scale is found, named through the If."""
    inner = onnx.GraphProto()
    inner.CopyFrom(quantized.graph)
    inner.name = "then"
    del inner.input[:]
    del inner.initializer[:]
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="copy")], "else", [],
                              [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["N", 16, 8, 8])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y_out"], name="branch", then_branch=inner,
                                                else_branch=other)], "g",
                              [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []), *quantized.graph.input],
                              [helper.make_tensor_value_info("y_out", onnx.TensorProto.FLOAT, ["N", 16, 8, 8])],
                              list(quantized.graph.initializer))
    model = helper.make_model(graph, opset_imports=quantized.opset_import)
    assert check_model(model) == []
    scale = next(n for n in inner.node if n.op_type == "QuantizeLinear").input[1]
    set_initializer(model, scale, np.array(0.0, np.float32))
    findings = [f for f in check_model(model) if f.rule == "scale-value"]
    assert findings and all(f.node.startswith("branch/then_branch/") for f in findings), findings
