"""End to end on tiny hand-built graphs: placement, exact scales, zero points, axes, accuracy vs ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import initializer, nodes_by_op, parse, producers, run_ort, sqnr_db

import qdq
from qdq.config import QuantizeConfig
from qdq.scheme import INT8

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'

CONV = HEADER + """
conv (float[N, 4, 8, 8] x) => (float[N, 16, 8, 8] y) <float[16, 4, 3, 3] w = {0.0}, float[16] b = {0.0}> {
  y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
}"""

CONV_TRANSPOSE = HEADER + """
deconv (float[N, 4, 5, 5] x) => (float[N, 6, 10, 10] y) <float[4, 6, 2, 2] w = {0.0}> {
  y = ConvTranspose <strides = [2, 2]> (x, w)
}"""

GEMM = HEADER + """
gemm (float[N, 16] x) => (float[N, 24] y) <float[16, 24] w = {0.0}, float[24] b = {0.0}> {
  y = Gemm (x, w, b)
}"""

GEMM_TRANS_B = HEADER + """
gemm (float[N, 16] x) => (float[N, 24] y) <float[24, 16] w = {0.0}, float[24] b = {0.0}> {
  y = Gemm <transB = 1> (x, w, b)
}"""

MATMUL = HEADER + """
matmul (float[N, 5, 16] x) => (float[N, 5, 24] y) <float[16, 24] w = {0.0}> {
  y = MatMul (x, w)
}"""

# Two activations: nothing constant, so both operands are quantized per tensor.
MATMUL_ACTIVATIONS = HEADER + """
attn (float[N, 24, 16] q, float[N, 16, 24] k) => (float[N, 24, 24] y) {
  y = MatMul (q, k)
}"""

# x -> Conv -> Relu -> Conv -> Add(x) -> Relu : a residual block; x feeds both a Conv and the Add.
RESIDUAL = HEADER + """
block (float[N, 16, 6, 6] x) => (float[N, 16, 6, 6] y)
<float[16, 16, 3, 3] w1 = {0.0}, float[16] b1 = {0.0}, float[16, 16, 3, 3] w2 = {0.0}, float[16] b2 = {0.0}> {
  a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r = Relu (a)
  c = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
  s = Add (c, x)
  y = Relu (s)
}"""

CASES = {
    "conv": (CONV, {"x": (3, 4, 8, 8)}, {"Conv": 0}),
    "conv_transpose": (CONV_TRANSPOSE, {"x": (3, 4, 5, 5)}, {"ConvTranspose": 1}),
    "gemm": (GEMM, {"x": (3, 16)}, {"Gemm": 1}),
    "gemm_transB": (GEMM_TRANS_B, {"x": (3, 16)}, {"Gemm": 0}),
    "matmul": (MATMUL, {"x": (3, 5, 16)}, {"MatMul": 1}),
    "residual": (RESIDUAL, {"x": (3, 16, 6, 6)}, {"Conv": 0}),
}


def feeds_for(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator, n: int = 1) -> dict[str, np.ndarray]:
    return {name: rng.normal(0, 1, (shape[0] * n, *shape[1:])).astype(np.float32) for name, shape in shapes.items()}


def dq_input(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> onnx.NodeProto:
    producer = producers(model).get(node.input[index])
    assert producer is not None and producer.op_type == "DequantizeLinear", (
        f"{node.name}: input {index} ({node.input[index]}) should come from a DequantizeLinear")
    return producer


@pytest.mark.parametrize("case", sorted(CASES))
def test_weighted_ops_get_qdq_on_activation_and_weight(case, rng):
    text, shapes, axes = CASES[case]
    model = parse(text, rng)
    data = feeds_for(shapes, rng, n=4)
    result = qdq.quantize(model, data, config=qdq.QuantizeConfig(batch_size=3))
    out = result.model
    for op, axis in axes.items():
        for node in nodes_by_op(out, op):
            act, weight = dq_input(out, node, 0), dq_input(out, node, 1)
            assert producers(out)[act.input[0]].op_type == "QuantizeLinear", f"{node.name}: activation Q/DQ"
            assert weight.input[0].endswith("_int8"), f"{node.name}: weights stored as int8"
            assert initializer(out, weight.input[0]).dtype == np.int8
            attrs = {a.name: a.i for a in weight.attribute}
            assert attrs.get("axis") == axis, f"{node.name}: per-channel axis {attrs.get('axis')} != {axis}"
            if len(node.input) > 2:
                assert node.input[2] in {i.name for i in out.graph.initializer}, f"{node.name}: bias stays float"
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_scales_are_amax_over_127_from_ort(case, rng):
    text, shapes, _ = CASES[case]
    model = parse(text, rng)
    data = feeds_for(shapes, rng, n=4)
    result = qdq.quantize(model, data, config=qdq.QuantizeConfig(method="max", batch_size=3))
    out = result.model
    quantizers = nodes_by_op(out, "QuantizeLinear")
    assert quantizers, "at least one activation is quantized"
    for q in quantizers:
        tensor = q.input[0]
        values = data[tensor] if tensor in data else np.concatenate(
            [run_ort(model, {k: v[i:i + 3] for k, v in data.items()}, [tensor])[0] for i in range(0, 12, 3)])
        amax = np.abs(values).max()
        expected = np.float32(np.float64(amax) / INT8.qmax)
        scale = initializer(out, q.input[1])
        assert scale.dtype == np.float32 and scale.shape == ()
        # qdq calibrates with ORT's fusions on (Conv+Relu), the oracle runs the plain graph: float rounding apart.
        assert scale == pytest.approx(expected, rel=1e-6), f"{q.name}: scale {scale!r} != float32(amax/127)"
        zero = initializer(out, q.input[2])
        assert zero.dtype == np.int8 and zero.shape == () and zero == 0, f"{q.name}: zero point int8 0"


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_output_close_to_float(case, rng):
    text, shapes, _ = CASES[case]
    model = parse(text, rng)
    result = qdq.quantize(model, feeds_for(shapes, rng, n=8), config=qdq.QuantizeConfig(batch_size=3))
    test_feeds = feeds_for(shapes, rng)
    ref, = run_ort(model, test_feeds)
    got, = run_ort(result.model, test_feeds)
    # Two 8-bit operands per layer give about 35-40 dB on Gaussian data; 28 dB leaves room for unseen inputs
    # exceeding the calibrated range (and for the two layers of the residual block).
    assert sqnr_db(ref, got) > 28, f"{case}: SQNR {sqnr_db(ref, got):.1f} dB"


def test_two_activation_matmul_quantizes_both_operands_per_tensor(rng):
    model = parse(MATMUL_ACTIVATIONS)
    data = {"q": rng.normal(0, 1, (4, 24, 16)).astype(np.float32),
            "k": rng.normal(0, 2, (4, 16, 24)).astype(np.float32)}
    out = qdq.quantize(model, data, config=qdq.QuantizeConfig(method="max", batch_size=2)).model
    matmul, = nodes_by_op(out, "MatMul")
    for index, name in enumerate(("q", "k")):
        dq = dq_input(out, matmul, index)
        assert initializer(out, dq.input[1]) == np.float32(np.abs(data[name]).max() / INT8.qmax)


def test_residual_tensor_shared_by_two_consumers_gets_one_pair(rng):
    model = parse(RESIDUAL, rng)
    out = qdq.quantize(model, feeds_for({"x": (2, 16, 6, 6)}, rng)).model
    quantizers_of_x = [q for q in nodes_by_op(out, "QuantizeLinear") if q.input[0] == "x"]
    assert len(quantizers_of_x) == 1, "x feeds the first Conv and the residual Add through one pair"
    add, = nodes_by_op(out, "Add")
    first_conv = next(n for n in nodes_by_op(out, "Conv") if "a" in n.output)
    assert add.input[1] == first_conv.input[0] == "x_dequantized"
    assert producers(out)[add.input[0]].op_type == "Conv", "the Conv branch stays float to fuse with the Add"


def test_weights_as_float_qdq_match_int8_storage(rng):
    model = parse(CONV, rng)
    data = feeds_for({"x": (4, 4, 8, 8)}, rng)
    as_int8 = qdq.quantize(model, data).model
    as_float = qdq.quantize(model, data, config=qdq.QuantizeConfig(weights="float")).model
    conv, = nodes_by_op(as_float, "Conv")
    weight_q = producers(as_float)[dq_input(as_float, conv, 1).input[0]]
    assert weight_q.op_type == "QuantizeLinear" and weight_q.input[0] == "w"
    feeds = feeds_for({"x": (2, 4, 8, 8)}, rng)
    np.testing.assert_allclose(run_ort(as_int8, feeds)[0], run_ort(as_float, feeds)[0], rtol=0, atol=1e-5)


def test_per_tensor_weights_option(rng):
    model = parse(CONV, rng)
    out = qdq.quantize(model, feeds_for({"x": (4, 4, 8, 8)}, rng), config=qdq.QuantizeConfig(per_channel=False)).model
    conv, = nodes_by_op(out, "Conv")
    weight_dq = dq_input(out, conv, 1)
    assert initializer(out, weight_dq.input[1]).shape == ()
    assert not [a for a in weight_dq.attribute if a.name == "axis"]


def test_per_channel_weight_scales_are_channel_amax_over_127(rng):
    model = parse(CONV, rng)
    out = qdq.quantize(model, feeds_for({"x": (4, 4, 8, 8)}, rng)).model
    conv, = nodes_by_op(out, "Conv")
    weight_dq = dq_input(out, conv, 1)
    w = initializer(model, "w")
    expected = (np.abs(w).max(axis=(1, 2, 3)).astype(np.float64) / INT8.qmax).astype(np.float32)
    np.testing.assert_array_equal(initializer(out, weight_dq.input[1]), expected)
    np.testing.assert_array_equal(initializer(out, weight_dq.input[2]), np.zeros(16, np.int8))
    q = initializer(out, weight_dq.input[0])
    assert np.abs(q).max() == 127, "each channel's largest weight maps to ±127"


def test_inputs_and_outputs_keep_their_float_types(rng):
    model = parse(GEMM, rng)
    out = qdq.quantize(model, feeds_for({"x": (4, 16)}, rng)).model
    assert [(i.name, i.type) for i in out.graph.input] == [(i.name, i.type) for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert out.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert producers(out)["y"].op_type == "Gemm", "no Q/DQ on graph outputs"


def test_node_names_and_docs_read_well_in_netron(rng):
    model = parse(CONV, rng)
    out = qdq.quantize(model, feeds_for({"x": (4, 4, 8, 8)}, rng)).model
    names = [n.name for n in out.graph.node]
    assert len(names) == len(set(names)) and all(names)
    q, = nodes_by_op(out, "QuantizeLinear")
    method = QuantizeConfig().method
    assert q.name == "x_QuantizeLinear" and "amax=" in q.doc_string and f"({method}" in q.doc_string, q.doc_string
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["qdq.version"] == qdq.__version__ and f'"method":"{method}"' in meta["qdq.options"]


def test_caller_model_is_not_modified(rng):
    model = parse(CONV, rng)
    before = model.SerializeToString()
    qdq.quantize(model, feeds_for({"x": (4, 4, 8, 8)}, rng))
    assert model.SerializeToString() == before


def test_low_opset_is_upgraded_for_per_channel_axis(rng):
    model = parse(CONV.replace('"" : 13', '"" : 11').replace("ir_version: 8", "ir_version: 6"), rng)
    result = qdq.quantize(model, feeds_for({"x": (4, 4, 8, 8)}, rng))
    assert result.model.opset_import[0].version == 13
    assert any("opset raised from 11 to 13" in note for note in result.report.notes)


def test_integer_matmul_is_left_alone(rng):
    model = parse(HEADER + """
    imm (int32[N, 4] a, int32[4, 3] b) => (int32[N, 3] y) { y = MatMul (a, b) }""")
    result = qdq.quantize(model, [{"a": np.ones((2, 4), np.int32), "b": np.ones((4, 3), np.int32)}])
    assert not nodes_by_op(result.model, "QuantizeLinear")
    decision, = result.plan.decisions
    assert not decision.quantized and "not float32" in decision.reason
