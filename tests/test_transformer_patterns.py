"""Patterns of real transformer exports (the corpus's BERT, GPT-2, T5 and Whisper), each as a tiny hand-written graph:
masks filled with float32's lowest value, the NaN guard the dynamo exporter puts after Softmax, ONNX's Attention op.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import parse, run_ort, sqnr_db

import qdq
from qdq.runtime import quantized_session

FP16, FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


# Attention whose mask is made as transformers does (Where(mask, 0, float32 lowest)) and, as in T5, added to a
# position bias before the scores:
#   mask -> Cast(bool) -> Unsqueeze -> Where(., 0, -3.4e38) -> Add(bias) -> Add(scores) -> Softmax -> MatMul(., x)
MASKED_ATTENTION = """
<ir_version: 8, opset_import: ["" : 13]>
masked (float[N, 16, 32] x, int64[N, 16] mask) => (float[N, 16, 32] y)
<float[32, 32] wq = {0.0}, float[16, 16] bias = {0.0}, float zero = {0.0}, float lowest = {-3.4028235e38},
 int64[1] axis1 = {1}>
{
    q = MatMul(x, wq)
    kt = Transpose<perm = [0, 2, 1]>(x)
    scores = MatMul(q, kt)
    keep = Cast<to = 9>(mask)
    keep3 = Unsqueeze(keep, axis1)
    additive = Where(keep3, zero, lowest)
    with_bias = Add(additive, bias)
    logits = Add(scores, with_bias)
    probs = Softmax<axis = -1>(logits)
    y = MatMul(probs, x)
}
"""


def masked_data(rng: np.random.Generator, count: int = 8) -> dict[str, np.ndarray]:
    lengths = rng.integers(4, 17, size=count)
    lengths[1] = 0  # a fully padded sample: every row of its scores is masked
    mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": rng.standard_normal((count, 16, 32)).astype(np.float32), "mask": mask}


def test_fp16_keeps_float32_lowest_mask_fill_in_fp32(rng):
    """float32's lowest value (-3.4e38) is -inf in FP16: a fully masked row's Softmax would become NaN.

    Before the fix, --high-precision fp16 cast the Where's fill to FP16 (numpy warned of the overflow) and the
    output fell to -5.5 dB against float (31 dB with the FP32 rest): every node carrying the fill up to the
    Softmax must stay FP32.
    """
    model = parse(MASKED_ATTENTION, rng, weight_scale=0.2)
    data = masked_data(rng)
    want = run_ort(model, data)[0]
    assert np.isfinite(want).all()
    with np.errstate(over="raise"):  # no float16 overflow while converting constants
        fp16 = qdq.quantize(model, data, config=qdq.QuantizeConfig(high_precision="fp16"))
    fp32 = qdq.quantize(model, data)
    got16 = quantized_session(fp16.model).run(None, data)[0]
    got32 = quantized_session(fp32.model).run(None, data)[0]
    assert np.isfinite(got16).all(), "NaN or inf in the FP16 model's output"
    # FP16 costs a little against the FP32 rest (measured 0.1 dB here); a NaN row would cost everything.
    assert sqnr_db(want, got16) > sqnr_db(want, got32) - 3.0, (sqnr_db(want, got16), sqnr_db(want, got32))
    inferred = onnx.shape_inference.infer_shapes(fp16.model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert types["additive"] == FP32 and types["with_bias"] == FP32, "the mask path must stay FP32"
    assert types["q"] == FP16, "the rest still runs in FP16"


# The dynamo exporter's scaled-dot-product attention: a NaN guard (IsNaN + Where) between Softmax and ·V, for
# rows the mask hides completely. The MatMul after it is still attention·V.
NAN_GUARD = """
<ir_version: 8, opset_import: ["" : 18]>
guarded (float[N, SEQ, 32] x) => (float[N, SEQ, 32] y)
<float zero = {0.0}>
{
    kt = Transpose<perm = [0, 2, 1]>(x)
    scores = MatMul(x, kt)
    probs = Softmax<axis = -1>(scores)
    nan = IsNaN(probs)
    safe = Where(nan, zero, probs)
    y = MatMul(safe, x)
}
"""


@pytest.mark.parametrize("sequence, quantized", [(64, True), (1024, False)])
def test_attention_v_behind_the_nan_guard(sequence, quantized):
    text = NAN_GUARD.replace("SEQ", str(sequence))
    model = parse(text)
    plan = qdq.explain(model)
    matmul = next(d for d in plan.decisions if d.node == "MatMul_y")
    assert "attention·V" in matmul.reason, matmul.reason
    assert matmul.quantized is quantized, f"{matmul.node}: {matmul.reason}"
    if not quantized:
        assert f"sequence of {sequence} > 512" in matmul.reason


# ONNX's Attention op (opset 23 on; torch's dynamo exporter writes it for scaled_dot_product_attention): its
# products run inside the op, so placement quantizes the projections around it and says why it stays float.
ATTENTION_OP = """
<ir_version: 10, opset_import: ["" : 23]>
attention (float[N, 16, 32] x) => (float[N, 16, 32] y)
<float[32, 32] wq = {0.0}, float[32, 32] wk = {0.0}, float[32, 32] wv = {0.0}, float[32, 32] wo = {0.0}>
{
    q = MatMul(x, wq)
    k = MatMul(x, wk)
    v = MatMul(x, wv)
    a = Attention<q_num_heads = 4, kv_num_heads = 4>(q, k, v)
    y = MatMul(a, wo)
}
"""


def test_attention_op_stays_float_with_its_reason(rng):
    model = parse(ATTENTION_OP, rng, weight_scale=0.2)
    plan = qdq.explain(model)
    op = next(d for d in plan.decisions if d.op == "Attention")
    assert not op.quantized and op.rule == "attention", op
    assert "inside the op" in op.reason
    assert sum(d.quantized for d in plan.decisions if d.op == "MatMul") == 4
    data = {"x": rng.standard_normal((4, 16, 32)).astype(np.float32)}
    result = qdq.quantize(model, data, evaluation_data=data)
    # Four INT8 projections around a float attention; measured 37 dB.
    assert result.report.comparison.outputs[0].sqnr_db > 30


# ONNX's RMSNormalization (opset 23; Llama/T5's norm as one op, as graph optimizers fuse it): a normalisation like
# LayerNormalization. The residual Add before it stays float, and --high-precision fp16 keeps it FP32.
RMS_NORM = """
<ir_version: 10, opset_import: ["" : 23]>
rms (float[N, 16, 64] x) => (float[N, 16, 64] y)
<float[64, 64] w1 = {0.0}, float[64, 64] w2 = {0.0}, float[64] gamma = {0.0}>
{
    h = MatMul(x, w1)
    s = Add(h, x)
    n = RMSNormalization<axis = -1>(s, gamma)
    y = MatMul(n, w2)
}
"""


def test_rms_normalization_op_is_a_normalisation(rng):
    model = parse(RMS_NORM, rng, weight_scale=0.15)
    plan = qdq.explain(model)
    norm = next(d for d in plan.decisions if d.op == "RMSNormalization")
    residual = next(d for d in plan.decisions if d.op == "Add")
    assert norm.rule == "float-region" and not norm.quantized, norm
    assert residual.rule == "float-region" and not residual.quantized, residual
    data = {"x": rng.standard_normal((4, 16, 64)).astype(np.float32)}
    fp16 = qdq.quantize(model, data, config=qdq.QuantizeConfig(high_precision="fp16"))
    inferred = onnx.shape_inference.infer_shapes(fp16.model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    node = next(n for n in fp16.model.graph.node if n.op_type == "RMSNormalization")
    assert types[node.input[0]] == FP32 and types[node.output[0]] == FP32, "RMSNormalization must run in FP32"


# Swin's shifted-window mask: region ids compared (Sub, then Equal with 0.0) into a -100 additive mask. Equal's
# two inputs share one type (its output is bool): under --high-precision fp16 both must change together.
SHIFTED_WINDOW_MASK = """
<ir_version: 8, opset_import: ["" : 17]>
swin (float[N, 16, 32] x, float[N, 16] region) => (float[N, 16, 32] y)
<float[32, 32] wq = {0.0}, float zero = {0.0}, float fill = {-100.0}, int64[1] ax1 = {1}, int64[1] ax2 = {2}>
{
    q = MatMul(x, wq)
    kt = Transpose<perm = [0, 2, 1]>(x)
    scores = MatMul(q, kt)
    ra = Unsqueeze(region, ax1)
    rb = Unsqueeze(region, ax2)
    diff = Sub(rb, ra)
    same = Equal(diff, zero)
    mask = Where(same, zero, fill)
    logits = Add(scores, mask)
    probs = Softmax<axis = -1>(logits)
    y = MatMul(probs, x)
}
"""


def test_fp16_comparison_inputs_share_their_type(rng):
    """Before the fix Equal's constant stayed float32 next to an FP16 difference: the checker refused the
    output ("B has inconsistent type") and quantize failed on a Swin export."""
    model = parse(SHIFTED_WINDOW_MASK, rng, weight_scale=0.2)
    data = {"x": rng.standard_normal((8, 16, 32)).astype(np.float32),
            "region": np.repeat(rng.integers(0, 4, (8, 4)), 4, axis=1).astype(np.float32)}
    want = run_ort(model, data)[0]
    fp16 = qdq.quantize(model, data, config=qdq.QuantizeConfig(high_precision="fp16"))
    fp32 = qdq.quantize(model, data)
    got16 = quantized_session(fp16.model).run(None, data)[0]
    got32 = quantized_session(fp32.model).run(None, data)[0]
    # FP16 costs a little against the FP32 rest (measured 0.1 dB here).
    assert sqnr_db(want, got16) > sqnr_db(want, got32) - 3.0, (sqnr_db(want, got16), sqnr_db(want, got32))
