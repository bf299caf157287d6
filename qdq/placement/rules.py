"""Per-node placement rules. Each looks at one node and returns a Decision with its reason, or None to pass.

Sources for each heuristic are in ../specs/placement.md; [TRT] marks documented TensorRT behaviour, [MO] a
Model Optimizer heuristic measured by NVIDIA on real models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qdq.attention import feeds_softmax, from_softmax, mask_like
from qdq.graph import GraphIndex, is_constant, producer
from qdq.ops import FUSED_ATTENTION_OPS, POOLING_OPS, WEIGHTED_OPS, output_channel_axis
from qdq.placement.graph_view import (
    SPECTRUM_COPY_OPS,
    in_float_region,
    logarithm_after,
    source_through_copies,
    spectrum,
    squared_into_spectrum,
    static_dims,
)
from qdq.placement.plan import Decision, QuantInput

MIN_GEMM_DIM = 16  # [MO] GEMMs with K or N below this gain nothing from INT8 tensor cores
MIN_CONV_CHANNELS = 16  # [MO] Convs with fewer channels on both sides, or on one side and not a multiple of 8
MAX_ATTENTION_SEQUENCE = 512  # [MO] attention MatMuls over longer sequences stay float


@dataclass(frozen=True)
class PlanContext:
    """What rules may ask about the graph and the user's options besides the node itself."""

    is_float32: Callable[[gs.Tensor], bool]
    index: GraphIndex
    graph_inputs: frozenset[str] = frozenset()
    per_channel: bool = True
    include_op_types: frozenset[str] = frozenset()


Rule = Callable[[gs.Node, PlanContext], "Decision | None"]


def decline(node: gs.Node, rule: str, reason: str) -> Decision:
    return Decision(node.name, node.op, quantized=False, rule=rule, reason=reason)


def quantize_weighted_op(node: gs.Node, ctx: PlanContext) -> Decision | None:
    """[TRT] Conv, ConvTranspose, Gemm, MatMul: Q/DQ on the activation and weight inputs.

    TensorRT fuses the DequantizeLinear on each input into the layer and runs it in INT8 only when every input
    is quantized. Outputs are left alone: TensorRT fuses an output Q when a quantized consumer follows.
    """
    if node.op not in WEIGHTED_OPS:
        return None
    operands = node.inputs[:2]
    if len(operands) < 2 or not all(ctx.is_float32(t) for t in operands):
        return decline(node, "weighted-op", "operands are not float32 (only float32 tensors are quantized)")
    if reason := spectral(node):
        return decline(node, "spectrum", reason)
    if node.op in ("Conv", "ConvTranspose"):
        if not is_constant(node.inputs[1]):
            return decline(node, "weighted-op", "non-constant weights: TensorRT needs constant weights for INT8")
        if reason := tiny_conv(node, ctx):
            return decline(node, "tiny-conv", reason)
    else:
        if reason := tiny_gemm(node):
            return decline(node, "tiny-gemm", reason)
        if not any(is_constant(t) for t in operands):
            return attention_matmul(node, ctx)
    inputs = []
    for slot, tensor in enumerate(operands):
        if is_constant(tensor):
            axis = weight_axis(node, slot, len(tensor.shape)) if ctx.per_channel else None
            inputs.append(QuantInput(tensor.name, slot, "weight", axis))
        else:
            inputs.append(QuantInput(tensor.name, slot, "activation"))
    return Decision(node.name, node.op, quantized=True, rule="weighted-op",
                    reason=f"{node.op}: INT8 when every input has Q/DQ", inputs=tuple(inputs))


def spectral(node: gs.Node) -> str | None:
    """A spectral front end stays float: a layer that reads a power or magnitude spectrum, makes one (the STFT's
    real and imaginary parts, squared and summed), or feeds a logarithm through linear ops (log-mel, CQT).

    A spectrum spans many decades within one sample, and one INT8 scale per tensor rounds its quiet bins to zero;
    a logarithm turns the absolute error INT8 leaves into large errors on quiet values. Measured on real exports
    quantized before this rule: openwakeword's log-mel front end read 7.3 dB (now float and exact), faster-whisper's
    Silero VAD 6.9 dB (now 21.3), basic-pitch's CQT front end 18.9 dB on its note output (now 38.1: its decimation
    and kernel Convs reach the logarithm through a Neg, octave Concats and a ReduceSum). These layers are a small
    share of the compute.
    """
    activation = next((t for t in node.inputs[:2] if not is_constant(t)), None)
    if activation is not None and (kind := spectrum(activation)):
        source = source_through_copies(activation, SPECTRUM_COPY_OPS)
        return (f"reads a {kind} spectrum ({source.name}): its values span many decades "
                "and one INT8 scale rounds the quiet bins to zero")
    if node.outputs and (made := squared_into_spectrum(node.outputs[0])) is not None:
        return (f"makes part of the power spectrum {made.name} (squared and summed): the quiet bins would carry "
                "INT8's error relative to the loud ones")
    if node.outputs and (log := logarithm_after(node.outputs[0])) is not None:
        return (f"feeds the logarithm {log.name} through linear ops: INT8's absolute error becomes a large error "
                "on quiet values")
    return None


def tiny_conv(node: gs.Node, ctx: PlanContext) -> str | None:
    """[MO] Too few channels for INT8 kernels to pay off, as Model Optimizer's ``find_nodes_from_convs_to_exclude``
    decides for INT8 Convs, with one difference: a Conv with fewer than 16 channels on both sides stays float even
    as the first layer (Model Optimizer keeps one that reads the model input directly with a side a multiple of 8,
    and misses one behind tf2onnx's NHWC->NCHW Transpose). Measured with benchmarks/versus.py, these float: fer's
    two 8-channel stems (behind the Transpose) +0.9 to +3.8 dB on four splits of its data, the PP-OCR classifier's
    3->8 stem and two 8->8 Convs +2.1 (+1.9 with its stem quantized), mediapipe's hand-crop stems +0.4 to +1.2.
    Fewer than 16 on one side (and any ConvTranspose): a multiple of 8, or the first layer, even behind the
    Transpose and a Rescaling. Grouped Convs with few channels per group need a kernel of at least 3 (a 1x1
    depthwise Conv is a per-channel scale) and output channels in multiples of 8.
    """
    shape = node.inputs[1].shape
    group = int(node.attrs.get("group", 1))
    if node.op == "Conv":
        out_channels, in_channels = int(shape[0]), int(shape[1]) * group
    else:
        in_channels, out_channels = int(shape[0]), int(shape[1]) * group
    kernel = [int(k) for k in shape[2:]]
    if node.op == "Conv" and group > 1 and int(shape[1]) < MIN_CONV_CHANNELS:
        size = "x".join(map(str, kernel))
        if kernel and min(kernel) < 3:
            # A depthwise 1x1 Conv is a per-channel scale and bias (tf2onnx writes a BatchNormalization it cannot
            # fold past a PReLU this way): int8 gives it nothing to speed up and its output only adds a rounding.
            what = "a per-channel scale" if int(shape[1]) == 1 and max(kernel) == 1 else "a kernel side below 3"
            return (f"grouped Conv with {int(shape[1])} input channels per group and a {size} kernel ({what}): "
                    "INT8 gains nothing")
        if out_channels % 8:
            return (f"grouped Conv with {int(shape[1])} input channels per group and {out_channels} output channels, "
                    "not a multiple of 8: INT8 kernels do not take it")
        return None
    if node.op == "Conv" and in_channels < MIN_CONV_CHANNELS and out_channels < MIN_CONV_CHANNELS:
        return (f"{in_channels} input and {out_channels} output channels, both below {MIN_CONV_CHANNELS}: too little "
                "work for INT8 to gain anything")
    if source_through_preprocessing(node.inputs[0]).name in ctx.graph_inputs:
        return None  # the first layer, even behind an NHWC->NCHW Transpose and a Rescaling (tf2onnx exports)
    small = [f"{c} {side}" for c, side in ((in_channels, "input"), (out_channels, "output"))
             if c < MIN_CONV_CHANNELS and c % 8]
    if small:
        return (f"{' and '.join(small)} channels: below {MIN_CONV_CHANNELS} and not a multiple of 8, INT8 gains "
                "nothing")
    return None


def source_through_preprocessing(tensor: gs.Tensor) -> gs.Tensor:
    """Walk back through copy ops and an input's affine preprocessing (a Mul, Add, Sub or Div by a constant, as
    Keras' Rescaling and Normalization layers export) to the tensor they start from."""
    for _ in range(16):
        tensor = source_through_copies(tensor, SPECTRUM_COPY_OPS)
        node = producer(tensor)
        if node is None or node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
            return tensor
        data = [t for t in node.inputs if not is_constant(t)]
        if len(data) != 1 or (node.op in ("Sub", "Div") and data[0] is not node.inputs[0]):
            return tensor
        tensor = data[0]
    return tensor


def gemm_dims(node: gs.Node) -> tuple[int | None, int | None, int | None]:
    """(M, K, N) of a Gemm or MatMul where the shapes tell them, else None for each unknown."""
    a, b = static_dims(node.inputs[0]), static_dims(node.inputs[1])
    if node.op == "Gemm":
        m_k = None if a is None or len(a) != 2 else (a[::-1] if int(node.attrs.get("transA", 0)) else a)
        k_n = None if b is None or len(b) != 2 else (b[::-1] if int(node.attrs.get("transB", 0)) else b)
        k = m_k[1] if m_k and m_k[1] is not None else (k_n[0] if k_n else None)
        return (m_k[0] if m_k else None, k, k_n[1] if k_n else None)
    m = None if a is None else (1 if len(a) == 1 else a[-2])
    k = a[-1] if a and a[-1] is not None else (b[-2] if b and len(b) >= 2 else None)  # the weight knows it
    n = None if b is None else (1 if len(b) == 1 else b[-1])
    return m, k, n


def tiny_gemm(node: gs.Node) -> str | None:
    """[MO] GEMV-shaped (M or N = 1) or narrow (K or N < 16) products run as fast in float.

    M counts only when it is not the batch axis (a MatMul's rows within a sample, such as one decoder step):
    a Gemm's M is the batch, which the engine's optimisation profile sets, not the graph.
    """
    m, k, n = gemm_dims(node)
    a = static_dims(node.inputs[0])
    if node.op == "Gemm" or (a is not None and len(a) == 2):
        m = None
    if m == 1 or n == 1:
        shape = ", ".join(f"{d}={v}" for d, v in (("M", m), ("N", n)) if v is not None)
        return f"GEMV-shaped ({shape}): no tensor-core gain from INT8"
    if narrow := [f"{d}={v}" for d, v in (("K", k), ("N", n)) if v is not None and v < MIN_GEMM_DIM]:
        return f"{' and '.join(narrow)} below {MIN_GEMM_DIM} (K={k}, N={n}): INT8 gains nothing"
    return None


def attention_matmul(node: gs.Node, ctx: PlanContext) -> Decision:
    """[MO] A MatMul of two activations: Q·Kᵀ or attention·V, both operands quantized unless the sequence is long."""
    scores = feeds_softmax(ctx.index, node.outputs[0].name)
    probs = next((i for i, t in enumerate(node.inputs[:2]) if from_softmax(ctx.index, t.name)), None)
    if scores is not None:
        kind, dims = "Q·Kᵀ", static_dims(node.outputs[0])
    elif probs is not None:
        kind, dims = "attention·V", static_dims(node.inputs[probs])
    else:
        kind, dims = "activation × activation", None
    sequence = dims[-1] if dims else None
    if sequence is not None and sequence > MAX_ATTENTION_SEQUENCE:
        return decline(node, "attention", f"{kind} over a sequence of {sequence} > {MAX_ATTENTION_SEQUENCE}: float")
    where = "" if sequence is None else f", sequence {sequence}"
    inputs = tuple(QuantInput(t.name, slot, "activation") for slot, t in enumerate(node.inputs[:2]))
    return Decision(node.name, node.op, quantized=True, rule="attention",
                    reason=f"{kind} MatMul: both operands{where}", inputs=inputs)


def quantize_included_op(node: gs.Node, ctx: PlanContext) -> Decision | None:
    """Ops the user asked for with --include-op-types (Add, Mul, Resize...): their float activation inputs."""
    if node.op not in ctx.include_op_types or node.op in WEIGHTED_OPS or node.op in POOLING_OPS:
        return None
    if region := in_float_region(node):
        return decline(node, "float-region", region)
    candidates = node.inputs[:1] if node.op in ("Resize", "Upsample") else node.inputs
    if any(is_constant(t) for t in candidates):
        return decline(node, "constant-input", "pointwise op with a constant input: stays float")
    if any(mask_like(ctx.index, t.name) for t in candidates):
        return decline(node, "mask", "reads a mask (integer data or huge constants): stays float")
    floats = [QuantInput(t.name, slot, "activation") for slot, t in enumerate(candidates) if ctx.is_float32(t)]
    if not floats:
        return decline(node, "included-op", "no float32 activation input")
    return Decision(node.name, node.op, quantized=True, rule="included-op",
                    reason=f"{node.op}: included by --include-op-types", inputs=tuple(floats))


def fused_attention(node: gs.Node, ctx: PlanContext) -> Decision | None:
    """A whole attention in one op (ONNX's Attention): its products run inside it, so there is no MatMul to
    quantize; the projections around it are quantized as weighted ops. Said here so that explain gives a reason."""
    if node.op not in FUSED_ATTENTION_OPS:
        return None
    return decline(node, "attention", f"{node.op} op: Q·Kᵀ, Softmax and attention·V run inside the op (TensorRT's "
                   "attention layer), no MatMul to quantize")


def control_flow(node: gs.Node, ctx: PlanContext) -> Decision | None:
    """If, Loop, Scan: nothing of theirs is quantized here; what happens to their subgraphs, said for explain."""
    if node.op == "If":
        return decline(node, "control-flow", "each branch the calibration runs take is quantized as a model of its "
                       "own (qdq.branches); a branch none takes stays float")
    if node.op in ("Loop", "Scan"):
        return decline(node, "control-flow", f"{node.op} body: stays float (a run does not split into its "
                       "iterations)")
    return None


def keep_float(node: gs.Node, ctx: PlanContext) -> Decision:
    """The fallback: ops that are not quantized by default run in float."""
    if region := in_float_region(node):
        return decline(node, "float-region", region)
    return decline(node, "default-float", "not a quantized op type by default")


def weight_axis(node: gs.Node, slot: int, rank: int) -> int | None:
    """[TRT] The output-channel axis of a constant weight, or None for per tensor."""
    if slot != 1:
        return None  # a constant first operand (A) of Gemm/MatMul has no output-channel axis
    return output_channel_axis(node.op, rank, trans_b=bool(int(node.attrs.get("transB", 0))),
                               group=int(node.attrs.get("group", 1)))


RULES: tuple[Rule, ...] = (quantize_weighted_op, quantize_included_op, fused_attention, control_flow)
