"""Crashes and wrong blame on odd values: the scheme's floor and ceiling (qdq.scheme), values checked where they
are read (range files at file:line, weights by initializer), tiny data in histograms, scalar inputs, damaged
files, and API arguments of the wrong type. None of these may end in "a qdq bug" or an internal error."""

from __future__ import annotations

import importlib
import json
import warnings

import numpy as np
import onnx
import pytest
from conftest import DIGITS, nodes_by_op, parse
from conftest import run_cli as run
from onnx import TensorProto, helper, numpy_helper

import qdq
from qdq.errors import ArgumentError, CalibrationError, DataError, ModelError, QdqError
from qdq.range_files import parse_ranges, read_ranges
from qdq.ranges import TensorRanges

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'
MATMUL = HEADER + """
g (float[N, 32] x) => (float[N, 32] y) <float[32, 32] w = {0.0}> { y = MatMul (x, w) }"""



def q_doc(model: onnx.ModelProto) -> str:
    q, = nodes_by_op(model, "QuantizeLinear")
    return q.doc_string


# --- tiny (subnormal) activations: histograms stay in range, the floor is said ------------------------------------

@pytest.mark.parametrize("method", ["entropy", "percentile", "mse", "max"])
def test_vanishing_activations_calibrate_and_the_floor_is_said(rng, caplog, method):
    model = parse(MATMUL, rng)
    x = (rng.normal(size=(8, 32)) * 1e-40).astype(np.float32)  # subnormal float32: largest |x| ~ 3e-40
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy overflow/invalid warnings are failures here
        result = qdq.quantize(model, {"x": x}, config=qdq.QuantizeConfig(method=method))
    assert 0 < result.ranges.amax["x"] <= float(np.abs(x).max()) * (1 + 1e-6)
    assert any("raised to the floor 1e-06" in note for note in result.report.notes), result.report.notes
    assert "raised to the floor 1e-06" in q_doc(result.model), "the Q node must say which amax it used"
    assert "raised to the floor" in caplog.text


# --- --high-precision fp16: the floor and ceiling follow FP16 scales -----------------------------------------------

def test_fp16_all_zero_tensor_gets_a_normal_fp16_scale(rng):
    result = qdq.quantize(parse(MATMUL, rng), {"x": np.zeros((4, 32), np.float32)},
                          config=qdq.QuantizeConfig(high_precision="fp16"))
    q, = nodes_by_op(result.model, "QuantizeLinear")
    scale = numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == q.input[1]))
    assert scale.dtype == np.float16 and float(scale) >= float(np.finfo(np.float16).tiny), scale


def test_fp16_amax_beyond_fp16_is_lowered_to_its_ceiling(rng):
    ranges = TensorRanges({"x": 1e6}, method="text")
    result = qdq.quantize(parse(MATMUL, rng), config=qdq.QuantizeConfig(high_precision="fp16"), ranges=ranges)
    q, = nodes_by_op(result.model, "QuantizeLinear")
    scale = numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == q.input[1]))
    assert np.isfinite(scale) and float(scale) == pytest.approx(65504 / 127, rel=1e-3)
    assert "lowered to the ceiling 65504" in q_doc(result.model)


# --- range values checked where they are read, naming file:line ----------------------------------------------------

@pytest.mark.parametrize("text, where, message", [
    ("x:4e40\n", ":1:", "at most float32's largest value"),
    ("TRT-8601-EntropyCalibration2\nx: 1\n", ":2:", "normal float32"),
    ("TRT-8601-EntropyCalibration2\nx: 7f7fffff\n", ":2:", "normal float32"),
    ('{"format": "qdq-ranges", "tensors": {"x": {"amax": 1e39}}}', "r.json:", "float32's largest value"),
], ids=["text-huge", "cache-subnormal", "cache-huge", "json-huge"])
def test_unusable_range_values_are_refused_where_they_are_read(text, where, message):
    with pytest.raises(DataError, match=message) as err:
        parse_ranges(text, "r.json" if text.startswith("{") else "r")
    assert where in str(err.value)


def test_converting_a_huge_amax_to_a_cache_writes_nothing(tmp_path, capsys):
    (tmp_path / "big.txt").write_text("x:4e40\n")
    code, _, err = run(capsys, "ranges", "--from", tmp_path / "big.txt", "-o", tmp_path / "x.cache")
    assert code == 1 and "big.txt:1:" in err and "a qdq bug" not in err
    assert not (tmp_path / "x.cache").exists()


def test_a_tiny_range_from_a_file_is_floored_and_said(rng):
    ranges = parse_ranges("x:1e-30\n", "r")
    result = qdq.quantize(parse(MATMUL, rng), ranges=ranges)
    assert "amax=1e-30" in q_doc(result.model) and "raised to the floor 1e-06" in q_doc(result.model)


def test_a_utf8_bom_in_a_range_file(tmp_path):
    (tmp_path / "r.txt").write_bytes("x:1.5\n".encode("utf-8-sig"))
    assert read_ranges(tmp_path / "r.txt").amax == {"x": 1.5}


def test_deeply_nested_json_is_one_data_error():
    with pytest.raises(DataError, match="nested too deeply"):
        parse_ranges("[" * 100_000, "r.json", "json")


# --- weights: NaN/Inf and empty weights name the initializer ------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_weights_name_the_initializer(rng, bad):
    model = parse(MATMUL, rng)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[3, 4] = bad
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    with pytest.raises(ModelError, match="weight 'w' holds 1 NaN/Inf") as err:
        qdq.quantize(model, {"x": rng.normal(size=(4, 32)).astype(np.float32)})
    assert "a qdq bug" not in str(err.value)


def test_a_zero_size_conv_weight_is_a_model_error(tmp_path, capsys):
    model = onnx.parser.parse_model(HEADER + """
    g (float[1, 0, 8, 8] x) => (float[1, 16, 8, 8] y) <float[16, 0, 3, 3] w = {0.0}> {
      y = Conv <pads = [1, 1, 1, 1]> (x, w)
    }""")
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((16, 0, 3, 3), np.float32), "w"))
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 0, 8, 8), np.float32))
    code, _, err = run(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--calib",
                       tmp_path / "d.npz", "-q")
    assert code == 1 and "weight 'w' is empty" in err and "internal error" not in err


# --- scalar (rank-0) inputs: the stacked layout (N,) ----------------------------------------------------------------

# A scalar input s scales the activation a MatMul reads.
GEMM_32 = HEADER + """
g (float[N, 32] x) => (float[N, 32] y) <float[32, 32] w = {0.0}> {
  y = MatMul (x, w)
}"""

SCALED = HEADER + """
g (float s, float[N, 32] a) => (float[N, 32] y) <float[32, 32] w = {0.0}> {
  b = Mul (a, s)
  y = MatMul (b, w)
}"""


def test_a_scalar_input_calibrates_from_the_stacked_layout(rng):
    model = parse(SCALED, rng)
    data = {"s": np.array([0.5, 1.0, 2.0], np.float32), "a": rng.normal(size=(3, 2, 32)).astype(np.float32)}
    result = qdq.quantize(model, data, evaluation_data=data)
    assert result.report.comparison.outputs[0].sqnr_db > 30, "stacked scalars must be fed as 0-d arrays"


def test_a_scalar_bool_condition_of_an_if_calibrates(rng):
    then_graph = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 32])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 32])])
    w = numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = {"c": np.array([True, False]), "x": rng.normal(size=(2, 4, 32)).astype(np.float32)}
    assert qdq.quantize(model, data).ranges.amax["x"] > 0


def test_a_network_wholly_inside_if_branches_is_quantized_where_the_data_goes(rng):
    """Silero VAD's default export: every layer sits in the branches of an If on the sample rate."""
    w = numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "w")
    branches = [helper.make_graph([helper.make_node("MatMul", ["x", "w"], [name])], name, [],
                                  [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 32])])
                for name in ("t", "e")]
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branches[0], else_branch=branches[1])], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    feed = {"c": np.array(True), "x": rng.normal(size=(4, 32)).astype(np.float32)}
    result = qdq.quantize(model, feed)
    then_branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node].count("QuantizeLinear") == 1, result.report.notes
    assert result.report.quantized_nodes == 1
    once = qdq.quantize(model, iter([feed]))  # the branches would read a one-shot iterator again: float, and said
    assert any("nothing to quantize: its 2 Conv/ConvTranspose/Gemm/MatMul nodes are all inside If/Loop/Scan "
               "subgraphs" in n for n in once.report.notes), once.report.notes


def test_nothing_to_quantize_names_the_rules_that_left_the_layers_float(rng):
    model = parse('<ir_version: 8, opset_import: ["" : 13]> g (float[N, 8] x) => (float[N, 8] y) '
                  "<float[8, 8] w = {0.0}> { y = MatMul (x, w) }", rng)
    result = qdq.quantize(model, {"x": rng.normal(size=(4, 8)).astype(np.float32)})
    assert any("nothing to quantize: the placement rules leave its 1 Conv/ConvTranspose/Gemm/MatMul nodes float "
               "(tiny-gemm: 1;" in n for n in result.report.notes), result.report.notes


def test_a_model_only_qdqs_preparation_breaks_is_said_to_be_qdqs_fault(rng, monkeypatch):
    """The input loads; a preparation that breaks it (a bug) must not be blamed on the input model."""
    pipeline = importlib.import_module("qdq.quantize")  # the module: qdq.quantize is also the function

    model = parse(GEMM_32, rng)
    prepare = pipeline.prepare

    def broken(source, scheme):
        prepared, notes = prepare(source, scheme)
        copy = onnx.ModelProto()
        copy.CopyFrom(prepared)  # preparation returns its input when no pass changed it
        copy.graph.node[0].input[0] = "nowhere"
        return copy, notes

    monkeypatch.setattr(pipeline, "prepare", broken)
    with pytest.raises(ModelError, match=r"qdq's preparation of the input model .* though the input loads: "
                                         r"ONNX Runtime cannot load .*nowhere.*This is a bug in qdq"):
        qdq.quantize(model, {"x": rng.normal(size=(4, 32)).astype(np.float32)})


def test_a_zero_dim_array_for_a_scalar_input_is_one_run(rng):
    model = parse(SCALED, rng)
    a = rng.normal(size=(2, 32)).astype(np.float32)
    ranges = qdq.calibrate(model, {"s": np.float32(3.0), "a": a}, config=qdq.QuantizeConfig(method="max"))
    assert ranges.samples == 1 and ranges.amax["b"] == np.float32(np.abs(3 * a).max())


def test_a_scalar_beside_batches_of_the_wrong_rank_says_how_to_stack(rng):
    model = parse(SCALED, rng)
    with pytest.raises(DataError, match=r"is a scalar: stack its samples along a first axis, shape \(N,\)"):
        qdq.quantize(model, {"s": np.float32(1.0), "a": rng.normal(size=(2, 4, 32)).astype(np.float32)})


# --- damaged models -------------------------------------------------------------------------------------------------

def external_model(tmp_path, rng, location: str) -> None:
    model = parse(MATMUL, rng)
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    reloaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for entry in reloaded.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    (tmp_path / "m.onnx").write_bytes(reloaded.SerializeToString())


@pytest.mark.parametrize("location, message", [("m.onnx", "the model file itself"), ("w\0.bin", "NUL")],
                         ids=["the-model-itself", "nul"])
def test_damaged_external_data_locations_are_model_errors(tmp_path, rng, location, message):
    external_model(tmp_path, rng, location)
    with pytest.raises(ModelError, match=message):
        qdq.quantize(tmp_path / "m.onnx")


def test_a_modelproto_with_relative_external_data_needs_its_path(tmp_path, rng, monkeypatch):
    external_model(tmp_path, rng, "w.bin")
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    monkeypatch.chdir(tmp_path)  # w.bin is in the working directory: it must still not be read
    with pytest.raises(ModelError, match="pass the model's path instead"):
        qdq.quantize(proto, {"x": rng.normal(size=(4, 32)).astype(np.float32)})


@pytest.mark.parametrize("opset, domain", [(30, ""), (13, "com.example")], ids=["opset-30", "custom-domain"])
def test_a_model_onnx_runtime_cannot_load_is_blamed_on_the_input(tmp_path, capsys, rng, opset, domain):
    model = parse(MATMUL, rng)
    model.opset_import[0].version = opset
    if domain:
        model.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], domain=domain))
        model.graph.output[0].name = "z"
        model.opset_import.append(helper.make_opsetid(domain, 1))
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "r.txt").write_text("x:1.0\n")  # no calibration: the float model is still loaded first
    code, _, err = run(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--ranges",
                       tmp_path / "r.txt", "-q")
    assert code == 1 and "cannot load the input model" in err and "quantized model" not in err, err


# --- API arguments of the wrong type --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, expected", [
    (lambda: qdq.quantize(None), "a path or an onnx.ModelProto"),
    (lambda: qdq.quantize(42), "a path or an onnx.ModelProto"),
    (lambda: qdq.quantize(onnx.ModelProto(), config={"method": "max"}), "qdq.QuantizeConfig"),
    (lambda: qdq.explain(onnx.ModelProto(), config="max"), "qdq.QuantizeConfig"),
    (lambda: qdq.quantize(onnx.ModelProto(), ranges={"x": 1.0}), "TensorRanges"),
], ids=["model-none", "model-int", "config-dict", "explain-config-str", "ranges-dict"])
def test_api_arguments_of_the_wrong_type_say_what_is_expected(call, expected):
    with pytest.raises(ArgumentError, match=expected) as err:
        call()
    assert isinstance(err.value, QdqError) and isinstance(err.value, TypeError)


def test_target_sqnr_nan_is_refused(capsys, tmp_path):
    with pytest.raises(ValueError, match="target_sqnr must be a finite number"):
        qdq.QuantizeConfig(target_sqnr=float("nan"))
    code, _, err = run(capsys, "quantize", "m.onnx", "-o", tmp_path / "o.onnx", "--target-sqnr", "nan")
    assert code == 2 and "target_sqnr" in err


def test_calibration_error_is_still_raised_for_no_finite_value(rng):
    with pytest.raises(CalibrationError, match="no finite value"):
        qdq.quantize(parse(MATMUL, rng), {"x": np.full((4, 32), np.nan, np.float32)})


def test_json_ranges_names_survive(tmp_path):
    doc = {"format": "qdq-ranges", "version": 1, "tensors": {"a\x1bb": {"amax": 1.0}}}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert list(read_ranges(tmp_path / "r.json").amax) == ["a\x1bb"]


def test_a_nan_in_the_calibration_data_leaves_bias_correction_out_and_says_why():
    """The float model's own outputs are NaN on that sample, so the keep-or-drop check cannot compare."""
    image = np.load(DIGITS / "calib.npz")["image"].copy()
    image[3, 0, 4, 4] = np.nan
    result = qdq.quantize(DIGITS / "digits.onnx", {"image": image})
    assert any("bias correction left out: the model's outputs on" in n and "are not finite" in n
               for n in result.report.notes), result.report.notes
    assert not any("nan to nan" in n for n in result.report.notes)
