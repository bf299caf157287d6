"""Each prepare pass on its own, and the pass contract (in place or not, pre/postconditions, pipelines)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import nodes_by_op, parse, run_ort, with_random_weights
from test_quantize_graphs import GEMM

import qdq
from qdq.errors import CalibrationError
from qdq.graph import default_opset
from qdq.passes.base import Pass, PassError, PassResult, Pipeline, run_passes
from qdq.passes.fold_batchnorm import FoldBatchNorm
from qdq.passes.fold_constants import FoldConstants
from qdq.passes.high_precision import CastToFP16
from qdq.passes.identities import RemoveIdentities
from qdq.passes.materialize import MaterializeQDQ
from qdq.passes.names import NameNodes
from qdq.passes.opset import UpgradeOpset
from qdq.passes.shapes import InferShapes
from qdq.placement import plan_quantization
from qdq.ranges import TensorRanges

CONV_BN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 4, 6, 6] x) => (float[2, 8, 6, 6] y)
<float[8, 4, 3, 3] w = {0.0}, float[8] b = {0.0}, float[8] gamma = {0.0}, float[8] beta = {0.0},
 float[8] mean = {0.0}, float[8] var = {0.0}> {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
}
"""

# The weight is computed: a Constant transposed (as exporters write a Linear's weight).
COMPUTED_WEIGHT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[3, 4] x) => (float[3, 2] y) {
    wt = Constant <value = float[2, 4] {1, 2, 3, 4, 5, 6, 7, 8}> ()
    w = Transpose <perm = [1, 0]> (wt)
    y = MatMul (x, w)
}
"""

IDENTITIES = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[3, 4] x) => (float[3, 4] y, float[3, 4] z) {
    a = Identity (x)
    b, m = Dropout (a)
    c = Relu (b)
    y = Identity (c)
    z = Sigmoid (c)
}
"""

OLD_OPSET = """
<ir_version: 6, opset_import: ["" : 11]>
g (float[2, 3] x) => (float[2, 3] y) {
    s = Relu (x)
    y = Softmax <axis = 1> (s)
}
"""

UNNAMED = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 3] x) => (float[2, 3] y) {
    a = Relu (x)
    y = Sigmoid (a)
}
"""


def outputs_close(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict, *, atol: float) -> None:
    for want, got in zip(run_ort(before, feeds), run_ort(after, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_upgrade_opset_converts_and_says_so(rng):
    model = parse(OLD_OPSET)
    result = UpgradeOpset()(model)
    assert default_opset(result.model) == 13 and result.modified
    assert result.notes == ("opset raised from 11 to 13",)
    outputs_close(model, result.model, {"x": rng.standard_normal((2, 3)).astype(np.float32)}, atol=1e-6)
    again = UpgradeOpset()(result.model)
    assert not again.modified and again.model is result.model, "nothing to do: the same model back"
    assert not UpgradeOpset.in_place


def test_upgrade_opset_ignores_declared_custom_domains(rng):
    """Every model ONNX Runtime saved declares com.microsoft; ONNX's IR table does not know it (ddddocr's OCR)."""
    model = parse(OLD_OPSET)
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    result = UpgradeOpset()(model)
    assert default_opset(result.model) == 13 and result.model.ir_version >= 7
    assert {o.domain for o in result.model.opset_import} >= {"", "com.microsoft"}
    outputs_close(model, result.model, {"x": rng.standard_normal((2, 3)).astype(np.float32)}, atol=1e-6)


def test_fold_constants_makes_computed_weights_initializers(rng):
    model = parse(COMPUTED_WEIGHT)
    result = FoldConstants()(model)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul"], "the Transpose of a constant is folded"
    assert len(model.graph.node) == 3, "functional: the input model is untouched"
    outputs_close(model, result.model, {"x": rng.standard_normal((3, 4)).astype(np.float32)}, atol=1e-5)


def nested_if_model() -> onnx.ModelProto:
    """An If whose condition folds to a constant (x's rank), each branch returning a nested If's two outputs: the
    shape of Silero VAD's decoder, whose second output graphsurgeon's branch inlining loses."""
    from onnx import TensorProto, helper

    def two_outputs(name: str, ops: tuple[str, str, str, str]) -> onnx.GraphProto:
        def branch(suffix: str, pair: tuple[str, str]) -> onnx.GraphProto:
            outs = [f"{name}{suffix}{i}" for i in range(2)]
            return helper.make_graph([helper.make_node(op, ["x"], [o]) for op, o in zip(pair, outs, strict=True)],
                                     f"{name}{suffix}", [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                              for o in outs])
        nested = helper.make_node("If", ["c"], [f"{name}0", f"{name}1"], then_branch=branch("t", ops[:2]),
                                  else_branch=branch("e", ops[2:]))
        return helper.make_graph([nested], name, [], [helper.make_tensor_value_info(f"{name}{i}", TensorProto.FLOAT,
                                                                                    None) for i in range(2)])

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["s"], ["n"]),
             helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.INT64, [], [2])),
             helper.make_node("Equal", ["n", "two"], ["k"]),
             helper.make_node("If", ["k"], ["y1", "y2"],
                              then_branch=two_outputs("T", ("Relu", "Neg", "Abs", "Sigmoid")),
                              else_branch=two_outputs("E", ("Abs", "Tanh", "Neg", "Relu"))),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fold_constants_keeps_if_branches_whose_inlining_breaks_the_graph(rng):
    from qdq.graph import undefined_inputs

    model = nested_if_model()
    result = FoldConstants()(model)
    assert undefined_inputs(result.model.graph) == []
    assert "constant folding left If branches in place: inlining them broke the graph" in result.notes
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for c in (True, False):
        outputs_close(model, result.model, {"x": x, "c": np.array(c)}, atol=0)


def test_fold_constants_leaves_its_input_as_it_was_when_it_inlines_a_nested_branch(rng):
    """A branch If with a constant condition, whose branches hold initializers (openwakeword's Silero VAD export):
    graphsurgeon renames the inlined branch's initializers, which once were the input model's own TensorProtos."""
    from onnx import TensorProto, helper, numpy_helper

    def value(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 8])

    def add(name: str, op: str, constant: float) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["y", f"{name}_b"], [name])], name, [], [value(name)],
                                 [numpy_helper.from_array(np.full(8, constant, np.float32), f"{name}_b")])

    inner = helper.make_node("If", ["k"], ["z_in"], then_branch=add("zt", "Add", 0.5),
                             else_branch=add("ze", "Sub", 0.25))
    outer_else = helper.make_graph([helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
        np.array(True))), inner], "outer_else", [], [value("z_in")])
    outer_then = helper.make_graph([helper.make_node("Relu", ["y"], ["z_relu"])], "outer_then", [], [value("z_relu")])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("If", ["flag"], ["out"], then_branch=outer_then, else_branch=outer_else)],
        "g", [value("x"), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])], [value("out")],
        [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    before = model.SerializeToString()
    result = FoldConstants()(model)
    assert model.SerializeToString() == before, "the input model is untouched"
    x = rng.standard_normal((3, 8)).astype(np.float32)
    for flag in (True, False):
        outputs_close(model, result.model, {"x": x, "flag": np.array(flag)}, atol=1e-6)


def test_undefined_inputs_sees_outer_scopes_and_order():
    from qdq.graph import undefined_inputs

    model = nested_if_model()
    assert undefined_inputs(model.graph) == [], "subgraphs read x and c from the scope around them"
    del model.graph.node[3]  # the Equal that makes the condition
    assert undefined_inputs(model.graph) == ["k"]
    model = nested_if_model()
    model.graph.node.insert(0, model.graph.node.pop())  # the Add before the If that makes its inputs
    assert undefined_inputs(model.graph) == ["y1", "y2"]


def test_sort_nodes_puts_what_a_subgraph_reads_before_its_node():
    from qdq.graph import sort_nodes, undefined_inputs

    model = nested_if_model()
    inner = model.graph.node[4].attribute[0].g.node[0].attribute[0].g  # the nested If's then-branch
    inner.node[0].input[0] = "x2"
    model.graph.node.append(onnx.helper.make_node("Relu", ["x"], ["x2"]))  # made after the If that reads it
    assert undefined_inputs(model.graph) == ["x2"]
    sort_nodes(model.graph)
    assert undefined_inputs(model.graph) == []


def test_remove_identities_keeps_graph_outputs(rng):
    model = parse(IDENTITIES)
    result = RemoveIdentities()(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Dropout") == 0 and ops.count("Identity") == 1, f"the output's Identity stays: {ops}"
    outputs_close(model, result.model, {"x": rng.standard_normal((3, 4)).astype(np.float32)}, atol=0)


def test_fold_batchnorm_matches_the_unfolded_model(rng):
    model = with_random_weights(onnx.parser.parse_model(CONV_BN), rng)  # He weights, BatchNorm statistics in [0.5, 1.5]
    result = FoldBatchNorm()(model)
    assert nodes_by_op(result.model, "BatchNormalization") == [] and result.modified
    assert result.notes == ("folded 1 BatchNormalization nodes into the layer before them",)
    # float32 rounding of the folded weights: the output is a sum of 36 products of magnitude ~1.
    outputs_close(model, result.model, {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)}, atol=1e-4)


def test_fold_batchnorm_leaves_a_shared_conv_output(rng):
    shared = CONV_BN.replace("float[2, 8, 6, 6] y)", "float[2, 8, 6, 6] y, float[2, 8, 6, 6] c)")
    result = FoldBatchNorm()(with_random_weights(onnx.parser.parse_model(shared), rng))
    assert not result.modified, "the Conv's output is also a graph output: folding would change it"


def test_infer_shapes_edits_in_place():
    model = parse(UNNAMED)
    result = InferShapes()(model)
    assert result.model is model and InferShapes.in_place
    assert {v.name for v in model.graph.value_info} == {"a"}


def test_name_nodes_names_by_op_and_output():
    model = parse(UNNAMED)
    result = NameNodes()(model)
    assert [n.name for n in result.model.graph.node] == ["Relu_a", "Sigmoid_y"]
    assert result.notes == ("named 2 unnamed or duplicated nodes",)


def test_fp16_pass_requires_opset_19_and_the_pipeline_keeps_the_upgrade_note(rng):
    model = parse(CONV_BN, rng)
    with pytest.raises(PassError, match="opset 19"):
        CastToFP16()(model)
    _, notes = run_passes(model, [UpgradeOpset(19), CastToFP16()])
    assert notes[0] == "opset raised from 13 to 19", f"UpgradeOpset's note must reach the user: {notes}"


def test_materialize_requires_every_planned_range(rng):
    model = parse(GEMM, rng)
    plan = plan_quantization(model)
    with pytest.raises(CalibrationError, match="no range for 1 tensors"):
        MaterializeQDQ(plan, TensorRanges({}))(model)


class Fails(Pass):
    name = "fails"

    def run(self, model: onnx.ModelProto) -> PassResult:
        raise RuntimeError("boom")


def test_pipeline_is_a_pass_and_names_the_failing_pass():
    inner = Pipeline([NameNodes(), InferShapes()])
    assert inner.in_place and isinstance(inner, Pass)
    with pytest.raises(PassError, match=r"pass fails \(after name-nodes\+infer-shapes\) failed: boom"):
        Pipeline([inner, Fails()])(parse(UNNAMED))
    result = Pipeline([inner], until_fixed=True)(parse(UNNAMED))
    assert result.notes == ("named 2 unnamed or duplicated nodes",), "the second round changes nothing"


def test_an_empty_reduce_axes_attribute_is_dropped_and_the_model_quantizes(rng):
    """torch.jit.script exports x.amax() as ReduceMax with axes=[]: valid ONNX that graphsurgeon cannot write back."""
    w = onnx.numpy_helper.from_array(rng.normal(size=(8, 16, 3, 3)).astype(np.float32), "wt")
    nodes = [onnx.helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0, 2, 3]),  # something to fold
             onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             onnx.helper.make_node("ReduceMax", ["y"], ["peak"], keepdims=0)]
    nodes[-1].attribute.append(onnx.helper.make_attribute("axes", [], attr_type=onnx.AttributeProto.INTS))
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                    ["N", 8, 6, 6])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16, 6, 6]),
                                    onnx.helper.make_tensor_value_info("peak", onnx.TensorProto.FLOAT, [])], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = {"x": rng.normal(size=(8, 8, 6, 6)).astype(np.float32)}
    result = qdq.quantize(model, data, evaluation_data=data)
    assert any("dropped the empty axes attribute of 1 Reduce nodes" in n for n in result.report.notes)
    assert all(o.sqnr_db > 30 for o in result.report.comparison.outputs), result.report.comparison
