"""ONNX op types grouped by what they mean to quantization: the one place these sets are written.

Every module that asks "is this a weighted layer / a copy / a normalisation" imports from here; a set that two
modules need with different meanings gets two names, each saying which question it answers.
"""

from __future__ import annotations

# Layers with a weight whose INT8 kernels TensorRT fuses the input DequantizeLinears into.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Weighted layers a following inference BatchNormalization folds into (a per-output-channel affine on a constant
# weight). MatMul is left out: its weight may be an activation, and exporters put BatchNorm after a MatMul only
# behind a Reshape, which the fold does not look through.
BATCHNORM_FOLD_TARGETS = frozenset({"Conv", "ConvTranspose", "Gemm"})

# Ops whose output holds exactly the values of their data input (input 0) in another layout: same multiset of
# values, so the same amax. A range file's missing tensor made by one of these takes its input's range.
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "DepthToSpace",
                         "SpaceToDepth"})
# Ops that move, select or repeat values without computing new ones. Q/DQ commutes with them (TensorRT moves Q
# backward and DQ forward through them), so a quantized neighbour through them is a quantized neighbour. They are
# not all range-preserving (Slice/Gather select, Pad adds its constant): ranges use RESHAPE_OPS.
COPY_OPS = RESHAPE_OPS | frozenset({"Slice", "Gather", "Split", "Expand", "Tile", "Pad"})

POOLING_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})

# Ops whose output is never negative, whatever their input (NaN aside). Clip is one when its min is >= 0.
NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Softplus", "Abs", "Exp", "Sqrt",
                             "ReduceL1", "ReduceL2", "ReduceSumSquare"})
# Ops whose every output value is one of their inputs' values or an average of them: nonnegative inputs give a
# nonnegative output. (Pad adds a constant and Resize may interpolate cubically: not here.)
SIGN_KEEPING_OPS = COPY_OPS - {"Pad"} | POOLING_OPS | frozenset({"Concat", "ReduceMax", "ReduceMin", "ReduceMean"})

# Binary arithmetic: what a decomposed LayerNorm (x - mean, var + eps, / std, * gamma + beta) and GELU are made of.
ARITHMETIC_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
ACTIVATION_OPS = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid"})
# One output value per input value (or pair): the ops placement walks through to find a float region or a Softmax.
ELEMENTWISE_OPS = ARITHMETIC_OPS | ACTIVATION_OPS | frozenset({"Where", "Cast"})

SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
# Whole attention in one op: ONNX's Attention (opset 23 on, what torch's dynamo exporter writes for
# scaled_dot_product_attention) and ONNX Runtime's fused contrib ops. Its products are inside it, not MatMuls.
FUSED_ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
# Normalisations that compute statistics of the data itself. BatchNormalization in inference is a constant
# per-channel affine (usually folded away), so it is not one: a residual Add before a pre-activation BatchNorm
# (ResNet-v2, DenseNet) must stay quantizable.
NORMALIZATION_OPS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization",
                               "SimplifiedLayerNormalization", "RMSNormalization", "LpNormalization"})
REDUCTION_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                           "ReduceLogSumExp", "ReduceSumSquare", "ReduceMax", "ReduceMin"})
# exp/log/pow/sqrt: where small relative errors grow (FP16 overflow, cancellation inside a variance).
TRANSCENDENTAL_OPS = frozenset({"Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Erf"})
# The ops whose presence marks a normalisation, GELU or Softmax computation (fused or decomposed). Placement keeps
# them and the elementwise ops near them float (quantizing them broke real models in other tools).
FLOAT_REGION_OPS = (SOFTMAX_OPS | NORMALIZATION_OPS
                    | frozenset({"Gelu", "Pow", "Sqrt", "Reciprocal", "Erf", "ReduceSumSquare", "ReduceL2"}))

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
# Recurrent layers keep their weights inside the op: there is no weight input for a Q/DQ pair to go on.
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
# Ops that make or pick values rather than transform a float activation; they keep their own precision.
GENERATOR_OPS = frozenset({"Constant", "ConstantOfShape", "Range", "RandomNormal", "RandomUniform",
                           "RandomNormalLike", "RandomUniformLike"})
# Ops whose FP16 results are fragile or which must see FP32 values: --high-precision fp16 keeps them FP32.
FP16_FRAGILE_OPS = (NORMALIZATION_OPS | SOFTMAX_OPS | REDUCTION_OPS | TRANSCENDENTAL_OPS | CONTROL_FLOW_OPS
                    | GENERATOR_OPS | frozenset({"BatchNormalization", "CumSum", "TopK", "NonMaxSuppression",
                                                 "RoiAlign"}))

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Quantized compute ops (ONNX and ONNX Runtime contrib): TensorRT parses none of them; qdq refuses their models.
QUANTIZED_COMPUTE_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "DynamicQuantizeLinear",
})
# A model holding any of these is already quantized.
ALREADY_QUANTIZED_OPS = QDQ_OPS | QUANTIZED_COMPUTE_OPS


def output_channel_axis(op: str, rank: int, *, trans_b: bool = False, group: int = 1) -> int | None:
    """[TRT] The output-channel axis of a weighted layer's constant weight (input 1), or None when it has none.

    Conv weights are ``[C_out, C_in/group, ...]``; ConvTranspose ``[C_in, C_out/group, ...]`` (with groups axis
    1 is not the output channel, so one scale); Gemm's B is ``[K, N]`` or ``[N, K]`` with transB; MatMul's
    ``[..., K, N]``.
    """
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if group == 1 else None
    if op == "Gemm":
        return 0 if trans_b else 1
    if op == "MatMul" and rank >= 2:
        return rank - 1
    return None
