"""uneven-depthwise: a depthwise Conv whose input channels have very uneven ranges is left float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import parse

import qdq
from qdq.cli import main
from qdq.config import QuantizeConfig
from qdq.optimize.depthwise import RULE, balance

# x ─ Mul(per-channel gain) ─ Conv(depthwise, group 16) ─ Relu ─ Conv(1x1) ─ y
# The gain sets how uneven the depthwise Conv's input channels are.
DEPTHWISE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y)
  <float[1, 16, 1, 1] gain = {0.0}, float[16, 1, 3, 3] wd = {0.0}, float[16, 16, 1, 1] wp = {0.0}> {
    h = Mul(x, gain)
    d = Conv<group = 16, pads = [1, 1, 1, 1]>(h, wd)
    r = Relu(d)
    y = Conv(r, wp)
}
"""


UNEVEN = [30.0] * 2 + [0.05] * 14  # median channel 1/600 of the largest
EVEN = list(np.linspace(0.8, 1.2, 16))


def model_with_gain(gain: list[float], rng: np.random.Generator) -> onnx.ModelProto:
    """The depthwise Conv undoes the gain (as its BN-folded weights do in real models): its output is even."""
    model = parse(DEPTHWISE, rng)
    inits = {i.name: i for i in model.graph.initializer}
    g = np.array(gain, np.float32)
    inits["gain"].CopyFrom(onnx.numpy_helper.from_array(g.reshape(1, 16, 1, 1), "gain"))
    wd = onnx.numpy_helper.to_array(inits["wd"]) / g.reshape(16, 1, 1, 1)
    inits["wd"].CopyFrom(onnx.numpy_helper.from_array(wd.astype(np.float32), "wd"))
    return model


@pytest.fixture
def data(rng):
    return {"x": rng.normal(0, 1, (64, 16, 8, 8)).astype(np.float32)}


def test_balance_is_median_channel_max_over_the_largest():
    assert balance(np.array([1.0, 2.0, 3.0, 10.0])) == pytest.approx(0.25, abs=1e-12)
    assert balance(np.zeros(4)) == 1.0  # an all-zero input is not uneven


def test_uneven_input_leaves_the_depthwise_conv_float_and_gains_accuracy(rng, data):
    model = model_with_gain(UNEVEN, rng)
    evaluation = {"x": np.random.default_rng(7).normal(0, 1, (32, 16, 8, 8)).astype(np.float32)}
    kept = qdq.quantize(model, data, evaluation_data=evaluation)
    plain = qdq.quantize(model, data, evaluation_data=evaluation,
                         config=QuantizeConfig(techniques=("bias-correction",)))
    floated = {d.node: d for d in kept.plan.decisions if d.rule == RULE}
    assert len(floated) == 1 and not next(iter(floated.values())).quantized
    assert "0.002 of the largest" in next(iter(floated.values())).reason
    assert any(note.startswith("uneven-depthwise: 1 of 1") for note in kept.report.notes)
    assert all(d.rule != RULE for d in plain.plan.decisions)
    # The small channels survive only when the Conv is float (measured: +36 dB on held-out data).
    assert kept.report.comparison.outputs[0].sqnr_db > plain.report.comparison.outputs[0].sqnr_db + 10


def test_even_input_keeps_the_depthwise_conv_int8(rng, data):
    result = qdq.quantize(model_with_gain(EVEN, rng), data)
    assert all(d.rule != RULE for d in result.plan.decisions)
    assert len(result.plan.quantized_nodes()) == 2


def test_level_0_and_an_explicit_list_without_it_leave_placement_alone(rng, data):
    model = model_with_gain(UNEVEN, rng)
    for config in (QuantizeConfig(optimize=0), QuantizeConfig(techniques=())):
        assert len(qdq.quantize(model, data, config=config).plan.quantized_nodes()) == 2


def test_explain_says_which_depthwise_convs_are_checked(rng, capsys, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model_with_gain(UNEVEN, rng), str(path))
    assert main(["explain", str(path)]) == 0
    assert "uneven-depthwise: 1 depthwise Convs" in capsys.readouterr().out


def test_fewer_than_32_samples_are_not_enough_to_judge(rng):
    few = {"x": rng.normal(0, 1, (16, 16, 8, 8)).astype(np.float32)}
    result = qdq.quantize(model_with_gain(UNEVEN, rng), few)
    assert all(d.rule != RULE for d in result.plan.decisions)
    assert any("uneven-depthwise skipped: 16 calibration samples" in note for note in result.report.notes)


def test_a_one_shot_iterator_is_left_whole_to_calibration(rng, data):
    batches = ({"x": data["x"][i:i + 8]} for i in range(0, 64, 8))  # read once
    result = qdq.quantize(model_with_gain(UNEVEN, rng), batches)
    assert result.ranges.samples == 64, "no technique took samples from calibration"
    notes = " | ".join(result.report.notes)
    assert "uneven-depthwise skipped: it reads the calibration data besides calibration" in notes, notes
    assert "adaround and bias-correction skipped" in notes and "one-shot iterator" in notes, notes


def test_sensitivity_ranks_the_layers_quantize_quantizes(rng, data):
    """The depthwise Conv quantize leaves float is not ranked, and "every layer quantized" is quantize's model
    without its weight techniques (qdq sensitivity once started from the plain plan: 2.4 dB where quantize read 4.1
    on a PaddleOCR seal detector)."""
    model = model_with_gain(UNEVEN, rng)
    evaluation = {"x": np.random.default_rng(7).normal(0, 1, (32, 16, 8, 8)).astype(np.float32)}
    report = qdq.sensitivity(model, data, evaluation)
    ranked = [layer.node for layer in report.layers]
    assert ranked == ["Conv_y"], ranked
    same = qdq.quantize(model, data, evaluation_data=evaluation,
                        config=QuantizeConfig(techniques=("uneven-depthwise",)))
    assert report.all_db == pytest.approx(same.report.comparison.outputs[0].sqnr_db, abs=1e-6)
