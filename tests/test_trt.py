"""The TensorRT step, tested without TensorRT or a GPU: inspector JSON of both versions, data-type strings, layer
names, trtexec lines, shapes, and build/verify against small fakes of ``tensorrt`` and cuda-python
(tests/trt/fakes.py) that fail the way the real bindings do. tests/trt/ builds real engines where a GPU exists.

The inspector fixtures, tests/data/inspector-trt10.json and inspector-trt11.json, describe one engine in each
version's layout. What is documented and what is inferred:

- TensorRT 10 (documented: the developer guide's Engine Inspector section shows a DETAILED layer with ``Name``,
  ``LayerType``, ``Inputs``/``Outputs`` entries of ``Name``, ``Dimensions``, ``Format/Datatype``, and
  ``ParameterType``; the list of I/O names under ``Bindings``). The format strings are real ones, from NVIDIA's
  TREx format table (TensorRT repo, tools/experimental/trt-engine-explorer/trex/activations.py) and issue 15;
  ``Metadata`` with ``[ONNX Layer: name]`` entries joined by U+001E is what TREx's parser.py strips and what
  public inspector dumps show. ``PWN(...)`` and ``{ForeignNode[first...last]}`` layer names: as TensorRT writes
  them in verbose logs (inferred layout of the whole file around them).
- TensorRT 11 (documented: the 10.x-to-11.x IEngineInspector migration guide: ``Bindings`` replaced by
  ``I/O Tensors`` objects with ``Name``, ``IOMode``, ``DataType``, ``Dimensions``, ``Location``,
  ``IsShapeInferenceIO``, ``ProfileInfo`` [``MinShape``/``OptShape``/``MaxShape``/``Format``], and "the split of
  the Format/DataType field"). The layer tensors' key names ``Datatype`` and ``Format`` are inferred from NVIDIA's
  TensorRT cookbook (trt-samples-for-hackathon-cn, cookbook/tensorrt_cookbook/utils_engine.py, which reads both
  schemas); qdq matches keys case-insensitively so ``DataType`` works too. Their values (``Int8``, ``Half``,
  ``Float``; the format string without a change) are inferred.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from conftest import DIGITS, ROOT, parse
from trt import fakes

from qdq import trt
from qdq.cli import main
from qdq.errors import MissingDependencyError, QdqError
from qdq.trt_inspect import data_type, layer_onnx_nodes, tensor_precision
from qdq.trt_plan import check_shapes, trtexec_command

DATA = ROOT / "tests" / "data"
TRT10 = json.loads((DATA / "inspector-trt10.json").read_text())
TRT11 = json.loads((DATA / "inspector-trt11.json").read_text())
# The ONNX graph behind the fixtures, in graph order, and its nodes that read Q/DQ.
NODE_ORDER = ["image_QuantizeLinear", "/conv1/Conv", "/relu1/Relu", "/conv2/Conv", "/add/Add", "/conv3/Conv",
              "/act/Sigmoid", "/act/Mul", "/attn/MatMul", "/attn/Div", "/attn/Softmax", "/pool/GlobalAveragePool",
              "/fc/Gemm", "/mask/Equal"]
QUANTIZED = {"/conv1/Conv", "/conv2/Conv", "/add/Add", "/conv3/Conv", "/act/Mul", "/attn/MatMul", "/fc/Gemm"}


# --- 1. Inspector JSON of TensorRT 10 and 11 -----------------------------------------------------------------------

@pytest.mark.parametrize(("info", "layout"), [(TRT10, "TensorRT 10"), (TRT11, "TensorRT 11")], ids=["trt10", "trt11"])
def test_both_inspector_layouts_give_the_same_summary(info, layout):
    summary = trt.summarize_layers(info, QUANTIZED, NODE_ORDER)
    assert summary.layout == layout
    assert summary.layers == 9
    assert summary.by_precision == {"FP32": 1, "INT8": 3, "FP16": 4, "INT32": 1}, summary.by_precision
    assert summary.not_int8 == (("PWN(/act/Sigmoid, /act/Mul)", "FP16"), ("/fc/Gemm", "FP16"))
    assert summary.in_myelin == (("{ForeignNode[/attn/MatMul.../attn/Softmax]}", 1),)
    assert summary.unknown_types == ()
    text = summary.describe()
    assert text.startswith("9 engine layers: 4 FP16, 3 INT8, 1 FP32, 1 INT32")
    assert "not INT8 (FP16): /fc/Gemm" in text and "Myelin layer" in text


def test_trt11_data_type_key_is_read_before_the_format_and_10s_field_is_the_fallback():
    assert tensor_precision({"Datatype": "Int8", "Format": "Row major linear FP32 format (kLINEAR)"}) == "INT8"
    assert tensor_precision({"DataType": "Half"}) == "FP16"  # the I/O Tensors spelling
    assert tensor_precision({"DATATYPE": "float"}) == "FP32"  # keys without regard to case
    assert tensor_precision({"Datatype": "Unknown format", "Format": "Row major linear FP16 format"}) == "FP16"
    assert tensor_precision({"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}) == "INT8"
    assert tensor_precision({"Name": "x", "Dimensions": [1]}) is None


def test_an_engine_built_without_detailed_verbosity_is_said_not_counted():
    summary = trt.summarize_layers({"Layers": ["Conv_c1 + Relu_r"], "Bindings": []})
    assert summary.names_only and summary.layers == 0
    assert "layer names only" in summary.describe()


# --- 2. Data-type strings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("Channel major INT8 format where channel % 16 == 0", "INT8"),
    ("Row major INT8 format where column stride % 64 == 0", "INT8"),
    ("Row major linear INT8 format (kLINEAR)", "INT8"),
    ("Thirty-two wide channel vectorized row major Int8 format.", "INT8"),
    ("Int8", "INT8"), ("kINT8", "INT8"),
    ("Row major linear FP32", "FP32"), ("Float", "FP32"), ("kFLOAT", "FP32"),
    ("Row major linear FP16 format", "FP16"), ("Half", "FP16"),
    ("Channel major FP16 format where channel % 8 == 0", "FP16"),
    ("Row major linear BFloat16 format", "BF16"), ("BF16", "BF16"),
    ("Row major linear Int32", "INT32"), ("INT32", "INT32"), ("Row major linear Int64 format", "INT64"),
    ("Row major linear BOOL", "BOOL"), ("Row major linear UInt8 format", "UINT8"),
    ("Row major linear FP8 format", "FP8"), ("FP4", "FP4"), ("Int4", "INT4"), ("E8M0", "E8M0"),
    ("row major linear int8 format", "INT8"),
])
def test_data_type_strings_are_matched_case_insensitively_over_all_tensorrt_types(text, expected):
    assert data_type(text) == expected, text


@pytest.mark.parametrize("text", ["N/A due to dynamic shapes", "Unknown format", "None", "FloatComplex", "",
                                  "Row major linear FP16 to Int8 format"])
def test_strings_naming_no_type_or_two_are_unknown_not_guessed(text):
    assert data_type(text) is None


def test_unknown_type_strings_are_reported_by_the_summary():
    info = {"Layers": [{"Name": "a", "Inputs": [{"Format/Datatype": "N/A due to dynamic shapes"}], "Outputs": []},
                       {"Name": "b", "Inputs": [{"Format/Datatype": "Half"}], "Outputs": []}], "Bindings": []}
    summary = trt.summarize_layers(info)
    assert summary.by_precision == {"unknown": 1, "FP16": 1}
    assert summary.unknown_types == ("N/A due to dynamic shapes",)
    assert "'N/A due to dynamic shapes'" in summary.describe()


# --- 8. Layer names -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "nodes", "foreign"), [
    ("Conv_c1 + Relu_r", {"Conv_c1", "Relu_r"}, False),
    ("conv_a || conv_b", {"conv_a", "conv_b"}, False),
    ("PWN(/act/Sigmoid, /act/Mul)", {"/act/Sigmoid", "/act/Mul"}, False),
    ("PWN(PWN(/a/Sigmoid, /a/Mul), /b/Add) + /c/Conv", {"/a/Sigmoid", "/a/Mul", "/b/Add", "/c/Conv"}, False),
    ("{ForeignNode[/attn/MatMul.../attn/Softmax]}", {"/attn/MatMul", "/attn/Div", "/attn/Softmax"}, True),
    ("{ForeignNode[/attn/Softmax.../attn/MatMul]}", {"/attn/MatMul", "/attn/Div", "/attn/Softmax"}, True),
    ("{ForeignNode[odd...name.../attn/Div]}", {"odd...name", "/attn/MatMul", "/attn/Div"}, True),
], ids=["fused", "merged", "pwn", "nested-pwn", "foreign-range", "foreign-reversed", "dots-in-name"])
def test_layer_names_give_the_onnx_nodes_they_hold(name, nodes, foreign):
    order = ["/conv", "odd...name", "/attn/MatMul", "/attn/Div", "/attn/Softmax", "/out"]
    found, is_foreign = layer_onnx_nodes({"Name": name}, {n: i for i, n in enumerate(order)}, order)
    assert nodes <= found and is_foreign == foreign, found
    assert "/conv" not in found and "/out" not in found


def test_layer_metadata_names_the_onnx_nodes_of_myelin_layers():
    layer = {"Name": "__myl_MulAdd_0", "Metadata": "[ONNX Layer: /a/Mul]\x1e[ONNX Layer: /a/Add]"}
    assert {"/a/Mul", "/a/Add"} <= layer_onnx_nodes(layer, {}, [])[0]


# --- 6. trtexec lines -----------------------------------------------------------------------------------------------

def test_trtexec_line_for_each_tensorrt_version():
    shapes = trt.parse_shapes(["image:1x1x8x8,8x1x8x8,32x1x8x8"])
    ten = trtexec_command(DIGITS / "m.onnx", DIGITS / "m.engine", trt_version=10, workspace_mb=1024,
                          timing_cache=DIGITS / "t.cache", shapes=shapes)
    eleven = trtexec_command(DIGITS / "m.onnx", DIGITS / "m.engine", trt_version=11, shapes=shapes)
    assert ten.startswith("trtexec --onnx=") and "--stronglyTyped" in ten
    assert "--stronglyTyped" not in eleven, "a deprecated no-op in TensorRT 11's trtexec"
    assert "--memPoolSize=workspace:1024M" in ten and "--timingCacheFile=" in ten
    for line in (ten, eleven):
        assert "--minShapes=image:1x1x8x8 --optShapes=image:8x1x8x8 --maxShapes=image:32x1x8x8" in line
        assert "--profilingVerbosity=detailed" in line


def test_shapes_parse_fixed_and_ranges_and_reject_the_rest():
    assert trt.parse_shapes(["a:b:1x3"]) == {"a:b": ((1, 3), (1, 3), (1, 3))}
    for bad in ("image", "image:1xx3", "image:1x3,2x3", "image:0x3"):
        with pytest.raises(QdqError, match="--shapes"):
            trt.parse_shapes([bad])


# --- 9. --shapes for static or unknown inputs -----------------------------------------------------------------------

STATIC_AND_DYNAMIC = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, float[2, 4] fixed, int64[2] dims) => (float[N, 4] y) {
    y = Relu(x)
}
"""


def test_shapes_for_a_static_or_unknown_input_are_refused_with_the_input_names():
    model = parse(STATIC_AND_DYNAMIC)
    assert check_shapes(model, trt.parse_shapes(["x:1x4"])) == ["x"]
    with pytest.raises(QdqError, match=r"no input 'X'; its inputs: x float32 \[N, 4\], fixed float32 \[2, 4\]"):
        check_shapes(model, trt.parse_shapes(["X:1x4"]))
    with pytest.raises(QdqError, match=r"'fixed' is static \(float32 \[2, 4\]\).*\(x\)"):
        check_shapes(model, trt.parse_shapes(["fixed:2x4"]))
    assert check_shapes(model, trt.parse_shapes(["dims:2x4"])) == ["x"], "maybe a shape tensor: TensorRT decides"


def test_cli_refuses_shapes_for_a_static_input_with_exit_1(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(parse(STATIC_AND_DYNAMIC).SerializeToString())
    code = main(["build", str(path), "-o", str(tmp_path / "m.engine"), "--shapes", "fixed:2x4"])
    out, err = capsys.readouterr()
    assert code == 1 and "'fixed' is static" in err and out == "", "refused before the trtexec line is printed"


# --- missing TensorRT, --dry-run -------------------------------------------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


def test_missing_tensorrt_is_a_clear_error_with_exit_code_3(no_tensorrt, tmp_path, capsys):
    with pytest.raises(MissingDependencyError, match=r"pip install 'qdq\[trt\]'"):
        trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine")
    code = main(["build", str(DIGITS / "digits.onnx"), "-o", str(tmp_path / "e.engine"), "--shapes",
                 "image:1x1x8x8"])
    out, err = capsys.readouterr()
    assert code == 3 and "TensorRT is not installed" in err and "Traceback" not in err
    assert out.startswith("trtexec --onnx="), "the equivalent trtexec command is printed even without TensorRT"
    assert not (tmp_path / "e.engine").exists()


@pytest.fixture(scope="module")
def digits_qdq(tmp_path_factory):
    import qdq

    path = tmp_path_factory.mktemp("digits") / "digits.qdq.onnx"
    qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz").save(path)
    return path


def test_dry_run_prints_what_would_be_built_without_tensorrt(no_tensorrt, digits_qdq, tmp_path, capsys):
    engine = tmp_path / "d.engine"
    code = main(["build", str(digits_qdq), "-o", str(engine), "--dry-run", "--trt-version", "11",
                 "--shapes", "image:1x1x8x8,8x1x8x8,32x1x8x8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "image: shape min 1x1x8x8, opt 8x1x8x8, max 32x1x8x8" in out
    import onnx

    model = onnx.load(digits_qdq)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(f"{name} (Conv): INT8" in out for name in convs), out
    assert "INT8," in out and out.rstrip().splitlines()[-1].startswith("trtexec ")
    assert "--stronglyTyped" not in out.splitlines()[-1]
    assert not engine.exists()


def test_tensorrt_is_imported_only_by_its_module():
    sources = [p for p in (ROOT / "qdq").rglob("*.py") if p.name != "trt.py"]
    assert all("import tensorrt" not in p.read_text() for p in sources)


# --- 3-7, 9. Build and run against fakes of tensorrt and cuda-python -------------------------------------------------

RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 1, 8, 8] image) => (float[N, 1, 8, 8] out) {
    out = Relu(image)
}
"""


def relu_engine(**options) -> fakes.FakeState:
    io = [fakes.IO("image", "input", profile=((1, 1, 8, 8), (4, 1, 8, 8), (4, 1, 8, 8)), network_shape=(-1, 1, 8, 8)),
          fakes.IO("out", "output", output_shape=lambda s: s["image"], network_shape=(-1, 1, 8, 8))]
    return fakes.FakeState(io=io, compute=lambda feeds: {"out": np.maximum(feeds["image"], 0)}, **options)


@pytest.fixture
def engine_file(tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(b"fake engine")
    return path


def test_verify_deserializes_once_and_frees_everything(monkeypatch, engine_file, rng):
    state = fakes.install(monkeypatch, relu_engine())
    data = {"image": rng.standard_normal((12, 1, 8, 8)).astype(np.float32)}
    comparison = trt.verify_engine(parse(RELU), engine_file, data, batch_size=4)
    assert comparison.samples == 12 and state.deserialized == 1, "one engine load per verify run, not per batch"
    assert comparison.outputs[0].sqnr_db > 100, "the fake engine computes exactly what ONNX Runtime does"
    assert state.memory == {} and state.streams == set(), "device memory freed, streams destroyed"
    assert len(state.stream_handles) == 3 and all(type(h) is int for h in state.stream_handles)


def test_data_outside_the_profile_names_the_input_shape_and_profile_range(monkeypatch, engine_file, rng):
    state = fakes.install(monkeypatch, relu_engine())
    data = {"image": rng.standard_normal((16, 1, 8, 8)).astype(np.float32)}
    with pytest.raises(trt.EngineError, match=r"input 'image' of shape 16x1x8x8 is outside the engine's profile "
                                              r"\(min 1x1x8x8, max 4x1x8x8\)"):
        trt.verify_engine(parse(RELU), engine_file, data, batch_size=16)
    assert state.memory == {} and state.streams == set()


@pytest.mark.parametrize("failure", ["cudaMalloc", "cudaMemcpy", "cudaStreamCreate", "execute", "set_input_shape"])
def test_each_cuda_and_tensorrt_failure_is_an_engine_error_and_frees_memory(monkeypatch, engine_file, failure):
    state = fakes.install(monkeypatch, relu_engine(fail={failure}))
    with pytest.raises(trt.EngineError) as caught:
        trt.run_engine(engine_file, {"image": np.ones((2, 1, 8, 8), np.float32)})
    assert "failed" in str(caught.value) or "outside" in str(caught.value), str(caught.value)
    assert state.memory == {} and state.streams == set(), f"{failure}: leaked device memory or a stream"


def test_an_engine_tensorrt_cannot_load_is_an_engine_error(monkeypatch, engine_file, tmp_path):
    fakes.install(monkeypatch, relu_engine(fail={"deserialize"}))
    with pytest.raises(trt.EngineError, match="cannot load this engine"):
        trt.run_engine(engine_file, {"image": np.ones((2, 1, 8, 8), np.float32)})
    with pytest.raises(trt.EngineError, match="cannot load this engine"):
        trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine", shapes=trt.parse_shapes(["image:1x1x8x8"]))


def test_shape_tensor_inputs_get_values_in_the_profile_and_host_memory_at_run_time(monkeypatch, tmp_path):
    io = [fakes.IO("x", "input", profile=((1, 4), (2, 4), (8, 4)), network_shape=(-1, 4)),
          fakes.IO("dims", "input", dtype=np.int64, profile=((2,), (2,), (2,)), shape_io=True, network_shape=(2,)),
          fakes.IO("y", "output", output_shape=lambda s: s["x"], network_shape=(-1, 4))]
    seen = {}
    state = fakes.install(monkeypatch, fakes.FakeState(io=io, compute=lambda f: seen.update(f) or {"y": f["x"]}))
    trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine",
                     shapes=trt.parse_shapes(["x:1x4,2x4,8x4", "dims:1x4,2x4,8x4"]))
    assert ("set_shape_input", "dims", (1, 4), (2, 4), (8, 4)) in state.profile_calls
    assert ("set_shape", "x", (1, 4), (2, 4), (8, 4)) in state.profile_calls
    out = trt.run_engine(tmp_path / "e.engine", {"x": np.ones((3, 4), np.float32), "dims": np.array([3, 4])})
    np.testing.assert_array_equal(seen["dims"], [3, 4])  # read from host memory, exactly
    np.testing.assert_array_equal(out["y"], np.ones((3, 4), np.float32))
    assert state.memory == {}


@pytest.mark.parametrize(("shapes", "message"), [
    (["image:1x1x8x8", "label:1x10"], r"no input 'label'; its inputs: image \[-1, 1, 8, 8\], size \[1\]"),
    (["image:1x1x8x8", "size:1"], r"'size' is static.*\(image\)"),
])
def test_build_refuses_shapes_the_network_would_ignore(monkeypatch, tmp_path, shapes, message):
    state = fakes.image_classifier()
    state.io.insert(1, fakes.IO("size", "input", dtype=np.int32, profile=((1,), (1,), (1,)), network_shape=(1,)))
    fakes.install(monkeypatch, state)
    with pytest.raises(trt.EngineError, match=message):
        trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine", shapes=trt.parse_shapes(shapes))
    assert not (tmp_path / "e.engine").exists()


@pytest.mark.parametrize(("version", "flags", "strongly_typed"), [("10.16.1.11", 2, True), ("11.1.0.5", 0, False)])
def test_network_is_strongly_typed_per_version_and_no_precision_flags(monkeypatch, tmp_path, version, flags,
                                                                       strongly_typed):
    state = fakes.install(monkeypatch, fakes.image_classifier(version=version, inspector_json=TRT10))
    result = trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine",
                              shapes=trt.parse_shapes(["image:1x1x8x8,8x1x8x8,32x1x8x8"]),
                              quantized_nodes=QUANTIZED, node_order=NODE_ORDER)
    assert state.network_flags == [flags]
    assert ("--stronglyTyped" in result.trtexec) == strongly_typed
    assert result.summary.by_precision["INT8"] == 3 and (tmp_path / "e.engine").read_bytes() == b"fake engine"
    assert state.inspector_contexts[0] is not None, "an execution context with the opt shapes, for full formats"


def test_timing_cache_from_another_gpu_warns_and_builds_with_a_fresh_one(monkeypatch, tmp_path, caplog):
    fakes.install(monkeypatch, fakes.image_classifier())
    cache = tmp_path / "t.cache"
    cache.write_bytes(fakes.FOREIGN_CACHE + b":entries")
    result = trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine", timing_cache=cache,
                              shapes=trt.parse_shapes(["image:1x1x8x8"]))
    assert (tmp_path / "e.engine").exists()
    assert any("rejected this timing cache" in w for w in result.warnings), result.warnings
    assert any("replaced by this build's" in w for w in result.warnings), result.warnings
    assert cache.read_bytes() == b"CACHE:|built", "the foreign entries are not merged in"
    assert "rejected this timing cache" in caplog.text


def test_timing_cache_is_merged_with_the_file_on_disk(monkeypatch, tmp_path):
    fakes.install(monkeypatch, fakes.image_classifier())
    config = sys.modules["tensorrt"].Builder(None).create_builder_config()
    assert trt.load_timing_cache(config, None) == []
    config.get_timing_cache().data = b"CACHE:this-build"
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"CACHE:written-meanwhile")  # by another build, as Polygraphy allows for
    assert trt.save_timing_cache(config, cache) == []
    assert cache.read_bytes() == b"CACHE:this-build+CACHE:written-meanwhile|built"
    assert [p.name for p in tmp_path.iterdir()] == ["t.cache"], "written atomically, no stray staging files"


def test_no_timing_cache_after_the_build_warns_and_leaves_the_file(monkeypatch, tmp_path):
    fakes.install(monkeypatch, fakes.image_classifier(fail={"get_timing_cache"}))
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"CACHE:old")
    result = trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine", timing_cache=cache,
                              shapes=trt.parse_shapes(["image:1x1x8x8"]))
    assert (tmp_path / "e.engine").exists() and cache.read_bytes() == b"CACHE:old"
    assert any("returned no timing cache" in w for w in result.warnings)


def test_parser_and_build_failures_are_engine_errors(monkeypatch, tmp_path):
    fakes.install(monkeypatch, fakes.image_classifier(parse_ok=False))
    with pytest.raises(trt.EngineError, match=r"node Conv_0 \(Conv\): Unsupported datatype"):
        trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine", shapes=trt.parse_shapes(["image:1x1x8x8"]))
    fakes.install(monkeypatch, fakes.image_classifier(fail={"build"}))
    with pytest.raises(trt.EngineError, match="could not build an engine"):
        trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine", shapes=trt.parse_shapes(["image:1x1x8x8"]))


def test_exceptions_from_the_bindings_end_as_engine_errors(monkeypatch, tmp_path, engine_file):
    state = fakes.install(monkeypatch, relu_engine())
    tensorrt = sys.modules["tensorrt"]  # the fake

    def inconsistent(*args):  # what the real IOptimizationProfile.set_shape raises for min > opt
        raise RuntimeError("Shape provided for min is inconsistent with other shapes.")

    monkeypatch.setattr(tensorrt.Builder(None).create_optimization_profile().__class__, "set_shape", inconsistent)
    with pytest.raises(trt.EngineError, match="RuntimeError: Shape provided for min"):
        trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine", shapes=trt.parse_shapes(["image:4x1x8x8"]))
    with pytest.raises(trt.EngineError, match="no data for engine inputs"):
        trt.run_engine(engine_file, {})
    assert state.memory == {}


def test_cli_build_with_fakes_prints_summary_and_verifies(monkeypatch, tmp_path, capsys, rng):
    model = tmp_path / "relu.onnx"
    model.write_bytes(parse(RELU).SerializeToString())
    np.savez(tmp_path / "eval.npz", image=rng.standard_normal((8, 1, 8, 8)).astype(np.float32))
    state = fakes.install(monkeypatch, relu_engine(inspector_json=TRT11))
    code = main(["build", str(model), "-o", str(tmp_path / "r.engine"), "--shapes", "image:1x1x8x8,4x1x8x8,4x1x8x8",
                 "--verify", str(tmp_path / "eval.npz"), "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "9 engine layers" in out and "(TensorRT vs ONNX Runtime)" in out
    assert state.deserialized == 2, "once to inspect after the build, once for the whole --verify run"



def fake_calls() -> list[str]:
    """Every call the fakes implement: ``Class.method`` of the tensorrt fake, ``cudart.function`` of cuda-python's."""
    state = relu_engine()
    calls = [f"{cls.__name__}.{name}" for cls in fakes.make_tensorrt(state)._fake_classes
             for name, value in vars(cls).items() if callable(value) and (name == "__init__" or name[0] != "_")]
    cudart = fakes.make_cudart(state)
    return calls + [f"cudart.{name}" for name, value in vars(cudart).items()
                    if name.startswith("cuda") and isinstance(value, types.FunctionType)]


@pytest.mark.parametrize("call", fake_calls())
def test_any_binding_raising_ends_as_an_engine_error_or_exit_3(monkeypatch, tmp_path, rng, call):
    state = fakes.install(monkeypatch, relu_engine(inspector_json=TRT10))
    owner, method = call.split(".")

    def injected(*args, **kwargs):
        raise RuntimeError(f"{call} failed (injected)")

    if owner == "cudart":
        monkeypatch.setattr(sys.modules["cuda.bindings.runtime"], method, injected)
    else:
        cls = next(c for c in sys.modules["tensorrt"]._fake_classes if c.__name__ == owner)
        monkeypatch.setattr(cls, method, injected)
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"CACHE:old")
    engine = tmp_path / "m.engine"
    steps = [lambda: trt.build_engine(DIGITS / "digits.onnx", engine, timing_cache=cache,
                                      shapes=trt.parse_shapes(["image:1x1x8x8,2x1x8x8,4x1x8x8"])),
             lambda: engine.write_bytes(b"fake engine") if not engine.exists() else None,
             lambda: trt.verify_engine(parse(RELU), engine, {"image": rng.standard_normal((4, 1, 8, 8), np.float32)},
                                       batch_size=2)]
    for step in steps:
        try:
            step()
        except (trt.EngineError, MissingDependencyError) as exc:
            assert "Traceback" not in str(exc) and "\n" not in str(exc), str(exc)
    assert state.streams == set() or call == "cudart.cudaStreamDestroy", f"{call}: a stream left undestroyed"
    assert state.memory == {} or call == "cudart.cudaFree", f"{call}: device memory left allocated"


def test_missing_shapes_are_asked_for_with_an_example_from_the_model(no_tensorrt, digits_qdq, tmp_path, capsys):
    code = main(["build", str(digits_qdq), "-o", str(tmp_path / "d.engine"), "--dry-run"])
    assert code == 1
    assert "--shapes image:1x1x8x8,8x1x8x8,32x1x8x8" in capsys.readouterr().err


@pytest.mark.parametrize("clash", ["model", "verify", "timing-cache", "new-timing-cache"])
def test_build_never_writes_over_a_file_it_reads(monkeypatch, tmp_path, capsys, rng, clash):
    model = tmp_path / "relu.onnx"
    model.write_bytes(parse(RELU).SerializeToString())
    data = tmp_path / "eval.npz"
    np.savez(data, image=rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    cache = tmp_path / ("new.cache" if clash == "new-timing-cache" else "old.cache")
    if clash == "timing-cache":
        cache.write_bytes(b"an old cache")
    target = {"model": model, "verify": data}.get(clash, cache)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    fakes.install(monkeypatch, relu_engine())
    code = main(["build", str(model), "-o", str(target), "--shapes", "image:1x1x8x8,4x1x8x8,4x1x8x8",
                 "--verify", str(data), "--timing-cache", str(cache)])
    assert code == 1, capsys.readouterr()
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_failed_verify_leaves_an_existing_engine_as_it_was(monkeypatch, tmp_path, capsys, rng):
    model = tmp_path / "relu.onnx"
    model.write_bytes(parse(RELU).SerializeToString())
    data = tmp_path / "eval.npz"
    np.savez(data, image=rng.standard_normal((16, 1, 8, 8)).astype(np.float32))  # batch 16: outside the profile
    engine = tmp_path / "r.engine"
    engine.write_bytes(b"the engine of yesterday")
    fakes.install(monkeypatch, relu_engine())
    code = main(["build", str(model), "-o", str(engine), "--shapes", "image:1x1x8x8,4x1x8x8,4x1x8x8",
                 "--verify", str(data), "--batch-size", "16"])
    assert code == 1 and "outside the engine's profile" in capsys.readouterr().err
    assert engine.read_bytes() == b"the engine of yesterday"
