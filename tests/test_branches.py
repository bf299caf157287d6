"""If branches quantized as models of their own, on the calibration runs that take them (qdq.branches).

The graphs, drawn:

    x -> Conv c0 -> Relu -> r --+-> If(c) then: Conv t1 -> Relu -> Conv t2  (reads r from outside)
                                |         else: Conv e1                     (its weight a subgraph initializer)
                                +-> (optionally) Conv side -> side output

The oracle is the same layers without the If, quantized by qdq as a flat model on the same runs: a branch must
come out as that model does, bit for bit in the arithmetic (ONNX Runtime, optimisations off).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq
from qdq import QuantizeConfig
from qdq.branches import defined_names, outer_reads
from qdq.graph import subgraphs
from qdq.range_files import read_ranges, write_ranges
from qdq.runtime import quantized_session

C = 16  # channels: enough that no tiny-conv rule leaves a Conv float


def weight(rng: np.random.Generator, name: str, cin: int = C) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.normal(size=(C, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32),
                                   name)


def conv(name: str, x: str, w: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1])


def then_nodes(out: str, nested: bool = False) -> list[onnx.NodeProto]:
    nodes = [conv("t1", "r", "wt1", "t1_out"), helper.make_node("Relu", ["t1_out"], ["t1_relu"], name="t1_relu")]
    if not nested:
        return [*nodes, conv("t2", "t1_relu", "wt2", out)]
    # An If inside the branch, on a condition the data decides; its output declares no type (as exporters write).
    inner_then = helper.make_graph([conv("t2", "t1_relu", "wt2", "inner_t")], "inner_then", [],
                                   [helper.make_empty_tensor_value_info("inner_t")])
    inner_else = helper.make_graph([helper.make_node("Neg", ["t1_relu"], ["inner_e"], name="neg")], "inner_else",
                                   [], [helper.make_empty_tensor_value_info("inner_e")])
    return [*nodes, helper.make_node("ReduceMean", ["t1_relu"], ["level"], keepdims=0, name="level"),
            helper.make_node("Greater", ["level", "threshold"], ["loud"], name="loud"),
            helper.make_node("If", ["loud"], [out], name="inner", then_branch=inner_then, else_branch=inner_else)]


def if_model(rng: np.random.Generator, *, nested: bool = False, side: bool = False) -> onnx.ModelProto:
    then_graph = helper.make_graph(then_nodes("t", nested), "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", C, 12, 12])])
    else_graph = helper.make_graph([conv("e1", "r", "we1", "e")], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", C, 12, 12])],
                                   [weight(rng, "we1")])
    nodes = [conv("c0", "x", "w0", "c0_out"), helper.make_node("Relu", ["c0_out"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 12, 12])]
    if side:  # the outer graph quantizes r too: its Q/DQ names are the ones the branches would pick
        nodes.append(conv("side", "r", "ws", "side_out"))
        outputs.append(helper.make_tensor_value_info("side_out", TensorProto.FLOAT, ["N", C, 12, 12]))
    initializers = [weight(rng, "w0", 8), weight(rng, "wt1"), weight(rng, "wt2"), weight(rng, "ws"),
                    numpy_helper.from_array(np.array(0.1, np.float32), "threshold")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def flat_model(model: onnx.ModelProto, branch: str) -> onnx.ModelProto:
    """The If model's layers on one path, without the If: the oracle."""
    node = next(n for n in model.graph.node if n.op_type == "If")
    graph = next(a.g for a in node.attribute if a.name == branch)
    nodes = [n for n in model.graph.node if n.op_type != "If"] + list(graph.node)
    out = graph.output[0].name
    flat = helper.make_graph(nodes, "flat", [model.graph.input[1]],
                             [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", C, 12, 12])],
                             [*model.graph.initializer, *graph.initializer])
    result = helper.make_model(flat, opset_imports=model.opset_import)
    result.ir_version = model.ir_version
    return result


def runs(rng: np.random.Generator, conditions: list[bool]) -> list[dict[str, np.ndarray]]:
    return [{"c": np.array(c), "x": rng.normal(size=(2, 8, 12, 12)).astype(np.float32)} for c in conditions]


def qdq_ops(graph: onnx.GraphProto) -> int:
    return sum(n.op_type == "QuantizeLinear" for n in graph.node)


def branch_graph(model: onnx.ModelProto, name: str = "then_branch") -> onnx.GraphProto:
    node = next(n for n in model.graph.node if n.op_type == "If")
    return next(a.g for a in node.attribute if a.name == name)


def test_a_branch_comes_out_as_the_same_layers_quantized_as_a_model(rng):
    model = if_model(rng)
    before = model.SerializeToString()
    data = runs(rng, [True] * 40)
    config = QuantizeConfig(optimize=0)
    result = qdq.quantize(model, data, config=config)
    assert model.SerializeToString() == before, "the input model must not change"
    assert qdq_ops(branch_graph(result.model)) == 2, "t1 and t2 read quantized activations"
    assert qdq_ops(branch_graph(result.model, "else_branch")) == 0
    assert any("else branch left float: no calibration run takes it" in n for n in result.report.notes)
    assert any("then branch, on the 40 calibration runs that take it: quantized 2 of 3 nodes" in n
               for n in result.report.notes), result.report.notes
    assert result.report.quantized_nodes == 3  # c0 outside, t1 and t2 inside

    oracle = qdq.quantize(flat_model(model, "then_branch"), [{"x": r["x"]} for r in data], config=config)
    assert {n: result.ranges.amax[n] for n in oracle.ranges} == dict(oracle.ranges.amax)
    test = runs(np.random.default_rng(7), [True] * 4)
    got = quantized_session(result.model).run(["y"], test[0])[0]
    expected = quantized_session(oracle.model).run(["t"], {"x": test[0]["x"]})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_each_branch_is_calibrated_on_the_runs_that_take_it_and_names_stay_unique(rng):
    model = if_model(rng, side=True)
    conditions = [True, False] * 20
    result = qdq.quantize(model, runs(rng, conditions), evaluation_data=runs(rng, [True, False] * 4))
    then_graph, else_graph = branch_graph(result.model), branch_graph(result.model, "else_branch")
    assert qdq_ops(then_graph) == 2 and qdq_ops(else_graph) == 1
    assert any("on the 20 calibration runs that take it" in n and "else branch" in n for n in result.report.notes)
    # r is quantized outside (for side) and inside both branches: three Q/DQ pairs, no name defined twice.
    names = [defined_names(g) for g in (then_graph, else_graph)]
    outside = {o for n in result.model.graph.node for o in n.output} | {t.name for t in result.model.graph.initializer}
    assert not (names[0] & names[1]) and not (names[0] & outside) and not (names[1] & outside)
    assert set(outer_reads(then_graph)) <= outside | {i.name for i in result.model.graph.input}
    assert all(o.sqnr_db > 30 for o in result.report.comparison.outputs), result.report.comparison.outputs
    # r has three ranges (outside, and in each branch on its own runs): a range file holds one, and says so.
    assert any("quantizes 'r' with a range of its own" in n for n in result.report.notes), result.report.notes


def test_an_if_inside_a_branch_whose_output_declares_no_type_is_quantized_too(rng):
    model = if_model(rng, nested=True)
    result = qdq.quantize(model, runs(rng, [True] * 40), config=QuantizeConfig(optimize=0),
                          evaluation_data=runs(rng, [True] * 4))
    inner = next(n for n in branch_graph(result.model).node if n.op_type == "If")
    depth_two = [g for g in subgraphs(inner) if qdq_ops(g)]
    assert len(depth_two) == 1 and depth_two[0].node[-1].op_type == "Conv", "t2, inside the inner If, is quantized"
    assert result.report.comparison.outputs[0].sqnr_db > 30


def test_branches_stay_float_without_rereadable_data_and_say_why(rng):
    model = if_model(rng)
    result = qdq.quantize(model, iter(runs(rng, [True] * 8)))
    assert qdq_ops(branch_graph(result.model)) == 0
    assert any("If branches left float: the data is a one-shot iterator" in n for n in result.report.notes), \
        result.report.notes


def test_saved_ranges_cover_the_branches_and_rebuild_the_same_model(rng, tmp_path, caplog):
    model = if_model(rng)
    data = runs(rng, [True] * 40)
    first = qdq.quantize(model, data)
    path = tmp_path / "ranges.json"
    write_ranges(first.ranges, path)
    inside = defined_names(branch_graph(model)) & set(first.ranges)
    assert inside, "the branch's tensors are in the saved ranges"
    with caplog.at_level(logging.WARNING, logger="qdq"):
        again = qdq.quantize(model, data, ranges=read_ranges(path))
    assert not [r for r in caplog.records if "not tensors of this model" in r.getMessage()]
    test = runs(np.random.default_rng(3), [True])[0]
    np.testing.assert_array_equal(quantized_session(first.model).run(["y"], test)[0],
                                  quantized_session(again.model).run(["y"], test)[0])


@pytest.mark.parametrize("condition", [True, False])
def test_the_untaken_branch_keeps_its_float_layers_exactly(rng, condition):
    model = if_model(rng)
    result = qdq.quantize(model, runs(rng, [condition] * 40))
    untaken = branch_graph(result.model, "else_branch" if condition else "then_branch")
    original = branch_graph(model, "else_branch" if condition else "then_branch")
    assert [n.op_type for n in untaken.node] == [n.op_type for n in original.node]


def test_a_branch_that_reads_a_sequence_from_outside_stays_float_and_the_rest_is_quantized(rng):
    """A branch model's inputs must be tensors; a sequence read from outside leaves that branch float, said."""
    then_graph = helper.make_graph([helper.make_node("SequenceAt", ["seq", "zero"], ["first"], name="at"),
                                    conv("t1", "first", "wt1", "t")], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", C, 12, 12])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["r"], ["e"], name="neg")], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", C, 12, 12])])
    graph = helper.make_graph(
        [conv("c0", "x", "w0", "c0_out"), helper.make_node("Relu", ["c0_out"], ["r"], name="relu"),
         helper.make_node("SequenceConstruct", ["r"], ["seq"], name="seq"),
         helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 12, 12])],
        [weight(rng, "w0", 8), weight(rng, "wt1"), numpy_helper.from_array(np.array(0, np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    result = qdq.quantize(model, runs(rng, [True] * 8))
    assert qdq_ops(branch_graph(result.model)) == 0
    assert any("left float" in n and "seq" in n for n in result.report.notes), result.report.notes
    assert qdq_ops(result.model.graph) == 1, "c0 outside is quantized all the same"


def test_with_workers_the_branches_are_calibrated_in_this_process_and_come_out_the_same(rng):
    model = if_model(rng)
    data = runs(rng, [True] * 40)
    one, two = (qdq.quantize(model, data, config=QuantizeConfig(workers=w)) for w in (1, 2))
    assert qdq_ops(branch_graph(two.model)) == 2, two.report.notes
    assert dict(one.ranges.amax) == dict(two.ranges.amax)


def test_the_build_plan_expects_int8_inside_the_branch_by_path(rng):
    from qdq.trt_plan import node_precisions, quantized_node_names

    result = qdq.quantize(if_model(rng), runs(rng, [True] * 40))
    precisions = {n.node: n.precision for n in node_precisions(result.model)}
    assert precisions["branch/then_branch/t1"] == "INT8" and precisions["branch/then_branch/t2"] == "INT8"
    assert precisions["branch/else_branch/e1"] == "FP32" and precisions["c0"] == "INT8"
    assert {"t1", "t2", "c0"} <= quantized_node_names(result.model)


def test_inspect_sees_the_pairs_and_int8_layers_inside_the_branch(rng):
    from qdq.inspect import inspect_model

    found = inspect_model(qdq.quantize(if_model(rng), runs(rng, [True] * 40)).model)
    activations = {p.tensor for p in found.pairs if p.kind == "activation"}
    assert {"x", "branch/then_branch/r", "branch/then_branch/t1_relu"} <= activations, activations
    assert {"branch/then_branch/t1", "branch/then_branch/t2", "c0"} <= {n[0] for n in found.int8_nodes}
    assert [f[0] for f in found.float_layers] == ["branch/else_branch/e1"]


def test_calibrate_gives_the_branch_tensors_the_ranges_quantize_uses(rng):
    model = if_model(rng)
    data = runs(rng, [True] * 40)
    ranges = qdq.calibrate(model, data)
    used = qdq.quantize(model, data, config=QuantizeConfig(optimize=0)).ranges
    assert {"x", "r", "t1_relu"} <= set(ranges)
    assert {n: ranges.amax[n] for n in ("x", "r", "t1_relu")} == {n: used.amax[n] for n in ("x", "r", "t1_relu")}


def test_a_branch_without_layers_is_said_to_have_nothing_to_quantize(rng):
    """torchvision's batched NMS returns a Constant in its "no boxes" branch: no model to build, nothing to say
    but that."""
    model = if_model(rng)
    node = next(n for n in model.graph.node if n.op_type == "If")
    empty = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
            np.zeros((1, C, 12, 12), np.float32)))], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", C, 12, 12])])
    next(a for a in node.attribute if a.name == "else_branch").g.CopyFrom(empty)
    notes = qdq.quantize(model, runs(rng, [False] * 8)).report.notes
    assert any("else branch: nothing to quantize in it" in n for n in notes), notes
    assert not any("else branch left float" in n for n in notes), notes


@pytest.mark.parametrize("rereadable", [True, False], ids=["branches quantized", "branches float"])
def test_fp16_keeps_what_the_branches_read_in_fp32(rng, rereadable):
    """The FP16 pass rewrites the main graph: an outer tensor a branch reads stays FP32 under its name (the FP16
    producer writes a renamed tensor, cast back), and the If itself stays FP32. It once failed the ONNX check
    (a branch's Conv or QuantizeLinear read FP16) whether or not the branches were quantized."""
    model = if_model(rng, side=True)
    data = runs(rng, [True, False] * 20)
    result = qdq.quantize(model, data if rereadable else iter(data), config=QuantizeConfig(high_precision="fp16"),
                          evaluation_data=runs(rng, [True, False] * 4))
    assert all(o.sqnr_db > 30 for o in result.report.comparison.outputs), result.report.comparison.outputs
    assert any(n.op_type == "Cast" and n.output[0] == "r" for n in result.model.graph.node), \
        "r, which the branches read, is cast back to FP32 under its own name"
