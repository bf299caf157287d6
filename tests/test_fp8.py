"""FP8 (E4M3) explicit quantization: opset 19, scale amax/448, FLOAT8E4M3FN zero point 0, per-channel weights,
placement on weighted ops only, `qdq check`'s FP8 rules, range files, and ONNX Runtime checked exactly against a
numpy/ml_dtypes reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import initializer, nodes_by_op, parse
from test_quantize_graphs import GEMM, RESIDUAL

import qdq
from qdq.check import check_model
from qdq.graph import default_opset
from qdq.range_files import parse_cache, render_cache
from qdq.ranges import TensorRanges
from qdq.runtime import quantized_session
from qdq.scheme import FP8, INT8

E4M3 = ml_dtypes.float8_e4m3fn


def fp8_reference(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Quantize-dequantize as ONNX defines it for FLOAT8E4M3FN with saturate=1, in numpy and ml_dtypes."""
    return np.clip(x / scale, -448, 448).astype(E4M3).astype(np.float32) * scale


def test_fp8_gemm_is_exactly_the_reference(rng):
    model = parse(GEMM, rng)
    x = (rng.standard_normal((32, 16)) * 2).astype(np.float32)
    out = qdq.quantize(model, {"x": x}, config=qdq.QuantizeConfig(method="max", scheme="fp8")).model
    onnx.checker.check_model(out, full_check=True)
    assert default_opset(out) >= 19, "FP8 Q/DQ needs opset 19"
    assert [f for f in check_model(out) if f.severity == "error"] == []
    for node in nodes_by_op(out, "QuantizeLinear") + nodes_by_op(out, "DequantizeLinear"):
        zero = initializer(out, node.input[2])
        assert zero.dtype == E4M3 and not np.any(zero.astype(np.float32)), f"{node.name}: FP8 zero point 0"

    sx = np.float32(np.abs(x).max() / np.float64(448))
    [dq_x] = [n for n in nodes_by_op(out, "QuantizeLinear") if n.input[0] == "x"]
    assert initializer(out, dq_x.input[1]) == sx, "activation scale is float32(amax / 448)"
    w, b = initializer(model, "w"), initializer(model, "b")
    sw = (np.abs(w).max(axis=0).astype(np.float64) / 448).astype(np.float32)  # Gemm B [K, N]: axis 1
    [weight_dq] = [n for n in nodes_by_op(out, "DequantizeLinear") if n.input[0] != dq_x.output[0]]
    assert next(a.i for a in weight_dq.attribute if a.name == "axis") == 1, "per output channel"
    assert np.array_equal(initializer(out, weight_dq.input[1]), sw), "weight scales are max|w| / 448 per channel"

    expected = fp8_reference(x, sx) @ fp8_reference(w, sw[None, :]) + b
    got = quantized_session(out).run(None, {"x": x})[0]
    # Both sides multiply the same dequantized float32 values; only the float32 GEMM's summation order differs.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, fp8_reference(x, sx) @ w + b, rtol=1e-3, atol=1e-3), "weights must be FP8"


def test_fp8_places_q_dq_on_weighted_ops_only(rng):
    model = parse(RESIDUAL, rng)
    x = rng.standard_normal((4, 16, 6, 6)).astype(np.float32)
    int8 = qdq.explain(model)
    fp8 = qdq.explain(model, config=qdq.QuantizeConfig(scheme="fp8"))
    add = next(d for d in fp8.decisions if d.op == "Add")
    assert next(d for d in int8.decisions if d.op == "Add").quantized, "INT8 quantizes the residual Add"
    assert not add.quantized and add.rule == "fp8-gemm-only", f"{add.node}: {add.rule} {add.reason}"
    out = qdq.quantize(model, {"x": x}, config=qdq.QuantizeConfig(scheme="fp8", method="max")).model
    assert [f for f in check_model(out) if f.rule == "fp8-op"] == [], "no FP8 data outside Conv/Gemm/MatMul"


def test_check_finds_fp8_faults(rng):
    out = qdq.quantize(parse(GEMM, rng), {"x": rng.standard_normal((8, 16)).astype(np.float32)},
                       config=qdq.QuantizeConfig(method="max", scheme="fp8")).model
    broken = onnx.ModelProto()
    broken.CopyFrom(out)
    zero = next(i for i in broken.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN)
    zero.CopyFrom(onnx.numpy_helper.from_array(np.ones(list(zero.dims), dtype=ml_dtypes.float8_e5m2), zero.name))
    broken.opset_import[0].version = 17
    rules = {(f.rule, f.message.split(":")[0]) for f in check_model(broken) if f.severity == "error"}
    assert ("opset", "opset 17") in rules, f"FP8 below opset 19 must be an error: {rules}"
    assert any(rule == "zero-point" for rule, _ in rules), f"an E5M2 zero point is not TensorRT's FP8: {rules}"


def test_range_files_keep_amax_and_a_cache_stores_int8_scales():
    ranges = TensorRanges({"x": 4.48})
    assert ranges.scale("x", FP8) == np.float32(0.01), "text/JSON amax -> FP8 scale amax/448"
    cache = parse_cache(render_cache(ranges), "model.cache")
    assert np.float32(cache.scale("x", INT8)) == np.float32(4.48 / 127), "a cache stores the INT8 scale"
    assert cache.scale("x", FP8) == pytest.approx(4.48 / 448, rel=1e-6), "FP8 from a cache: amax = scale*127"


def test_cli_quantizes_and_checks_fp8(tmp_path):
    from conftest import DIGITS

    from qdq.cli import main

    out = tmp_path / "digits.fp8.onnx"
    assert main(["quantize", str(DIGITS / "digits.onnx"), "-o", str(out), "--calib", str(DIGITS / "calib.npz"),
                 "--scheme", "fp8", "--method", "max", "-q"]) == 0
    model = onnx.load(str(out))
    assert default_opset(model) >= 19
    assert {initializer(model, n.input[2]).dtype for n in nodes_by_op(model, "DequantizeLinear")} == {
        np.dtype(E4M3)}, "every Q/DQ pair is FP8"
    assert main(["check", str(out), "-q"]) == 0, "qdq check accepts qdq's FP8 output"
    assert main(["explain", str(DIGITS / "digits.onnx"), "--scheme", "fp8", "-q"]) == 0


def test_fp8_skips_equalization_which_models_the_int8_grid(rng):
    """Equalization's prediction and keep-or-drop check count INT8 steps; under FP8 it is skipped, said so."""
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
pair (float[N, 16, 6, 6] x) => (float[N, 16, 6, 6] y) <float[16, 16, 1, 1] wa = {0.0}, float[16, 16, 1, 1] wb = {0.0}> {
  a = Conv (x, wa)
  y = Conv (a, wb)
}""", rng)
    data = {"x": rng.normal(size=(40, 16, 6, 6)).astype(np.float32)}
    fp8 = qdq.quantize(model, data, config=qdq.QuantizeConfig(scheme="fp8"))
    assert "equalize skipped: its prediction and check model the int8 grid, not fp8" in fp8.report.notes
    assert fp8.ranges.rescaled == ()
    int8 = qdq.quantize(model, data)
    assert any(n.startswith("equalization: 0 of 1 Conv pairs") for n in int8.report.notes), int8.report.notes
