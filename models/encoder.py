"""A BERT-style transformer encoder built with onnx.helper: for tests and benchmarks (no exporter needed).

Integer inputs (``input_ids``, ``attention_mask``), embeddings by Gather, the additive attention mask, multi-head
attention with Q·Kᵀ and attention·V MatMuls, Softmax, LayerNormalization, GELU written out with Erf (as
exporters do), residual Adds. Random weights, seeded.

    python models/encoder.py out.onnx [--layers 4 --hidden 256 --heads 4 --seq 128]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.inits, self.count = rng, [], [], 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> str:
        return self.const(name, self.rng.normal(0, std, shape).astype(np.float32))

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def build_encoder(*, layers: int = 2, hidden: int = 64, heads: int = 4, seq: int = 16, ffn: int | None = None,
                  vocab: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """An encoder with a dynamic batch axis and a fixed sequence length ``seq``."""
    ffn = ffn or 4 * hidden
    head = hidden // heads
    b = _Builder(np.random.default_rng(seed))

    emb = b.op("Gather", [b.weight("word_embeddings", (vocab, hidden), 0.5), "input_ids"], "embeddings/word")
    x = b.op("Add", [emb, b.weight("position_embeddings", (seq, hidden), 0.5)], "embeddings/add_position")
    x = b.op("LayerNormalization", [x, b.const("embeddings/ln_gamma", np.ones(hidden, np.float32)),
                                    b.const("embeddings/ln_beta", np.zeros(hidden, np.float32))],
             "embeddings/LayerNorm", axis=-1, epsilon=1e-12)
    mask = b.op("Cast", ["attention_mask"], "mask/cast", to=TensorProto.FLOAT)
    mask = b.op("Sub", [b.const("mask/one", np.float32(1.0)), mask], "mask/invert")
    mask = b.op("Mul", [mask, b.const("mask/big", np.float32(-10000.0))], "mask/scale")
    mask = b.op("Unsqueeze", [mask, b.const("mask/axes", np.array([1, 2], np.int64))], "mask/unsqueeze")
    split = b.const("shape/heads", np.array([0, seq, heads, head], np.int64))
    merge = b.const("shape/merge", np.array([0, seq, hidden], np.int64))

    def dense(x: str, prefix: str, n_in: int, n_out: int) -> str:
        y = b.op("MatMul", [x, b.weight(f"{prefix}/weight", (n_in, n_out), 1 / math.sqrt(n_in))], f"{prefix}/MatMul")
        return b.op("Add", [y, b.weight(f"{prefix}/bias", (n_out,), 0.02)], f"{prefix}/Add")

    def layer_norm(x: str, prefix: str) -> str:
        return b.op("LayerNormalization", [x, b.const(f"{prefix}/gamma", np.ones(hidden, np.float32)),
                                           b.const(f"{prefix}/beta", np.zeros(hidden, np.float32))],
                    f"{prefix}/LayerNorm", axis=-1, epsilon=1e-12)

    for i in range(layers):
        p = f"layer{i}"
        q, k, v = (b.op("Reshape", [dense(x, f"{p}/attention/{t}", hidden, hidden), split], f"{p}/attention/{t}/split")
                   for t in ("query", "key", "value"))
        q = b.op("Transpose", [q], f"{p}/attention/query/transpose", perm=[0, 2, 1, 3])
        k = b.op("Transpose", [k], f"{p}/attention/key/transpose", perm=[0, 2, 3, 1])
        v = b.op("Transpose", [v], f"{p}/attention/value/transpose", perm=[0, 2, 1, 3])
        scores = b.op("MatMul", [q, k], f"{p}/attention/scores/MatMul")
        scores = b.op("Mul", [scores, b.const(f"{p}/attention/scale", np.float32(1 / math.sqrt(head)))],
                      f"{p}/attention/scores/scale")
        scores = b.op("Add", [scores, mask], f"{p}/attention/scores/mask")
        probs = b.op("Softmax", [scores], f"{p}/attention/Softmax", axis=-1)
        context = b.op("MatMul", [probs, v], f"{p}/attention/context/MatMul")
        context = b.op("Transpose", [context], f"{p}/attention/context/transpose", perm=[0, 2, 1, 3])
        context = b.op("Reshape", [context, merge], f"{p}/attention/context/merge")
        attended = dense(context, f"{p}/attention/output", hidden, hidden)
        x = layer_norm(b.op("Add", [attended, x], f"{p}/attention/residual"), f"{p}/attention/output")
        h = dense(x, f"{p}/intermediate", hidden, ffn)
        erf = b.op("Erf", [b.op("Div", [h, b.const(f"{p}/gelu/sqrt2", np.float32(math.sqrt(2)))],
                                f"{p}/gelu/div")], f"{p}/gelu/Erf")
        erf = b.op("Add", [erf, b.const(f"{p}/gelu/one", np.float32(1.0))], f"{p}/gelu/add")
        h = b.op("Mul", [b.op("Mul", [h, erf], f"{p}/gelu/mul"), b.const(f"{p}/gelu/half", np.float32(0.5))],
                 f"{p}/gelu/half_mul")
        out = dense(h, f"{p}/output", ffn, hidden)
        x = layer_norm(b.op("Add", [out, x], f"{p}/output/residual"), f"{p}/output")

    graph = helper.make_graph(
        b.nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", seq, hidden])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qdq-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def encoder_inputs(n: int, seq: int, *, vocab: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids and a padding mask (a random number of padded positions at the end of each sequence)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (n, seq), dtype=np.int64)
    lengths = rng.integers(seq // 2, seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    model = build_encoder(layers=args.layers, hidden=args.hidden, heads=args.heads, seq=args.seq)
    onnx.save(model, args.output)


if __name__ == "__main__":
    main()
