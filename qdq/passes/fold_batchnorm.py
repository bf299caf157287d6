"""Fold BatchNormalization into the Conv, ConvTranspose or Gemm before it: weights are quantized as TensorRT sees them.

TensorRT folds BatchNorm into the preceding convolution before it quantizes the weights; computing per-channel
scales on the unfolded weights would give scales TensorRT never uses (and no Q/DQ may sit between them anyway).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdq.graph import export_model, import_graph, is_constant
from qdq.ops import BATCHNORM_FOLD_TARGETS
from qdq.passes.base import Pass, PassResult


class FoldBatchNorm(Pass):
    """``y = γ·(conv(x) − μ)/√(σ² + ε) + β`` becomes a conv with scaled weights and a new bias.

    Applies when the BatchNorm is in inference mode with constant parameters, its input is produced by a
    Conv/ConvTranspose (group 1)/Gemm with constant weights, and nothing else reads that input.
    """

    name = "fold-batchnorm"
    in_place = False

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        outputs = {t.name for t in graph.outputs}
        folded = 0
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            producer = foldable_producer(bn, outputs)
            if producer is None:
                continue
            fold(producer, bn)
            folded += 1
        if not folded:
            return PassResult(model, modified=False)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(export_model(graph, like=model), modified=True,
                          notes=(f"folded {folded} BatchNormalization nodes into the layer before them",))


def foldable_producer(bn: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    if len(bn.outputs) != 1 or int(bn.attrs.get("training_mode", 0)) or not all(map(is_constant, bn.inputs[1:5])):
        return None
    x = bn.inputs[0]
    if not x.inputs or len(x.outputs) != 1 or x.name in graph_outputs:
        return None
    producer = x.inputs[0]
    if producer.op not in BATCHNORM_FOLD_TARGETS or not is_constant(producer.inputs[1]):
        return None
    if len(producer.inputs) > 2 and not is_constant(producer.inputs[2]):
        return None
    if producer.op == "ConvTranspose" and int(producer.attrs.get("group", 1)) != 1:
        return None
    if producer.op == "Gemm" and (float(producer.attrs.get("alpha", 1.0)) != 1.0 or float(producer.attrs.get(
            "beta", 1.0)) != 1.0):
        return None
    return producer


def fold(producer: gs.Node, bn: gs.Node) -> None:
    gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
    eps = float(bn.attrs.get("epsilon", 1e-5))
    factor = gamma / np.sqrt(var + eps)
    weight = producer.inputs[1].values.astype(np.float64)
    channels = len(factor)
    bias = producer.inputs[2].values.astype(np.float64) if len(producer.inputs) > 2 else np.zeros(channels)
    if producer.op == "Conv":
        weight = weight * factor.reshape(-1, *[1] * (weight.ndim - 1))
    elif producer.op == "ConvTranspose":
        weight = weight * factor.reshape(1, -1, *[1] * (weight.ndim - 2))
    elif int(producer.attrs.get("transB", 0)):
        weight = weight * factor[:, None]
    else:
        weight = weight * factor[None, :]
    bias = np.broadcast_to(bias, (channels,))
    new_bias = (bias - mean) * factor + beta
    dtype = producer.inputs[1].values.dtype
    name = producer.name or producer.outputs[0].name
    producer.inputs[1] = gs.Constant(f"{producer.inputs[1].name}_bnfolded", weight.astype(dtype))
    bias_tensor = gs.Constant(f"{name}_bias_bnfolded", new_bias.astype(dtype))
    if len(producer.inputs) > 2:
        producer.inputs[2] = bias_tensor
    else:
        producer.inputs.append(bias_tensor)
    result = bn.outputs[0]
    bn.outputs.clear()
    producer.outputs[0] = result
