"""--high-precision fp16: the float rest in FP16, sensitive ops in FP32, INT8 layers still fed by their DQs."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import DIGITS, ROOT, parse, producers

import qdq
from qdq.check import check_model

sys.path.insert(0, str(ROOT / "models"))
from encoder import build_encoder, encoder_inputs  # noqa: E402

FP16, FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    return types


@pytest.fixture(scope="module")
def digits_fp16():
    config = qdq.QuantizeConfig(high_precision="fp16")
    return qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz", config=config,
                        evaluation_data=DIGITS / "eval.npz", labels=np.load(DIGITS / "labels.npy"))


def test_int8_layers_read_fp16_dequantize_outputs_directly(digits_fp16):
    model = digits_fp16.model
    assert model.opset_import[0].version >= 19
    types = elem_types(model)
    made_by = producers(model)
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        for index in (0, 1):
            dq = made_by[conv.input[index]]
            assert dq.op_type == "DequantizeLinear", f"{conv.name}: no Cast between DQ and the layer"
            assert types[dq.input[1]] == FP16, f"{dq.name}: FP16 scale, so the DQ output is FP16"
        assert types[conv.output[0]] == FP16


def test_graph_inputs_and_outputs_keep_float32_and_sensitive_ops_stay_fp32(digits_fp16):
    model = digits_fp16.model
    types = elem_types(model)
    assert types["image"] == FP32 and types["logits"] == FP32
    mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    assert types[mean.input[0]] == FP32 and types[mean.output[0]] == FP32


def test_fp16_model_is_checked_and_accurate(digits_fp16):
    assert [f for f in check_model(digits_fp16.model) if f.severity == "error"] == []
    comparison = digits_fp16.report.comparison
    assert comparison.outputs[0].sqnr_db > 35, comparison
    assert abs(comparison.float_accuracy - comparison.quant_accuracy) <= 0.01
    assert any("cast to FP16" in note for note in digits_fp16.report.notes)


def test_encoder_keeps_layernorm_softmax_and_gelu_in_fp32():
    model = build_encoder(layers=2, hidden=64, heads=4, seq=16)
    data = encoder_inputs(32, 16)
    fp32 = qdq.quantize(model, data, evaluation_data=data)
    fp16 = qdq.quantize(model, data, evaluation_data=data, config=qdq.QuantizeConfig(high_precision="fp16"))
    types = elem_types(fp16.model)
    for node in fp16.model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert types[node.input[0]] == FP32 and types[node.output[0]] == FP32, node.name
    matmuls = [n for n in fp16.model.graph.node if n.op_type == "MatMul"]
    assert sum(types[n.output[0]] == FP16 for n in matmuls) >= len(matmuls) - 2
    # FP16 costs a little against the FP32 rest; measured about 1 dB here.
    assert fp16.report.comparison.outputs[0].sqnr_db > fp32.report.comparison.outputs[0].sqnr_db - 6


def test_cli_option(tmp_path, capsys):
    from qdq.cli import main

    out = tmp_path / "m.onnx"
    assert main(["quantize", str(DIGITS / "digits.onnx"), "--calib", str(DIGITS / "calib.npz"), "-o", str(out),
                 "--high-precision", "fp16"]) == 0
    assert onnx.load(str(out)).opset_import[0].version >= 19


def test_inputs_the_op_types_itself_keep_their_type(rng):
    """Resize's ``scales`` is float32 whatever the data type, its ``roi`` has a type of its own: an FP16 Resize
    between INT8 convolutions (an FPN's upsampling, as YOLOv8 and DBNet exports have) must not get FP16 scales."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 16, 8, 8] x) => (float[N, 16, 16, 16] y) <float[16, 16, 3, 3] w1 = {0.0},
                                                            float[16, 16, 3, 3] w2 = {0.0}> {
            scales = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
            a = Conv <pads = [1, 1, 1, 1]> (x, w1)
            r = Relu (a)
            up = Resize <mode = "nearest"> (r, , scales)
            y = Conv <pads = [1, 1, 1, 1]> (up, w2)
        }""", rng)
    data = {"x": rng.standard_normal((8, 16, 8, 8), dtype=np.float32)}
    result = qdq.quantize(model, data, config=qdq.QuantizeConfig(high_precision="fp16"), evaluation_data=data)
    types = elem_types(result.model)
    resize = next(n for n in result.model.graph.node if n.op_type == "Resize")
    assert types[resize.input[2]] == FP32, "Resize's scales must stay float32"
    assert types[resize.input[0]] == FP16 and types[resize.output[0]] == FP16
    assert result.report.comparison.outputs[0].sqnr_db > 30, result.report.comparison
