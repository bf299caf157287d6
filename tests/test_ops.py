"""The op taxonomy, the graph index and the one attention-mask test that placement and the FP16 pass share."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import parse

from qdq import ops
from qdq.attention import is_mask_add
from qdq.graph import GraphIndex, sort_nodes
from qdq.passes.high_precision import wants_fp16
from qdq.placement import plan_quantization

QDQ_SOURCE = Path(__file__).resolve().parent.parent / "qdq"

# x ─ MatMul(scores) ─ Add(mask) ─ Softmax       the mask Add is fed by a Cast of integer data
#      └───────── Add(residual) ─ Relu           the residual Add by two float activations
ATTENTION = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 16, 16] x, int64[2, 1, 16] ids) => (float[2, 16, 16] p, float[2, 16, 16] r) <float[16, 16] w = {0.0}> {
    s = MatMul(x, w)
    m = Cast<to = 1>(ids)
    bias = Constant<value = float[1] {-10000.0}>()
    mb = Mul(m, bias)
    masked = Add(s, mb)
    p = Softmax<axis = -1>(masked)
    t = Relu(s)
    sum = Add(t, x)
    r = Relu(sum)
}
"""


def test_sets_that_answer_nested_questions_are_nested():
    assert ops.RESHAPE_OPS < ops.COPY_OPS, "a range-preserving reshape must also commute with Q/DQ"
    assert ops.ARITHMETIC_OPS < ops.ELEMENTWISE_OPS
    assert ops.BATCHNORM_FOLD_TARGETS < ops.WEIGHTED_OPS
    assert "BatchNormalization" not in ops.FLOAT_REGION_OPS, "ResNet-v2's Add before BatchNorm must stay int8"
    assert ops.QDQ_OPS < ops.ALREADY_QUANTIZED_OPS


def test_no_module_writes_the_weighted_op_set_again():
    pattern = re.compile(r'frozenset\(\{"Conv", "ConvTranspose", "Gemm"')
    copies = [p.relative_to(QDQ_SOURCE).as_posix() for p in QDQ_SOURCE.rglob("*.py")
              if p.name != "ops.py" and pattern.search(p.read_text())]
    assert copies == [], f"op sets belong in qdq/ops.py, found copies in {copies}"


@pytest.mark.parametrize(("add", "expected"), [("masked", True), ("sum", False)])
def test_one_mask_test_for_placement_and_fp16(rng, add, expected):
    model = parse(ATTENTION, rng)
    index = GraphIndex(model)
    node = next(n for n in model.graph.node if n.output[0] == add)
    assert is_mask_add(index, node.input, node.output[0]) is expected, f"{add}: mask test"
    # The FP16 pass keeps a mask Add in FP32 and lets a residual Add run in FP16.
    types = {i.name: onnx.TensorProto.FLOAT for i in model.graph.input if i.name == "x"}
    types.update({t: onnx.TensorProto.FLOAT for n in model.graph.node for t in n.output})
    assert wants_fp16(node, index, types) is (not expected), f"{add}: FP16 decision"


def test_placement_names_the_mask_add(rng):
    plan = plan_quantization(parse(ATTENTION, rng))
    decision = next(d for d in plan.decisions if d.op == "Add" and "mask" in d.reason)
    assert not decision.quantized, f"{decision.node}: a mask Add stays float ({decision.reason})"


def test_index_links_and_sort(rng):
    model = parse(ATTENTION, rng)
    index = GraphIndex(model)
    assert index.producer("masked").op_type == "Add"
    assert sorted(n.op_type for n in index.consumers("s")) == ["Add", "Relu"]
    assert index.is_constant("w") and index.is_constant("bias"), "initializers and Constant outputs are constants"
    assert index.elem_type("ids") == onnx.TensorProto.INT64
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    sort_nodes(model.graph)
    onnx.checker.check_model(model)  # fails on a node that reads a tensor before it is made


# x ─ Relu ─ MaxPool ─ Reshape ─ r          nonnegative through the ops that keep values
#   ├ Clip[0, 6] ─ c     ├ Clip[-1, 1] ─ k   a Clip is nonnegative when its min is
#   ├ Sub(a, x) ─ d                          arithmetic is not, even of nonnegative inputs
#   └ Concat(a, half) ─ cat                  a Concat of nonnegative inputs is
NONNEGATIVE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 4, 8, 8] x) => (float[64] r, float[1, 4, 8, 8] c, float[1, 4, 8, 8] k, float[1, 4, 8, 8] d,
                            float[1, 8, 8, 8] cat) <float[1] lo = {0.0}, float[1] six = {6.0}, float[1] m1 = {-1.0},
                            float[1] one = {1.0}, float[1, 4, 8, 8] half = {0.5}, int64[1] flat = {64}> {
    a = Relu(x)
    p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(a)
    r = Reshape(p, flat)
    c = Clip(x, lo, six)
    k = Clip(x, m1, one)
    d = Sub(a, x)
    cat = Concat<axis = 1>(a, half)
}
"""


@pytest.mark.parametrize("name, expected", [("a", True), ("p", True), ("r", True), ("c", True), ("k", False),
                                            ("d", False), ("x", False), ("cat", True)])
def test_nonnegative_follows_the_ops_that_make_a_tensor(name, expected):
    model = onnx.parser.parse_model(NONNEGATIVE)
    half = next(i for i in model.graph.initializer if i.name == "half")
    half.CopyFrom(onnx.numpy_helper.from_array(np.full((1, 4, 8, 8), 0.5, np.float32), "half"))
    assert GraphIndex(model).nonnegative(name) is expected, name


def test_nonnegative_gives_up_on_a_long_chain_without_recursing_deeply():
    chain = "\n".join(f"    t{i + 1} = Identity(t{i})" for i in range(3000))
    model = onnx.parser.parse_model(f"""
<ir_version: 8, opset_import: ["" : 13]>
g (float[4] x) => (float[4] t3000) {{
    t0 = Relu(x)
{chain}
}}""")
    index = GraphIndex(model)
    assert index.nonnegative("t10") is True
    assert index.nonnegative("t3000") is False  # unknown past 64 steps: the safe answer
