"""Shapes of real exports, built small: a Conv+LSTM audio model, a Paddle-style opset-11 detector neck, and a
tf2onnx NHWC network with Transposes around the convolutions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import parse
from onnx import helper, numpy_helper

import qdq
from qdq.errors import ModelError
from qdq.runtime import runs_qdq_at


def weight(rng, name: str, shape: tuple[int, ...], std: float = 0.1) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name)


def model_of(nodes, inputs, outputs, inits, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "export", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset >= 13 else 6
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_lstm(rng):
    """Spectrogram -> Conv -> mean over frequency -> [time, batch, channels] -> LSTM -> MatMul head."""
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[2], keepdims=0, name="mean"),
             helper.make_node("Transpose", ["m"], ["t"], perm=[2, 0, 1], name="to_time_major"),
             helper.make_node("LSTM", ["t", "lw", "lr", "lb"], ["y", "yh"], hidden_size=32, name="lstm"),
             helper.make_node("Squeeze", ["yh", "axis0"], ["h"], name="last_state"),
             helper.make_node("MatMul", ["h", "hw"], ["o"], name="head")]
    inits = [weight(rng, "cw", (16, 1, 3, 3), 0.3), weight(rng, "lw", (1, 128, 16)), weight(rng, "lr", (1, 128, 32)),
             weight(rng, "lb", (1, 256)), numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             weight(rng, "hw", (32, 24))]
    model = model_of(nodes, [helper.make_tensor_value_info("x", 1, ["N", 1, 64, 20])],
                     [helper.make_tensor_value_info("o", 1, ["N", 24])], inits, 13)
    return model, {"x": rng.standard_normal((8, 1, 64, 20)).astype(np.float32)}


def paddle_neck(rng):
    """Opset 11 (as paddle2onnx writes): stride-2 Conv, nearest Resize back up, Concat with a skip, Conv, Sigmoid."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="down"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Resize", ["r1", "roi", "scales"], ["u"], mode="nearest", name="up"),
             helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="skip"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Concat", ["u", "r2"], ["cat"], axis=1, name="merge"),
             helper.make_node("Conv", ["cat", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="fuse"),
             helper.make_node("Sigmoid", ["c3"], ["y"], name="score")]
    inits = [weight(rng, "w1", (16, 3, 3, 3), 0.3), weight(rng, "b1", (16,)), weight(rng, "w2", (16, 3, 3, 3), 0.3),
             weight(rng, "b2", (16,)), weight(rng, "w3", (16, 32, 3, 3)), weight(rng, "b3", (16,)),
             numpy_helper.from_array(np.array([], np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    model = model_of(nodes, [helper.make_tensor_value_info("x", 1, [1, 3, 32, 32])],
                     [helper.make_tensor_value_info("y", 1, [1, 16, 32, 32])], inits, 11)
    return model, {"x": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}


def tf_nhwc(rng):
    """tf2onnx: NHWC input, a Transpose to NCHW before the first Conv, a residual block, a Transpose back."""
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["xt", "w1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="block"),
             helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("Transpose", ["r2"], ["y"], perm=[0, 2, 3, 1], name="to_nhwc")]
    inits = [weight(rng, "w1", (32, 3, 3, 3), 0.3), weight(rng, "w2", (32, 32, 3, 3), 0.05)]
    model = model_of(nodes, [helper.make_tensor_value_info("x", 1, ["N", 16, 16, 3])],
                     [helper.make_tensor_value_info("y", 1, ["N", 16, 16, 32])], inits, 13)
    return model, {"x": rng.standard_normal((8, 16, 16, 3)).astype(np.float32)}


CASES = {
    "conv_lstm": (conv_lstm, {"conv", "head"}),
    "paddle_neck": (paddle_neck, {"down", "skip", "fuse"}),
    "tf_nhwc": (tf_nhwc, {"stem", "block", "residual"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_patterns_quantize_where_expected_and_stay_close(case, rng):
    build, expected = CASES[case]
    model, data = build(rng)
    result = qdq.quantize(model, data, evaluation_data=data)
    assert {d.node for d in result.plan.decisions if d.quantized} == expected
    # Measured 38-44 dB on these; 30 dB catches a misplaced pair or a broken scale.
    assert result.report.comparison.outputs[0].sqnr_db > 30
    onnx.checker.check_model(result.model, full_check=True)


def test_paddle_opset_11_is_raised_and_said(rng):
    model, data = paddle_neck(rng)
    result = qdq.quantize(model, data)
    assert result.model.opset_import[0].version == 13
    assert "opset raised from 11 to 13" in result.report.notes


def test_an_opset_onnx_runtime_cannot_run_qdq_at_is_refused_before_calibration(rng):
    """ONNX Runtime 1.32 loads opset-28 models but has no QuantizeLinear-28 kernel: found on a corpus export raised
    to the newest opset. qdq says so up front (no calibration is run only to fail the final check)."""
    newest = onnx.defs.onnx_opset_version()
    if runs_qdq_at(newest):
        pytest.skip(f"this ONNX Runtime runs QuantizeLinear at opset {newest}")
    model = parse(f"""
        <ir_version: {onnx.IR_VERSION}, opset_import: ["" : {newest}]>
        g (float[N, 16, 4, 4] x) => (float[N, 16, 4, 4] y) <float[16, 16, 1, 1] w = {{0.0}}> {{
            y = Conv (x, w)
        }}""", rng)
    with pytest.raises(ModelError, match=f"opset {newest}, at which ONNX Runtime .* cannot run QuantizeLinear"):
        qdq.quantize(model)  # no data given: the refusal comes before calibration would ask for any
