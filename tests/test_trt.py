"""The TensorRT module, tested without TensorRT: layer summaries, trtexec, shapes, the missing-TensorRT path.

The build itself needs TensorRT and a GPU: that test skips with the reason where they are absent.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import DIGITS, ROOT

from qdq import trt
from qdq.cli import main
from qdq.errors import MissingDependencyError, QdqError

INSPECTOR = json.loads((ROOT / "tests" / "data" / "inspector.json").read_text())
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_layer_summary_counts_precisions_and_flags_quantized_layers_not_in_int8():
    summary = trt.summarize_layers(INSPECTOR, quantized_nodes={"Conv_c1", "Conv_c2", "Add_y", "Gemm_head"})
    assert summary.layers == 5
    assert summary.by_precision == {"FP32": 1, "INT8": 2, "FP16": 2}
    assert summary.not_int8 == (("Gemm_head", "FP16"),)
    text = summary.describe()
    assert "5 engine layers: 2 INT8, 2 FP16, 1 FP32" in text and "not INT8 (FP16): Gemm_head" in text


def test_layer_summary_of_an_engine_built_without_detailed_verbosity():
    # Without ProfilingVerbosity.DETAILED the inspector lists layer names only.
    assert trt.summarize_layers({"Layers": ["Conv_c1 + Relu_r"], "Bindings": []}).layers == 0


def test_trtexec_command_line():
    shapes = trt.parse_shapes(["image:1x1x8x8,8x1x8x8,32x1x8x8"])
    command = trt.trtexec_command(DIGITS / "m.onnx", DIGITS / "m.engine", workspace_mb=1024,
                                  timing_cache=DIGITS / "t.cache", shapes=shapes)
    assert command.startswith("trtexec --onnx=") and "--stronglyTyped" in command
    assert "--memPoolSize=workspace:1024M" in command and "--timingCacheFile=" in command
    assert "--minShapes=image:1x1x8x8 --optShapes=image:8x1x8x8 --maxShapes=image:32x1x8x8" in command


def test_shapes_parse_fixed_and_ranges_and_reject_the_rest():
    assert trt.parse_shapes(["a:b:1x3"]) == {"a:b": ((1, 3), (1, 3), (1, 3))}
    for bad in ("image", "image:1xx3", "image:1x3,2x3", "image:0x3"):
        with pytest.raises(QdqError, match="--shapes"):
            trt.parse_shapes([bad])


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


def test_missing_tensorrt_is_a_clear_error_with_exit_code_3(no_tensorrt, tmp_path, capsys):
    with pytest.raises(MissingDependencyError, match=r"pip install 'qdq\[trt\]'"):
        trt.build_engine(DIGITS / "digits.onnx", tmp_path / "e.engine")
    code = main(["build", str(DIGITS / "digits.onnx"), "-o", str(tmp_path / "e.engine")])
    out, err = capsys.readouterr()
    assert code == 3 and "TensorRT is not installed" in err and "Traceback" not in err
    assert out.startswith("trtexec --onnx="), "the equivalent trtexec command is printed even without TensorRT"
    assert not (tmp_path / "e.engine").exists()


def test_tensorrt_is_imported_only_by_its_module():
    sources = [p for p in (ROOT / "qdq").rglob("*.py") if p.name != "trt.py"]
    assert all("import tensorrt" not in p.read_text() for p in sources)


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed (its wheels need NVIDIA's index and a GPU)")
def test_build_the_sample_model_and_find_int8_layers(tmp_path):
    import qdq

    model = tmp_path / "digits.qdq.onnx"
    qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz").save(model)
    shapes = trt.parse_shapes(["image:1x1x8x8,8x1x8x8,32x1x8x8"])
    result = trt.build_engine(model, tmp_path / "digits.engine", shapes=shapes)
    assert result.summary.by_precision.get("INT8", 0) >= 5
    comparison = trt.verify_engine(qdq.model_io.load_model(model), result.engine, DIGITS / "eval.npz", batch_size=8)
    assert comparison.outputs[0].sqnr_db > 30
