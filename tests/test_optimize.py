"""The accuracy techniques (qdq.optimize), each against a plain reference computed with ONNX Runtime or numpy."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
import pytest
from conftest import DIGITS, initializer, nodes_by_op, parse, run_ort

import qdq
from qdq.config import QuantizeConfig
from qdq.optimize.adaround import channel_errors, learned_rounding, nearest
from qdq.optimize.bias_correction import apply_correction, mean_shift
from qdq.optimize.equalize import equalize
from qdq.optimize.layers import find_layers
from qdq.optimize.moments import Moments
from qdq.optimize.smoothquant import smooth, spread
from qdq.placement import plan_quantization
from qdq.quantize import prepare

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'

# Strided, padded, grouped, no bias: the patch geometry and the "a Conv without bias gets one" case at once.
CONV = HEADER + """
conv (float[N, 4, 9, 9] x) => (float[N, 8, 5, 5] y) <float[8, 2, 3, 3] w = {0.0}> {
  y = Conv <pads = [1, 2, 1, 0], strides = [2, 2], group = 2> (x, w)
}"""

MATMUL = HEADER + """
matmul (float[N, 5, 24] x) => (float[N, 5, 16] y) <float[24, 16] w = {0.0}> {
  y = MatMul (x, w)
}"""

GEMM = HEADER + """
gemm (float[N, 24] x) => (float[N, 16] y) <float[16, 24] w = {0.0}, float[16] b = {0.0}> {
  y = Gemm <transB = 1> (x, w, b)
}"""

# conv1 -> Relu -> depthwise -> (identity) -> pointwise, and a ReLU6 pair that must be skipped.
CHAIN = HEADER + """
chain (float[N, 3, 8, 8] x) => (float[N, 16, 8, 8] y) <float[16, 3, 3, 3] w1 = {0.0}, float[16] b1 = {0.0},
    float[16, 1, 3, 3] w2 = {0.0}, float[16] b2 = {0.0}, float[16, 16, 1, 1] w3 = {0.0}, float[16] b3 = {0.0},
    float[16, 16, 1, 1] w4 = {0.0}, float lo = {0.0}, float hi = {6.0}> {
  a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r = Relu (a)
  d = Conv <pads = [1, 1, 1, 1], group = 16> (r, w2, b2)
  p = Conv (d, w3, b3)
  c = Clip (p, lo, hi)
  y = Conv (c, w4)
}"""

# A pre-norm block's LayerNorm feeding two projections, and one whose output is also a residual input.
NORM = HEADER + """
norm (float[N, 6, 16] x) => (float[N, 6, 24] y, float[N, 6, 16] z) <float[16] g = {0.0}, float[16] be = {0.0},
    float[16, 24] wq = {0.0}, float[16, 24] wk = {0.0}, float[16] g2 = {0.0}, float[16] be2 = {0.0},
    float[16, 16] wo = {0.0}> {
  n = LayerNormalization <axis = -1> (x, g, be)
  q = MatMul (n, wq)
  k = MatMul (n, wk)
  y = Add (q, k)
  n2 = LayerNormalization <axis = -1> (x, g2, be2)
  o = MatMul (n2, wo)
  z = Add (o, n2)
}"""


def prepared_plan(model: onnx.ModelProto):
    prepared, _ = prepare(model)
    return prepared, plan_quantization(prepared, QuantizeConfig().placement())


def dequantized_nearest(layer, w: np.ndarray) -> np.ndarray:
    scale = layer.channel_scales(w)
    return layer.unmatrix(scale[..., None] * nearest(layer.matrix(w), scale), w)


def with_weight(model: onnx.ModelProto, name: str, values: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            init.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), name))
    return out


@pytest.mark.parametrize("text, shape", [(CONV, (6, 4, 9, 9)), (MATMUL, (6, 5, 24)), (GEMM, (6, 24))],
                         ids=["conv-strided-grouped", "matmul-3d", "gemm-transB"])
def test_bias_shift_equals_measured_mean_output_error(text, shape, rng):
    """(W_q − W)·E[patch] is the mean over batch and positions of W_q x − W x, measured with ONNX Runtime."""
    model, plan = prepared_plan(parse(text, rng))
    (layer,), _ = find_layers(model, plan)
    w = initializer(model, layer.weight)
    w_q = dequantized_nearest(layer, w)
    x = (rng.normal(size=shape) + 0.7).astype(np.float32)  # a non-zero mean, or the shift would vanish
    measured = (run_ort(with_weight(model, layer.weight, w_q), {"x": x})[0].astype(np.float64)
                - run_ort(model, {"x": x})[0])
    channel_axis = 1 if layer.op == "Conv" else -1
    measured_mean = np.moveaxis(measured, channel_axis, -1).reshape(-1, measured.shape[channel_axis]).mean(0)
    moments = Moments()
    moments.update(layer, x, with_gram=False)
    shift = mean_shift(layer, w, w_q, moments.mean())
    assert np.abs(shift).max() > 1e-4, "the case must have a visible shift"
    np.testing.assert_allclose(shift, measured_mean, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("text", [CONV, MATMUL], ids=["conv-without-bias", "matmul-without-add"])
def test_layer_without_bias_gets_one_and_computes_the_same(text, rng):
    model, plan = prepared_plan(parse(text, rng))
    (layer,), _ = find_layers(model, plan)
    x = rng.normal(size=(2, 4, 9, 9) if layer.op == "Conv" else (2, 5, 24)).astype(np.float32)
    before = run_ort(model, {"x": x})[0]
    shift = rng.normal(size=8 if layer.op == "Conv" else 16)
    apply_correction(model, layer, shift)
    onnx.checker.check_model(model, full_check=True)
    after = run_ort(model, {"x": x})[0]
    expected = before - (shift[:, None, None] if layer.op == "Conv" else shift).astype(np.float32)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)


def test_bias_correction_end_to_end_removes_the_weight_shift(rng):
    """On one Conv: the quantized model's mean output equals the float Conv's on the same quantized input."""
    model = parse(CONV, rng)
    x = (rng.normal(size=(32, 4, 9, 9)) + 0.7).astype(np.float32)
    results = {name: qdq.quantize(model, {"x": x}, config=QuantizeConfig(method="max", techniques=techniques))
               for name, techniques in (("plain", ()), ("corrected", ("bias-correction",)))}
    assert len(results["corrected"].model.graph.node) == len(results["plain"].model.graph.node)
    assert any("bias correction" in n for n in results["corrected"].report.notes)
    scale = results["plain"].ranges.scale("x")
    x_q = (np.clip(np.rint(x / scale), -127, 127) * scale).astype(np.float32)
    reference = run_ort(model, {"x": x_q})[0].mean(axis=(0, 2, 3))
    plain = run_ort(results["plain"].model, {"x": x})[0].mean(axis=(0, 2, 3))
    corrected = run_ort(results["corrected"].model, {"x": x})[0].mean(axis=(0, 2, 3))
    assert np.abs(plain - reference).max() > 1e-3, "nearest rounding must leave a shift to correct"
    np.testing.assert_allclose(corrected, reference, atol=2e-5)


def correlated_layer(rng, k: int = 48, n: int = 16, rows: int = 600):
    x = rng.normal(size=(rows, k)) @ rng.normal(size=(k, k)) * 0.3 + 0.5
    w = rng.normal(size=(1, n, k)) * 0.1
    return x, w, np.abs(w).max(axis=-1) / 127


@pytest.mark.parametrize("iterations", [0, 60], ids=["greedy", "relaxed"])
def test_learned_rounding_stays_within_one_step_and_never_loses(iterations, rng):
    x, w, scale = correlated_layer(rng)
    second = (x.T @ x / len(x))[None]
    q = learned_rounding(w, scale, second, iterations=iterations).q
    near = nearest(w, scale)
    v = w / scale[..., None]
    assert np.all((q == np.floor(v)) | (q == np.floor(v) + 1) | (q == near)), "every weight is floor or ceil"
    assert np.abs(q - near).max() <= 1
    assert np.all(np.abs(q).max(axis=-1) == 127), "each channel keeps its amax, so its scale is unchanged"
    learned, rounded = channel_errors(q, w, scale, second), channel_errors(near, w, scale, second)
    assert np.all(learned <= rounded * (1 + 1e-12))
    assert learned.sum() < 0.8 * rounded.sum(), "correlated inputs leave room to gain"


def test_channel_error_is_the_measured_squared_output_error(rng):
    """The objective learned rounding minimises equals ||W_q x − W x||² measured with ONNX Runtime."""
    model, plan = prepared_plan(parse(CONV, rng))
    (layer,), _ = find_layers(model, plan)
    w = initializer(model, layer.weight)
    w_q = dequantized_nearest(layer, w)
    x = (rng.normal(size=(4, 4, 9, 9)) + 0.3).astype(np.float32)
    measured = ((run_ort(with_weight(model, layer.weight, w_q), {"x": x})[0].astype(np.float64)
                 - run_ort(model, {"x": x})[0]) ** 2).sum()
    moments = Moments()
    moments.update(layer, x, with_gram=True)
    scale = layer.channel_scales(w)
    predicted = channel_errors(nearest(layer.matrix(w), scale), layer.matrix(w), scale, moments.gram).sum()
    np.testing.assert_allclose(predicted, measured, rtol=1e-4)


def test_adaround_end_to_end_keeps_scales_and_moves_weights_one_step_at_most(rng):
    model = parse(MATMUL, rng)
    x = (rng.normal(size=(16, 5, 24)) @ rng.normal(size=(24, 24)) * 0.3).astype(np.float32)
    plain = qdq.quantize(model, {"x": x}, config=QuantizeConfig(method="max", techniques=()))
    learned = qdq.quantize(model, {"x": x}, config=QuantizeConfig(method="max", techniques=("adaround",)))

    def weight_and_scale(m):
        dq = next(n for n in nodes_by_op(m, "DequantizeLinear") if initializer(m, n.input[0]).ndim == 2)
        return initializer(m, dq.input[0]).astype(np.int32), initializer(m, dq.input[1])

    (q0, s0), (q1, s1) = weight_and_scale(plain.model), weight_and_scale(learned.model)
    np.testing.assert_array_equal(s0, s1)
    assert np.abs(q1 - q0).max() == 1 and (q1 != q0).mean() > 0.01, "some weights rounded the other way"
    assert any("learned rounding" in n for n in learned.report.notes)


def test_learned_rounding_that_worsens_the_outputs_is_left_out(rng, monkeypatch):
    """Each layer's rounding is judged by its own output error; the model's outputs decide whether it is kept."""
    import qdq.optimize.weights as weights
    from qdq.optimize.adaround import Rounding

    model = parse(MATMUL, rng)
    x = (rng.normal(size=(64, 5, 24)) @ rng.normal(size=(24, 24)) * 0.3).astype(np.float32)
    config = QuantizeConfig(method="max", techniques=("adaround",))
    plain = qdq.quantize(model, {"x": x}, config=QuantizeConfig(method="max", techniques=()))
    kept = qdq.quantize(model, {"x": x}, config=config)
    note = next(n for n in kept.report.notes if n.startswith("learned rounding"))
    before, after = (float(v) for v in re.search(r"([-\d.]+) -> ([-\d.]+) dB$", note).groups())
    assert after >= before, note

    def away_from_nearest(w, scale, second, **_):  # every weight one step the wrong way: a worse model
        near = nearest(w, scale)
        q = np.clip(near + np.where(w / scale[..., None] >= near, -1, 1), -127, 127)
        return Rounding(q, 1.0, 0.5)

    monkeypatch.setattr(weights, "learned_rounding", away_from_nearest)
    left_out = qdq.quantize(model, {"x": x}, config=config)
    assert any(n.startswith("learned rounding measured and left out") for n in left_out.report.notes)
    for a, b in zip(plain.model.graph.initializer, left_out.model.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), err_msg=a.name)


def test_equalization_leaves_the_float_model_unchanged_and_balances_ranges(rng):
    model = parse(CHAIN, rng)
    for init in model.graph.initializer:  # channels of very different ranges, as BatchNorm folding leaves them
        if init.name in ("w1", "w2"):
            w = onnx.numpy_helper.to_array(init) * np.logspace(-2, 1, 16).reshape(-1, 1, 1, 1)
            init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), init.name))
    prepared, plan = prepared_plan(model)
    equalized, notes = equalize(prepared, plan)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(equalized, {"x": x})[0], run_ort(prepared, {"x": x})[0], rtol=1e-4,
                               atol=1e-5)
    assert "a -> d (Relu)" not in " ".join(notes)
    text = " ".join(notes)
    assert "equalized 2 Conv pairs" in text and "(identity)" in text
    assert "ReLU6" in text and "clips at a fixed bound" in text, notes
    names = {n.name: n for n in equalized.graph.node}
    w2 = initializer(equalized, names[plan.quantized_nodes()[1].node].input[1])
    w3 = initializer(equalized, names[plan.quantized_nodes()[2].node].input[1])
    r2 = np.abs(w2).reshape(16, -1).max(axis=1)
    r3 = np.abs(w3).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r2, r3, rtol=1e-3)
    assert {i.name for i in equalized.graph.initializer} >= {"w1", "w2", "w3"}, "the plan refers to weights by name"


# Two Conv -> Relu -> Conv chains whose first Convs read one bias (tf2onnx merges equal constants: BlazeFace).
SHARED_BIAS = HEADER + """
shared (float[N, 8, 6, 6] x) => (float[N, 16, 6, 6] y, float[N, 16, 6, 6] z) <float[16, 8, 1, 1] wa = {0.0},
    float[16, 8, 1, 1] wb = {0.0}, float[16] b = {0.0}, float[16, 16, 1, 1] wc = {0.0},
    float[16, 16, 1, 1] wd = {0.0}> {
  a = Conv (x, wa, b)
  ra = Relu (a)
  y = Conv (ra, wc)
  c = Conv (x, wb, b)
  rc = Relu (c)
  z = Conv (rc, wd)
}"""


@pytest.mark.parametrize("activation", ["PRelu (a, slope)", "LeakyRelu <alpha = 0.1> (a)"])
def test_equalization_balances_through_prelu_and_leaky_relu(rng, activation):
    """Both are positively homogeneous whatever their slopes: balancing through them leaves the float model as
    it was."""
    model = parse(HEADER + f"""
leaky (float[N, 3, 8, 8] x) => (float[N, 16, 8, 8] y) <float[16, 3, 3, 3] wa = {{0.0}}, float[16] ba = {{0.0}},
    float[16, 1, 1] slope = {{0.0}}, float[16, 16, 1, 1] wb = {{0.0}}> {{
  a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
  r = {activation}
  y = Conv (r, wb)
}}""", rng)
    wa = initializer(model, "wa").copy()
    wa[[2, 9]] *= 30.0  # uneven rows, so the factors are far from 1
    model = with_weight(model, "wa", wa)
    prepared, plan = prepared_plan(model)
    equalized, notes = equalize(prepared, plan)
    assert "equalized 1 Conv pairs" in " ".join(notes) and f"({activation.split()[0]})" in " ".join(notes), notes
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(equalized, {"x": x})[0], run_ort(prepared, {"x": x})[0], rtol=1e-4, atol=1e-4)
    assert initializer(equalized, "wa").tobytes() != initializer(prepared, "wa").tobytes()


def test_equalization_gives_a_shared_bias_a_copy_per_conv(rng):
    model = parse(SHARED_BIAS, rng)
    wa = initializer(model, "wa").copy()
    wa[3] *= 40.0  # one loud channel: something to balance
    model = with_weight(model, "wa", wa)
    prepared, plan = prepared_plan(model)
    out, notes = equalize(prepared, plan)
    assert "equalized 2 Conv pairs" in " ".join(notes) and "skipped" not in " ".join(notes), notes
    firsts = [n for n in out.graph.node if n.name in ("Conv_a", "Conv_c")]
    assert firsts[0].input[2] != firsts[1].input[2], "each first Conv has its own rescaled bias"
    x = rng.normal(size=(4, 8, 6, 6)).astype(np.float32)
    for want, got in zip(run_ort(prepared, {"x": x}), run_ort(out, {"x": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# A pointwise Conv whose one output channel is 40x the others, into another pointwise Conv that scales it back
# (BlazeFace's shape): one per-tensor scale for the tensor between them rounds the quiet channels; equalization
# evens them out.
LOUD_CHANNEL = HEADER + """
loud (float[N, 16, 6, 6] x) => (float[N, 16, 6, 6] y) <float[16, 16, 1, 1] wa = {0.0}, float[16, 16, 1, 1] wb = {0.0}> {
  a = Conv (x, wa)
  y = Conv (a, wb)
}"""


def test_equalization_is_kept_only_where_it_brings_the_outputs_closer(rng, monkeypatch):
    model = parse(LOUD_CHANNEL, rng)
    wa, wb = initializer(model, "wa").copy(), initializer(model, "wb").copy()
    wa[3] *= 40.0
    wb[:, 3] /= 40.0  # the next layer compensates: every channel of the tensor between them matters alike
    model = with_weight(with_weight(model, "wa", wa), "wb", wb)
    calib, held_out = rng.normal(size=(48, 16, 6, 6)).astype(np.float32), rng.normal(size=(24, 16, 6, 6))
    reference = run_ort(model, {"x": held_out.astype(np.float32)})[0]

    def sqnr(result) -> float:
        error = run_ort(result.model, {"x": held_out.astype(np.float32)})[0] - reference
        return float(10 * np.log10(np.sum(reference ** 2) / np.sum(error ** 2)))

    plain = qdq.quantize(model, {"x": calib}, config=QuantizeConfig(techniques=()))
    kept = qdq.quantize(model, {"x": calib}, config=QuantizeConfig(techniques=("equalize",)))
    assert any(n.startswith("equalized 1 Conv pairs") and "SQNR on the first 32 samples" in n
               for n in kept.report.notes), kept.report.notes
    assert kept.ranges.rescaled == ("equalize",)
    assert sqnr(kept) > sqnr(plain) + 6, (sqnr(kept), sqnr(plain))

    def damaging(model, plan, only=None):  # "balances" by breaking the second Conv's weights
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for init in out.graph.initializer:
            if init.name == "wb":
                init.CopyFrom(onnx.numpy_helper.from_array(-initializer(model, "wb"), "wb"))
        return out, ["equalized 1 Conv pairs: Conv_a -> Conv_y (identity)"]

    monkeypatch.setattr("qdq.optimize.pipeline.equalize", damaging)
    left = qdq.quantize(model, {"x": calib}, config=QuantizeConfig(techniques=("equalize",)))
    assert any(n.startswith("equalization measured and left out") for n in left.report.notes), left.report.notes
    assert left.ranges.rescaled == () and sqnr(left) == pytest.approx(sqnr(plain), abs=1e-6)


def loud_pair(rng, loudness: float) -> onnx.ModelProto:
    model = parse(LOUD_CHANNEL, rng)
    wa, wb = initializer(model, "wa").copy(), initializer(model, "wb").copy()
    wa[3] *= loudness
    wb[:, 3] /= loudness
    return with_weight(with_weight(model, "wa", wa), "wb", wb)


@pytest.mark.parametrize("loudness", [40.0, 4.0])
def test_equalization_predicts_the_rounding_noise_at_the_second_conv(rng, loudness):
    """The prediction against the noise measured in numpy: the tensor between the pair rounded per tensor at its
    max, the second Conv's weights per output channel, before and after balancing."""
    from qdq.optimize.channels import Channels
    from qdq.optimize.equalize import PREDICTED_GAIN_DB, balance, equalization_pairs, predicted_gain

    model = loud_pair(rng, loudness)
    prepared, plan = prepared_plan(model)
    x = rng.normal(size=(32, 16, 6, 6))

    def measured_noise(m: onnx.ModelProto) -> float:
        wa, wb = (initializer(m, m.graph.node[i].input[1]).astype(np.float64)[:, :, 0, 0] for i in (0, 1))
        a = np.einsum("oc,nchw->nohw", wa, x)
        step = np.abs(a).max() / 127
        rows = np.abs(wb).max(axis=1, keepdims=True) / 127
        exact = np.einsum("oc,nchw->nohw", wb, a)
        rounded = np.einsum("oc,nchw->nohw", np.round(wb / rows) * rows, np.round(a / step) * step)
        return float(np.mean((rounded - exact) ** 2))

    pairs, _ = equalization_pairs(prepared, plan)
    a = np.einsum("oc,nchw->nohw", initializer(prepared, "wa").astype(np.float64)[:, :, 0, 0], x)
    channels = Channels(np.abs(a).max(axis=(0, 2, 3)), np.mean(a ** 2, axis=(0, 2, 3)))
    predicted = predicted_gain(initializer(prepared, "wa"), initializer(prepared, "wb"), 1, channels)
    measured = 10 * np.log10(measured_noise(prepared) / measured_noise(balance(prepared, pairs)))
    assert predicted == pytest.approx(measured, abs=1.0), (predicted, measured)
    assert (predicted > PREDICTED_GAIN_DB) == (loudness == 40.0)


def test_ranges_saved_after_equalization_redo_it_with_the_calibration_data(rng, tmp_path):
    from qdq.errors import DataError
    from qdq.range_files import read_ranges, write_ranges

    model = loud_pair(rng, 40.0)
    calib = rng.normal(size=(48, 16, 6, 6)).astype(np.float32)
    first = qdq.quantize(model, {"x": calib}, config=QuantizeConfig(techniques=("equalize",)))
    assert first.ranges.rescaled == ("equalize",)
    saved = read_ranges(write_ranges(first.ranges, tmp_path / "r.json"))
    again = qdq.quantize(model, {"x": calib}, ranges=saved, config=QuantizeConfig(optimize=0))
    assert any("equalize redone" in n for n in again.report.notes), again.report.notes
    assert {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in again.model.graph.initializer} == \
        {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in first.model.graph.initializer}
    with pytest.raises(DataError, match="measured after equalization.*give the calibration data"):
        qdq.quantize(model, None, ranges=saved)


def test_equalization_leaves_pairs_alone_that_it_would_not_help(rng):
    """An even pair (every channel alike): predicted to gain nothing, not balanced, not even checked."""
    model = parse(LOUD_CHANNEL, rng)
    calib = rng.normal(size=(48, 16, 6, 6)).astype(np.float32)
    result = qdq.quantize(model, {"x": calib}, config=QuantizeConfig(techniques=("equalize",)))
    assert any(n.startswith("equalization: 0 of 1 Conv pairs predicted") for n in result.report.notes), \
        result.report.notes
    assert not any("equalization measured" in n for n in result.report.notes)
    plain = qdq.quantize(model, {"x": calib}, config=QuantizeConfig(techniques=()))
    assert result.ranges.rescaled == () and result.ranges.amax == plain.ranges.amax


def test_smoothquant_leaves_the_float_model_unchanged_and_flattens_the_activation(rng):
    model = parse(NORM, rng)
    for init in model.graph.initializer:  # outlier channels, as LayerNorm scales in trained transformers have
        if init.name in ("g", "g2"):
            g = np.ones(16, np.float32)
            g[[3, 11]] = 30.0
            init.CopyFrom(onnx.numpy_helper.from_array(g, init.name))
    prepared, plan = prepared_plan(model)
    x = rng.normal(size=(40, 6, 16)).astype(np.float32)
    from qdq.calibrate.data import input_specs, open_data

    data = open_data({"x": x}, input_specs(prepared))
    smoothed, notes, peaks = smooth(prepared, plan, data, QuantizeConfig(), branches=True)
    for before, after in zip(run_ort(prepared, {"x": x}), run_ort(smoothed, {"x": x}), strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    for tensor in ("n", "n2"):  # pre-norm: folded into the LayerNorm; post-norm: a Mul on the layers' branch
        norm_before = run_ort(prepared, {"x": x}, [tensor])[0].reshape(-1, 16)
        norm_after = run_ort(smoothed, {"x": x}, [tensor])[0].reshape(-1, 16)
        assert spread(np.abs(norm_after).max(0)) < 0.5 * spread(np.abs(norm_before).max(0)), tensor
        np.testing.assert_allclose(peaks[tensor], np.abs(norm_after).max(), rtol=1e-5, err_msg=tensor)
    assert "smoothquant on 2 of 2" in " ".join(notes), notes
    assert len(nodes_by_op(smoothed, "Mul")) == 1, "only the post-norm LayerNorm needs a Mul"
    _, notes, _ = smooth(prepared, plan, data, QuantizeConfig(), branches=False)
    assert "needs a Mul on the branch to its layers" in " ".join(notes), "skipped without branches, with its reason"


# An MLP: the second layer reads a Relu's output (no LayerNorm to fold into: a Mul on the branch), and the first
# reads the graph input (nothing to divide it in: skipped).
MLP = HEADER + """
mlp (float[N, 6, 16] x) => (float[N, 6, 24] y) <float[16, 32] w1 = {0.0}, float[32] b1 = {0.0},
    float[32, 24] w2 = {0.0}> {
  h = MatMul (x, w1)
  hb = Add (h, b1)
  r = Relu (hb)
  y = MatMul (r, w2)
}"""


def mlp_with_outlier_channels(rng: np.random.Generator) -> onnx.ModelProto:
    """MLP with two hidden channels far larger than the rest: SmoothQuant's case for a Mul on the branch."""
    model = parse(MLP, rng)
    for init in model.graph.initializer:
        if init.name == "w1":
            w1 = onnx.numpy_helper.to_array(init).copy()
            w1[:, [5, 20]] *= 40.0
            init.CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    return model


def test_smoothquant_divides_any_layer_input_with_a_mul_and_leaves_the_float_model_unchanged(rng):
    model = mlp_with_outlier_channels(rng)
    prepared, plan = prepared_plan(model)
    x = rng.normal(size=(40, 6, 16)).astype(np.float32)
    from qdq.calibrate.data import input_specs, open_data

    data = open_data({"x": x}, input_specs(prepared))
    smoothed, notes, _ = smooth(prepared, plan, data, QuantizeConfig(), branches=True)
    np.testing.assert_allclose(run_ort(smoothed, {"x": x})[0], run_ort(prepared, {"x": x})[0], rtol=1e-4, atol=1e-4)
    text = " ".join(notes)
    assert "x: a graph input" in text, notes
    assert "smoothquant on 1 of 1" in text, notes
    (mul,) = nodes_by_op(smoothed, "Mul")
    second = next(n for n in smoothed.graph.node if n.op_type == "MatMul" and n.input[1] == "w2")
    assert mul.output[0] == second.input[0] == "r", "the plan quantizes r for the layer: the Mul must write it"
    before = np.abs(run_ort(prepared, {"x": x}, ["r"])[0]).reshape(-1, 32).max(0)
    after = np.abs(run_ort(smoothed, {"x": x}, ["r"])[0]).reshape(-1, 32).max(0)
    assert spread(after) < 0.5 * spread(before), (spread(before), spread(after))
    few = open_data({"x": x[:8]}, input_specs(prepared))
    _, notes, _ = smooth(prepared, plan, few, QuantizeConfig(), branches=True)
    assert "1 that need a Mul left alone: 8 calibration samples, they need 32" in " ".join(notes), notes


def test_quantize_gives_smoothed_activations_their_maximum_as_amax(rng):
    """Whatever the method, a smoothed activation's amax is its calibration maximum (measured here with ORT)."""
    model = parse(NORM, rng)
    g = np.ones(16, np.float32)
    g[[3, 11]] = 30.0
    model = with_weight(with_weight(model, "g", g), "g2", g)
    x = rng.normal(size=(40, 6, 16)).astype(np.float32)
    result = qdq.quantize(model, {"x": x}, config=QuantizeConfig(method="mse", techniques=("smoothquant",)))
    assert "smoothquant on 2 of 2" in " ".join(result.report.notes), result.report.notes
    float_part = qdq.quantize(model, {"x": x}, config=QuantizeConfig(method="mse", optimize=0))
    assert float_part.ranges.source("n") == "mse"
    for tensor in ("n", "n2"):
        assert result.ranges.source(tensor) == "smoothquant: max", result.ranges.sources
        smoothed_model = onnx.ModelProto()
        smoothed_model.CopyFrom(result.model)
        measured = np.abs(run_ort(smoothed_model, {"x": x}, [tensor])[0]).max()
        np.testing.assert_allclose(result.ranges.amax[tensor], measured, rtol=1e-5, err_msg=tensor)


def test_smoothquant_factors_follow_the_published_formula(rng):
    """s_j = max|X_j|^α / max|W_j|^(1−α), X_j over all calibration rows, W_j over every layer reading X (numpy)."""
    model = parse(NORM, rng)
    g = np.ones(16, np.float32)
    g[[3, 11]] = 30.0
    model = with_weight(model, "g", g)
    prepared, plan = prepared_plan(model)
    x = rng.normal(size=(8, 6, 16)).astype(np.float32)
    from qdq.calibrate.data import input_specs, open_data

    data = open_data({"x": x}, input_specs(prepared))
    smoothed, notes, _ = smooth(prepared, plan, data, QuantizeConfig(), branches=False)
    applied = [n for n in notes if n.startswith("smoothquant on 1 of 1")]
    assert applied, notes
    alpha = float(applied[0].split("alpha ")[1].split(",")[0])
    n = run_ort(prepared, {"x": x}, ["n"])[0].reshape(-1, 16).astype(np.float64)
    wq, wk = initializer(prepared, "wq").astype(np.float64), initializer(prepared, "wk").astype(np.float64)
    xmax = np.abs(n).max(0)
    wmax = np.maximum(np.abs(wq).max(1), np.abs(wk).max(1))
    want = xmax ** alpha / wmax ** (1 - alpha)
    got = initializer(smoothed, "wq").astype(np.float64) / wq  # each weight row multiplied by its factor
    np.testing.assert_allclose(got, np.broadcast_to(want[:, None], wq.shape), rtol=1e-5)


def test_config_rejects_unknown_levels_and_techniques():
    with pytest.raises(ValueError, match="optimize must be"):
        QuantizeConfig(optimize=3)
    with pytest.raises(ValueError, match="unknown techniques"):
        QuantizeConfig(techniques=("adaround", "magic"))


def test_ranges_given_skip_the_float_rewrites(rng):
    model = parse(NORM, rng)
    x = rng.normal(size=(4, 6, 16)).astype(np.float32)
    ranges = qdq.calibrate(model, {"x": x})
    result = qdq.quantize(model, {"x": x}, ranges=ranges, config=QuantizeConfig(optimize=2))
    assert any("smoothquant skipped: ranges were given" in n or "equalize and smoothquant skipped" in n
               for n in result.report.notes), result.report.notes


def test_ranges_saved_after_smoothquant_reproduce_the_model_and_say_so(rng, tmp_path, caplog):
    """Ranges measured on the smoothed model describe its tensors: given back (the Python value or qdq's JSON),
    SmoothQuant is redone so they fit, and the model is the same. The text format cannot say so: a warning."""
    from qdq.errors import DataError
    from qdq.range_files import read_ranges, write_ranges

    model = parse(NORM, rng)
    g = np.ones(16, np.float32)
    g[[3, 11]] = 30.0
    model = with_weight(with_weight(model, "g", g), "g2", g)
    x = rng.normal(size=(40, 6, 16)).astype(np.float32)
    config = QuantizeConfig(techniques=("smoothquant",))
    first = qdq.quantize(model, {"x": x}, config=config)
    assert first.ranges.rescaled == ("smoothquant",)
    path = write_ranges(first.ranges, tmp_path / "r.json")
    saved = read_ranges(path)
    assert saved.rescaled == ("smoothquant",) and saved.amax == first.ranges.amax
    for given, level in ((saved, QuantizeConfig(optimize=0)), (first.ranges, config)):
        again = qdq.quantize(model, {"x": x}, ranges=given, config=level)
        assert any("smoothquant redone" in n for n in again.report.notes), again.report.notes
        # the smoothed, quantized weights, the norms' scales and biases and the Q/DQ scales, bit for bit
        assert {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in again.model.graph.initializer} == \
            {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in first.model.graph.initializer}
    # The same ranges as if unsmoothed clip the channels SmoothQuant brought down: far from the float outputs.
    plain = qdq.quantize(model, {"x": x}, ranges=dataclasses.replace(saved, rescaled=()), config=config)
    assert any("smoothquant skipped: ranges were given" in n for n in plain.report.notes), plain.report.notes
    reference = run_ort(model, {"x": x}, ["y"])[0]

    def error(m: onnx.ModelProto) -> float:
        return float(np.mean((run_ort(m, {"x": x}, ["y"])[0] - reference) ** 2))

    assert error(plain.model) > 4 * error(first.model), (error(plain.model), error(first.model))
    with pytest.raises(DataError, match="measured after SmoothQuant.*give the calibration data"):
        qdq.quantize(model, None, ranges=saved)
    with caplog.at_level("WARNING"):
        write_ranges(first.ranges, tmp_path / "r.txt")
    assert "measured after smoothquant, which the text format cannot say" in caplog.text


def test_explain_lists_each_technique_and_what_it_skips(rng, tmp_path, capsys):
    from qdq.cli import main

    path = tmp_path / "chain.onnx"
    onnx.save(parse(CHAIN, rng), str(path))
    assert main(["explain", str(path), "--optimize", "2"]) == 0
    out = capsys.readouterr().out
    assert "techniques at --optimize 2: equalize, smoothquant, adaround, bias-correction" in out
    assert "equalize candidate: Conv_a -> Conv_d (Relu)" in out and "equalize skips" in out and "ReLU6" in out
    assert "predicted rounding noise drops by 14 dB" in out
    assert main(["explain", str(path), "--techniques", "bias-correction"]) == 0
    assert "equalize" not in capsys.readouterr().out.split("techniques at")[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(path), "--techniques", "magic"])
    assert exit_info.value.code == 2
    assert "unknown technique 'magic'" in capsys.readouterr().err


def test_weight_techniques_stay_off_past_the_large_model_budget(monkeypatch):
    """Past LARGE_MODEL_BYTES the techniques would copy the weights (8x the weights seen on 2.2 GB): said, not run."""
    import qdq.optimize.pipeline as pipeline

    monkeypatch.setattr(pipeline, "LARGE_MODEL_BYTES", 1)  # the digits model is "large" now
    result = qdq.quantize(DIGITS / "digits.onnx", calibration_data=DIGITS / "calib.npz",
                          config=qdq.QuantizeConfig(optimize=1))
    notes = " | ".join(result.report.notes)
    assert "bias-correction skipped: the model holds" in notes, notes
    assert "SQNR on the first" not in notes, notes


def test_the_uncorrected_score_riding_on_the_moments_pass_equals_a_pass_of_its_own():
    from qdq.calibrate.data import input_specs, open_data
    from qdq.compare import compare_models
    from qdq.model_io import load_model
    from qdq.optimize.moments import collect_moments
    from qdq.optimize.weights import OutputCheck, quantized_model

    prepared, _ = prepare(load_model(DIGITS / "digits.onnx"))
    plan = plan_quantization(prepared)
    ranges = qdq.quantize(prepared, DIGITS / "calib.npz", config=QuantizeConfig(optimize=0)).ranges
    data = open_data(DIGITS / "calib.npz", input_specs(prepared), 16)  # 128 samples; the check reads the first 40
    check = OutputCheck(prepared, 40)
    collect_moments(quantized_model(prepared, plan, ranges), find_layers(prepared, plan)[0], data, with_gram=False,
                    on_outputs=check)
    alone = compare_models(prepared, quantized_model(prepared, plan, ranges), data.head(40))
    assert check.seen == 48, "whole batches, as Dataset.head takes them"
    assert check.sqnr() == pytest.approx(min(o.sqnr_db for o in alone.outputs), abs=1e-9)
    assert alone.samples == 48


# A transformer's Linear as some exporters write it (GPT-2's Conv1D): the tokens flattened into the batch axis.
FLATTENED = """<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 16, 32] x) => (float[M, 32] y) <float[32, 32] w = {0.0}, float[32] b = {0.0},
    int64[2] rows = {-1, 32}> {
  f = Reshape (x, rows)
  y = Gemm (f, w, b)
}"""


@pytest.mark.parametrize("samples", [8, 40])
def test_sample_counts_are_samples_not_the_token_rows_flattened_into_the_batch(samples, rng):
    model = parse(FLATTENED, rng)
    data = {"x": rng.normal(size=(samples, 16, 32)).astype(np.float32)}
    notes = " | ".join(qdq.quantize(model, data).report.notes)
    if samples < 32:  # 8 samples are 128 token rows: the 32-sample guards must not count those
        assert "bias correction skipped: 8 calibration samples, it needs 32" in notes, notes
        assert "that need a Mul left alone: 8 calibration samples" in notes, notes
    else:  # 16 token rows per sample: not a classifier's [batch, features] input
        assert "a classifier's" not in notes and "bias correction (empirical" in notes, notes


def test_per_sample_splits_flattened_rows_and_keeps_an_undivided_run_whole():
    from qdq.calibrate.data import per_sample
    assert [c.shape for c in per_sample(np.zeros((12, 5)), 4)] == [(3, 5)] * 4
    assert [c.shape for c in per_sample(np.zeros((2, 3, 5)), 2)] == [(1, 3, 5)] * 2
    assert [c.shape for c in per_sample(np.zeros((7, 5)), 2)] == [(7, 5)]
    assert [c.shape for c in per_sample(np.zeros(()), 3)] == [()]


def test_per_tensor_attribution_does_not_compare_a_smoothed_tensor_with_the_float_one(rng):
    """After SmoothQuant's Mul, the quantized model's r is r/s: against the float r it would read as a huge error."""
    from qdq.calibrate.data import input_specs, open_data
    from qdq.compare import attribute_error

    model = mlp_with_outlier_channels(rng)
    x = rng.normal(size=(40, 6, 16)).astype(np.float32)
    result = qdq.quantize(model, {"x": x})
    assert any("smoothquant on 1 of 1" in n for n in result.report.notes), result.report.notes
    prepared, _ = prepare(model)
    errors = {e.tensor: e for e in attribute_error(prepared, result.model, open_data({"x": x}, input_specs(prepared)))}
    assert np.isnan(errors["r"].total.sqnr_db) and errors["r"].local.sqnr_db > 25
    assert errors["x"].total.sqnr_db > 25, "an unsmoothed tensor is compared as before"
