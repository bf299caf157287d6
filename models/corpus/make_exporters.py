"""Corpus exporter variety: graphs as other exporters write them.

- ``nhwc_tf2onnx``: a Keras MobileNet-style classifier as tf2onnx writes it, built with onnx.helper: an NHWC
  input, a Transpose to NCHW before the first Conv (``auto_pad=SAME_UPPER``), BatchNormalization nodes (tf2onnx
  keeps FusedBatchNormV3 as BatchNormalization), ReLU6 as Clip with constant min/max, a residual Add, a
  Transpose back to NHWC, GlobalAveragePooling2D as ReduceMean, Dense as MatMul + Add, Softmax; TensorFlow's
  ``scope/op:0`` tensor names. Opset 13.
- ``paddle_opset11``: a PP-LCNet-style classifier with an FPN-style neck as paddle2onnx writes it at opset 11,
  built with onnx.helper: Paddle's ``conv2d_0.w_0``/``batch_norm_0.tmp_2`` names, HardSwish decomposed
  (Add, Clip, Mul, Div: HardSwish is opset 14), squeeze-excite with HardSigmoid, Resize with an empty ``roi``
  constant, Clip with its ``min`` omitted as "", MatMul + Add linears. IR version 6.
- ``multi_io``: torch's dynamo exporter (opset 18): an image and int64 token ids in, three outputs (float
  logits, an L2-normalised float embedding, an int64 ArgMax label).

Run: ``/work/venv-models/bin/python models/corpus/make_exporters.py [NAME ...]``. Seeded.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from corpus_io import (
    CALIB_SEED,
    EVAL_SEED,
    OUT,
    SAMPLES,
    export,
    he_init,
    images,
    save_data,
    settle_batchnorm,
    write_record,
)
from make_cnn import cbr
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F  # noqa: N812


class Builder:
    """Nodes and seeded initializers for a hand-built graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def he(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def batchnorm(self, x: str, channels: int, prefix: str, out: str, name: str) -> str:
        """Affine parameters random; running statistics placeholders that ``settle`` replaces from data."""
        scale = self.const(f"{prefix}.w_0" if "." not in prefix else prefix + "/gamma",
                           self.rng.uniform(0.5, 1.5, channels).astype(np.float32))
        bias = self.const(scale.replace("w_0", "b_0").replace("gamma", "beta"),
                          (self.rng.standard_normal(channels) * 0.1).astype(np.float32))
        mean = self.const(scale.replace("w_0", "w_1").replace("gamma", "moving_mean"), np.zeros(channels, np.float32))
        var = self.const(scale.replace("w_0", "w_2").replace("gamma", "moving_variance"),
                         np.ones(channels, np.float32))
        return self.node("BatchNormalization", [x, scale, bias, mean, var], out, name, epsilon=1e-3)

    def model(self, inputs, outputs, opset: int, ir_version: int, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "main", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
        model.ir_version = ir_version
        return model


def settle(model: onnx.ModelProto, data: np.ndarray, input_name: str) -> onnx.ModelProto:
    """BatchNormalization statistics from the data, layer by layer, as training would have left them."""
    inits = {i.name: i for i in model.graph.initializer}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        probe.graph.output.append(helper.make_empty_tensor_value_info(bn.input[0]))
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = session.run([bn.input[0]], {input_name: data})[0]
        inits[bn.input[3]].CopyFrom(numpy_helper.from_array(x.mean((0, 2, 3)).astype(np.float32), bn.input[3]))
        inits[bn.input[4]].CopyFrom(numpy_helper.from_array(x.var((0, 2, 3)).astype(np.float32), bn.input[4]))
    return model


def nhwc_tf2onnx(seed: int) -> onnx.ModelProto:
    b = Builder(seed)
    s = "StatefulPartitionedCall/model"
    x = b.node("Transpose", ["input_1"], f"{s}/conv1/Conv2D__6:0", f"{s}/conv1/Conv2D__6", perm=[0, 3, 1, 2])
    lo = b.const("const_fold_opt__20", np.array(0, np.float32))
    hi = b.const("const_fold_opt__21", np.array(6, np.float32))

    def conv_bn(x: str, cin: int, cout: int, k: int, stride: int, scope: str, act: str, group: int = 1, **pad):
        w = b.he(f"{s}/{scope}/Conv2D/ReadVariableOp:0", (cout, cin // group, k, k), cin // group * k * k)
        y = b.node("Conv", [x, w], f"{s}/{scope}/Conv2D:0", f"{s}/{scope}/Conv2D", strides=[stride, stride],
                   group=group, kernel_shape=[k, k], **pad)
        y = b.batchnorm(y, cout, f"{s}/{scope}_bn", f"{s}/{scope}_bn/FusedBatchNormV3:0",
                        f"{s}/{scope}_bn/FusedBatchNormV3")
        if act == "relu6":
            return b.node("Clip", [y, lo, hi], f"{s}/{scope}_relu/Relu6:0", f"{s}/{scope}_relu/Relu6")
        if act == "relu":
            return b.node("Relu", [y], f"{s}/{scope}_relu/Relu:0", f"{s}/{scope}_relu/Relu")
        return y

    x = conv_bn(x, 3, 16, 3, 2, "conv1", "relu6", auto_pad="SAME_UPPER")
    x = conv_bn(x, 16, 16, 3, 1, "conv_dw_1", "relu6", group=16, pads=[1, 1, 1, 1])
    x = conv_bn(x, 16, 32, 1, 1, "conv_pw_1", "relu6", pads=[0, 0, 0, 0])
    x = conv_bn(x, 32, 32, 3, 2, "conv_dw_2", "relu6", group=32, auto_pad="SAME_UPPER")
    y = conv_bn(x, 32, 48, 1, 1, "conv_pw_2", "relu6", pads=[0, 0, 0, 0])
    z = conv_bn(y, 48, 48, 3, 1, "block_3", "relu", pads=[1, 1, 1, 1])
    z = conv_bn(z, 48, 48, 1, 1, "block_3_project", "none", pads=[0, 0, 0, 0])
    x = b.node("Add", [y, z], f"{s}/block_3_add/add:0", f"{s}/block_3_add/add")
    x = b.node("Relu", [x], f"{s}/block_3_out/Relu:0", f"{s}/block_3_out/Relu")
    x = b.node("Transpose", [x], f"{s}/block_3_out/Relu__30:0", f"{s}/block_3_out/Relu__30", perm=[0, 2, 3, 1])
    x = b.node("ReduceMean", [x], f"{s}/global_average_pooling2d/Mean:0", f"{s}/global_average_pooling2d/Mean",
               axes=[1, 2], keepdims=0)
    for i, (k, n, act) in enumerate(((48, 64, "Relu"), (64, 20, "Softmax"))):
        w = b.he(f"{s}/dense{'_' + str(i) if i else ''}/MatMul/ReadVariableOp:0", (k, n), k)
        bias = b.const(f"{s}/dense{'_' + str(i) if i else ''}/BiasAdd/ReadVariableOp:0",
                       (b.rng.standard_normal(n) * 0.05).astype(np.float32))
        scope = f"{s}/dense{'_' + str(i) if i else ''}"
        x = b.node("MatMul", [x, w], f"{scope}/MatMul:0", f"{scope}/MatMul")
        x = b.node("Add", [x, bias], f"{scope}/BiasAdd:0", f"{scope}/BiasAdd")
        x = b.node(act, [x], "dense_1" if act == "Softmax" else f"{scope}/Relu:0", f"{scope}/{act}")
    inp = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__52", 32, 32, 3])
    out = helper.make_tensor_value_info("dense_1", TensorProto.FLOAT, ["unk__53", 20])
    model = b.model([inp], [out], 13, 8, "tf2onnx")
    return settle(model, images(seed, 32, size=(32, 32)).transpose(0, 2, 3, 1).copy(), "input_1")


def paddle_opset11(seed: int) -> onnx.ModelProto:
    b = Builder(seed)
    counter = {"conv2d": 0, "bn": 0, "hs": 0}
    three, six = b.const("fill_constant_0.tmp_0", np.array(3, np.float32)), b.const(
        "fill_constant_1.tmp_0", np.array(6, np.float32))
    zero = b.const("fill_constant_2.tmp_0", np.array(0, np.float32))

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, bias: bool = False) -> str:
        i = counter["conv2d"]
        counter["conv2d"] += 1
        w = b.he(f"conv2d_{i}.w_0", (cout, cin // group, k, k), cin // group * k * k)
        inputs = [x, w] + ([b.const(f"conv2d_{i}.b_0", (b.rng.standard_normal(cout) * 0.05).astype(np.float32))]
                           if bias else [])
        return b.node("Conv", inputs, f"conv2d_{i}.tmp_{1 if bias else 0}", f"conv2d_{i}", strides=[stride] * 2,
                      pads=[k // 2] * 4, group=group, kernel_shape=[k, k], dilations=[1, 1])

    def bn(x: str, c: int) -> str:
        i = counter["bn"]
        counter["bn"] += 1
        return b.batchnorm(x, c, f"batch_norm_{i}", f"batch_norm_{i}.tmp_2", f"batch_norm_{i}")

    def hardswish(x: str) -> str:
        i = counter["hs"]
        counter["hs"] += 1
        y = b.node("Add", [x, three], f"hardswish_{i}.add", f"p2o.Add.{i}")
        y = b.node("Clip", [y, zero, six], f"hardswish_{i}.clip", f"p2o.Clip.{i}")
        y = b.node("Mul", [x, y], f"hardswish_{i}.mul", f"p2o.Mul.{i}")
        return b.node("Div", [y, six], f"hardswish_{i}.tmp_0", f"p2o.Div.{i}")

    x = hardswish(bn(conv("x", 3, 16, 3, 2), 16))                      # 16 x 16
    c2 = hardswish(bn(conv(x, 16, 16, 3, 1, group=16), 16))
    x = hardswish(bn(conv(c2, 16, 32, 1), 32))
    x = hardswish(bn(conv(x, 32, 32, 3, 2, group=32), 32))              # 8 x 8
    pooled = b.node("GlobalAveragePool", [x], "pool2d_0.tmp_0", "p2o.GlobalAveragePool.0")
    gate = b.node("Relu", [conv(pooled, 32, 8, 1, bias=True)], "relu_0.tmp_0", "p2o.Relu.0")
    gate = b.node("HardSigmoid", [conv(gate, 8, 32, 1, bias=True)], "hardsigmoid_0.tmp_0", "p2o.HardSigmoid.0",
                  alpha=0.1666667, beta=0.5)
    x = b.node("Mul", [x, gate], "elementwise_mul_0", "p2o.Mul.se")
    c3 = hardswish(bn(conv(x, 32, 48, 1), 48))
    roi = b.const("p2o.Resize.roi", np.array([], np.float32))
    scales = b.const("p2o.Resize.scales", np.array([1, 1, 2, 2], np.float32))
    up = b.node("Resize", [conv(c3, 48, 32, 1), roi, scales], "nearest_interp_v2_0.tmp_0", "p2o.Resize.0",
                mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    x = b.node("Add", [conv(c2, 16, 32, 1), up], "elementwise_add_0", "p2o.Add.neck")
    x = b.node("Relu", [bn(conv(x, 32, 32, 3), 32)], "relu_1.tmp_0", "p2o.Relu.1")
    x = b.node("GlobalAveragePool", [x], "pool2d_1.tmp_0", "p2o.GlobalAveragePool.1")
    x = b.node("Flatten", [x], "flatten_0.tmp_0", "p2o.Flatten.0", axis=1)
    for i, (k, n) in enumerate(((32, 64), (64, 20))):
        x = b.node("MatMul", [x, b.he(f"linear_{i}.w_0", (k, n), k)], f"linear_{i}.tmp_0", f"p2o.MatMul.{i}")
        x = b.node("Add", [x, b.const(f"linear_{i}.b_0", (b.rng.standard_normal(n) * 0.05).astype(np.float32))],
                   f"linear_{i}.tmp_1", f"p2o.Add.linear{i}")
        if i == 0:  # a clipped activation with its min omitted: Clip(x, "", max)
            x = b.node("Clip", [b.node("Relu", [x], "relu_2.tmp_0", "p2o.Relu.2"), "", six], "clip_0.tmp_0",
                       "p2o.Clip.head")
    b.node("Softmax", [x], "save_infer_model/scale_0.tmp_0", "p2o.Softmax.0", axis=-1)
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 32, 32])
    out = helper.make_tensor_value_info("save_infer_model/scale_0.tmp_0", TensorProto.FLOAT, [-1, 20])
    model = b.model([inp], [out], 11, 6, "PaddlePaddle")
    return settle(model, images(seed, 32, size=(32, 32)), "x")


class MultiIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cnn = nn.Sequential(cbr(3, 16, 3, 2), cbr(16, 32, 3, 2), cbr(32, 32, 3, 1))
        self.embed = nn.Embedding(100, 32)
        self.mix = nn.Linear(64, 64)
        self.head, self.project = nn.Linear(64, 20), nn.Linear(64, 32)

    def forward(self, image, token_ids):
        visual = self.cnn(image).mean((2, 3))
        text = self.embed(token_ids).mean(1)
        h = F.relu(self.mix(torch.cat((visual, text), 1)))
        logits = self.head(h)
        return logits, F.normalize(self.project(h), dim=1), logits.argmax(1)


def tokens(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 100, (n, 8), dtype=np.int64)


def make(name: str) -> None:
    seed = sum(map(ord, name))
    if name == "multi_io":
        torch.manual_seed(seed)
        model = MultiIO()
        he_init(model, seed)
        with torch.no_grad():
            model.embed.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
        settle_batchnorm(model, [(torch.from_numpy(images(seed + i, 16, size=(32, 32))),
                                  torch.from_numpy(tokens(seed + i, 16))) for i in range(4)])
        export(model, (torch.from_numpy(images(0, 2, size=(32, 32))), torch.from_numpy(tokens(0, 2))), name,
               opset=18, dynamo=True, input_names=["image", "token_ids"], output_names=["logits", "features", "label"],
               batch_axes={"image": 0, "token_ids": 0, "logits": 0, "features": 0, "label": 0})
        save_data(name, {"image": images(CALIB_SEED, SAMPLES, size=(32, 32)), "token_ids": tokens(CALIB_SEED, SAMPLES)},
                  {"image": images(EVAL_SEED, SAMPLES, size=(32, 32)), "token_ids": tokens(EVAL_SEED, SAMPLES)})
        write_record(name, family="exporter", exporter="torch.onnx dynamo", weights=f"random (seed {seed}, He init)",
                     imitates="a two-input, three-output model: float image and int64 token ids in (Gather "
                     "embedding); float logits, L2-normalised embedding and int64 ArgMax out")
        return
    build, imitates, exporter, input_name = {
        "nhwc_tf2onnx": (nhwc_tf2onnx, "tf2onnx export of a Keras MobileNet-style model (NHWC input, Transpose "
                         "before the first Conv, BatchNormalization, Clip ReLU6, ReduceMean, MatMul + Add)",
                         "hand-built (tf2onnx-style)", "input_1"),
        "paddle_opset11": (paddle_opset11, "paddle2onnx opset-11 export of a PP-LCNet-style model with a neck "
                           "(decomposed HardSwish, SE with HardSigmoid, Resize with empty roi, Clip with min "
                           "omitted as \"\", MatMul + Add)", "hand-built (paddle2onnx-style)", "x"),
    }[name]
    model = build(seed)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(OUT / f"{name}.onnx"))

    def data(s: int) -> np.ndarray:
        x = images(s, SAMPLES, size=(32, 32))
        return x.transpose(0, 2, 3, 1).copy() if name == "nhwc_tf2onnx" else x
    save_data(name, {input_name: data(CALIB_SEED)}, {input_name: data(EVAL_SEED)})
    write_record(name, family="exporter", imitates=imitates, exporter=exporter,
                 weights=f"random (seed {seed}, He init, BatchNorm statistics from 32 images)")


if __name__ == "__main__":
    for arg in sys.argv[1:] or ("nhwc_tf2onnx", "paddle_opset11", "multi_io"):
        make(arg)
        print("wrote", arg)
