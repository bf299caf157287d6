"""Broken and hostile inputs not covered elsewhere: each ends in one clear line, nothing written, nothing run."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import DIGITS, nodes_by_op, parse
from conftest import run_cli as run
from onnx import TensorProto, helper

import qdq
from qdq.errors import CalibrationError, ModelError

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'
MATMUL = HEADER + """
g (float[N, 32] x) => (float[N, 32] y) <float[32, 32] w = {0.0}> { y = MatMul (x, w) }"""



def test_op_from_an_unknown_domain_is_a_one_line_error(tmp_path, capsys, rng):
    model = parse(MATMUL, rng)
    model.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=np.ones((4, 32), np.float32))
    code, _, err = run(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--calib",
                       tmp_path / "d.npz", "-q")
    assert code == 1 and err.startswith("qdq: error:") and "Mystery" in err and err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", tmp_path / "none.onnx", "-o", tmp_path / "o.onnx", "--debug")
    assert code == 1 and "Traceback" in err and "no such file" in err


def test_unwritable_output_folder(tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(
        path, mode))
    code, _, err = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", tmp_path / "o.onnx", "--calib",
                       DIGITS / "calib.npz")
    assert code == 1 and "no permission to write" in err


def test_nan_and_inf_in_calibration_data_are_counted_and_skipped(rng, caplog):
    model = parse(MATMUL, rng)
    x = rng.normal(size=(16, 32)).astype(np.float32)
    x[0, :3] = [np.nan, np.inf, -np.inf]
    result = qdq.quantize(model, {"x": x}, config=qdq.QuantizeConfig(method="max"))
    assert result.ranges.amax["x"] == pytest.approx(float(np.abs(x[np.isfinite(x)]).max()))
    assert "3 non-finite values" in caplog.text


def test_a_tensor_with_no_finite_value_is_an_error(rng):
    model = parse(MATMUL, rng)
    with pytest.raises(CalibrationError, match="no finite value"):
        qdq.quantize(model, {"x": np.full((4, 32), np.nan, np.float32)})


def test_all_zero_tensor_gets_a_valid_scale_and_a_warning(rng, caplog):
    model = parse(MATMUL, rng)
    out = qdq.quantize(model, {"x": np.zeros((4, 32), np.float32)}).model
    q, = nodes_by_op(out, "QuantizeLinear")
    scale = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == q.input[1]))
    assert scale > 0 and np.isfinite(scale) and scale >= np.finfo(np.float32).tiny
    assert "all zeros" in caplog.text


def test_several_inputs_and_outputs(rng):
    model = parse(HEADER + """
    g (float[N, 32] a, float[N, 32] b) => (float[N, 32] y, float[N, 32] z) <float[32, 32] w = {0.0}> {
      y = MatMul (a, w)
      s = Add (a, b)
      z = MatMul (s, w)
    }""", rng)
    data = {"a": rng.normal(size=(8, 32)).astype(np.float32), "b": rng.normal(size=(8, 32)).astype(np.float32)}
    result = qdq.quantize(model, data, evaluation_data=data)
    assert [o.name for o in result.report.comparison.outputs] == ["y", "z"]
    assert all(o.sqnr_db > 30 for o in result.report.comparison.outputs)


def test_if_branches_without_layers_or_runs_are_left_float_and_said(rng, caplog):
    then_graph = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 32])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 32])])
    w = onnx.numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
             helper.make_node("ReduceSum", ["h"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], name="branch", then_branch=then_graph,
                              else_branch=else_graph)]
    zero = onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], [w, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    result = qdq.quantize(model, {"x": rng.normal(size=(4, 32)).astype(np.float32)})
    notes = result.report.notes
    assert any("If 'branch'" in n and ("nothing to quantize in it" in n or "no calibration run takes it" in n)
               for n in notes), notes
    branch = next(n for n in result.model.graph.node if n.op_type == "If")
    assert [n.op_type for n in branch.attribute[0].g.node] in (["Relu"], ["Neg"])
    assert nodes_by_op(result.model, "QuantizeLinear"), "the MatMul outside is still quantized"


def test_caller_arrays_and_files_are_untouched(tmp_path, rng):
    path = tmp_path / "d.npz"
    np.savez(path, image=np.load(DIGITS / "calib.npz")["image"])
    before = path.read_bytes()
    qdq.quantize(DIGITS / "digits.onnx", path)
    assert path.read_bytes() == before


def test_random_bytes_as_a_model_from_the_api(tmp_path):
    (tmp_path / "m.onnx").write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        qdq.quantize(tmp_path / "m.onnx")


def test_non_finite_values_inside_the_graph_are_counted_too(rng, caplog):
    # Sqrt of negative inputs gives NaN in an intermediate tensor; max calibration reduces in ONNX Runtime and
    # must fall back to the full tensor for such batches to count and skip them.
    model = parse(HEADER + """
    g (float[N, 32] x) => (float[N, 32] y) <float[32, 32] w = {0.0}> {
      s = Sqrt (x)
      y = MatMul (s, w)
    }""", rng)
    x = np.abs(rng.normal(size=(16, 32))).astype(np.float32)
    x[3, :5] = -1.0
    result = qdq.quantize(model, {"x": x}, config=qdq.QuantizeConfig(method="max", batch_size=4))
    assert result.ranges.amax["s"] == pytest.approx(float(np.sqrt(x[x >= 0]).max()), rel=1e-6)
    assert "5 non-finite values" in caplog.text


def test_a_sequence_built_from_sequence_empty_quantizes_with_folding_skipped(rng):
    """torch.jit.script writes a list built in a loop as SequenceEmpty/SequenceInsert: graphsurgeon's constant
    folding evaluates SequenceEmpty to a Python list and fails on it; folding is skipped, said, and the rest runs
    (the weight techniques once stopped on its input-less node too)."""
    w = onnx.numpy_helper.from_array((rng.standard_normal((32, 32)) / 6).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("SequenceEmpty", [], ["seq0"], name="seq_empty", dtype=TensorProto.FLOAT),
             helper.make_node("SequenceInsert", ["seq0", "y"], ["seq1"], name="seq_insert"),
             helper.make_node("ConcatFromSequence", ["seq1"], ["out"], name="concat_seq", axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["M", 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = {"x": rng.standard_normal((32, 32)).astype(np.float32)}
    result = qdq.quantize(model, data, evaluation_data=data)
    assert any("constant folding skipped: graphsurgeon failed" in n for n in result.report.notes)
    assert result.report.quantized_nodes == 1 and result.report.comparison.outputs[0].sqnr_db > 30
