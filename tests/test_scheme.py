"""The scheme as a value: INT8's numbers unchanged, FP8 E4M3 against ONNX Runtime's QuantizeLinear."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import run_ort
from onnx import TensorProto, helper, numpy_helper

from qdq.calibrate.histogram import Histogram
from qdq.calibrate.options import CalibrationOptions
from qdq.calibrate.registry import METHODS, method_amax
from qdq.scheme import FP8, INT8, SCHEMES


def qdq_model(scheme, scale: np.ndarray) -> onnx.ModelProto:
    zero = numpy_helper.from_array(scheme.zero_point(scale.shape), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("q", scheme.element_type, [64]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                              [numpy_helper.from_array(scale, "s"), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", scheme.min_opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_int8_scale_is_amax_over_127_with_the_floor():
    assert INT8.scale(12.7).tobytes() == np.float32(12.7 / 127).tobytes()
    assert INT8.scale(0.0) == np.float32(1e-6 / 127), "an all-zeros tensor gets the floor"
    assert INT8.zero_point(()).dtype == np.int8 and INT8.min_opset == 13


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_quantize_matches_onnxruntime_bit_for_bit(rng, scheme):
    x = (rng.standard_normal(64) * 3).astype(np.float32)
    x[:4] = [1e4, -1e4, 0.0, 1e-9]  # saturation both ways, zero, underflow
    scale = scheme.scale(np.float32(2.5))
    q, _ = run_ort(qdq_model(scheme, scale), {"x": x})
    ours = scheme.quantize(x, scale, None)
    assert ours.dtype == scheme.element_dtype
    assert np.array_equal(ours.view(np.uint8), np.asarray(q).view(np.uint8)), f"{scheme.name}: bits differ"


def test_fp8_is_e4m3_with_448():
    assert FP8.scale(448.0) == np.float32(1.0) and FP8.min_opset == 19
    assert FP8.element_dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert FP8.fake_quantize(np.array([1000.0, 0.3]), np.array(448.0)).tolist() == [448.0, 0.3125]


def test_every_method_is_registered_and_reduces_a_histogram(rng):
    hist = Histogram(256)
    hist.update(rng.standard_normal(10_000).astype(np.float32))
    for name, method in METHODS.items():
        if method.statistic == "histogram":
            amax = method_amax(hist, CalibrationOptions(method=name, num_bins=256))
            assert 0 < amax <= hist.amax, f"{name}: amax {amax} outside (0, {hist.amax}]"
    with pytest.raises(ValueError, match="not one of"):
        CalibrationOptions(method="entopy")
