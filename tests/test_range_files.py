"""Range files: TensorRT dynamic-range text, calibration caches, qdq JSON; reading, writing, applying."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from conftest import DIGITS, ROOT, nodes_by_op, run_ort

import qdq
from qdq.cli import main
from qdq.errors import CalibrationError, DataError
from qdq.range_files import detect_format, parse_ranges, read_ranges, render_cache, write_ranges
from qdq.scheme import INT8

SHARED = ROOT.parent / "shared" / "data"
TRT_TEXT = SHARED / "trt-sample-resnet50-dynamic-range.txt"
CAFFE2_RESNET = SHARED / "resnet50-caffe2-names.onnx"
needs_shared = pytest.mark.skipif(not TRT_TEXT.exists(), reason="../shared/data (TensorRT's sample ranges) is absent")

CACHE = """TRT-8601-EntropyCalibration2
image: 3c010a14
relu: 3d8f5c29
(Unnamed Layer* 3) [Shuffle]_output: 3e4ccccd
"""


def bits(x: float) -> str:
    return f"{struct.unpack('>I', struct.pack('>f', x))[0]:x}"


def q_scales(model: onnx.ModelProto) -> dict[str, np.float32]:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {q.input[0]: inits[q.input[1]] for q in nodes_by_op(model, "QuantizeLinear")}


@needs_shared
def test_trt_sample_ranges_quantize_resnet50_without_data(caplog):
    ranges = read_ranges(TRT_TEXT)
    result = qdq.quantize(CAFFE2_RESNET, ranges=ranges)
    text = dict(line.rsplit(":", 1) for line in TRT_TEXT.read_text().splitlines() if line.strip())
    scales = q_scales(result.model)
    assert len(scales) == len(result.plan.activation_names()) > 50  # Conv/Gemm inputs, residual skips, pools
    for tensor, scale in scales.items():
        source = "gpu_0/pool5_1" if tensor == "gpu_0/pool5_reshape_1" else tensor  # a Reshape copies its input
        expected = np.float32(float(text[source]) / INT8.qmax)
        assert scale.tobytes() == expected.tobytes(), f"{tensor}: {scale!r} != {expected!r}"
    assert "2 names in the range file are not tensors of this model" in caplog.text
    assert "(Unnamed Layer* 174) [Shuffle]_output" in caplog.text and "(Unnamed Layer* 175)" in caplog.text
    assert any("pool5_reshape_1" in note for note in result.report.notes)
    out, = run_ort(result.model, {"gpu_0/data_0": np.random.default_rng(0).random((1, 3, 224, 224), np.float32)})
    assert out.shape == (1, 1000) and np.isfinite(out).all()


def test_format_is_detected_from_content():
    assert detect_format(CACHE) == "cache"
    assert detect_format('{"format": "qdq-ranges"}') == "json"
    assert detect_format("gpu_0/conv1_1:5.43\n") == "text"


def test_cache_read_and_written_back_is_identical():
    ranges = parse_ranges(CACHE, "c.cache")
    assert render_cache(ranges) == CACHE
    assert ranges.scale("image") == struct.unpack(">f", bytes.fromhex("3c010a14"))[0]
    assert ranges.method == "EntropyCalibration2"


def test_text_splits_on_the_last_colon():
    ranges = parse_ranges("a:b c:1.5\n\n(Unnamed Layer* 1) [Shuffle]_output:2\n", "r.txt")
    assert ranges.amax == {"a:b c": 1.5, "(Unnamed Layer* 1) [Shuffle]_output": 2.0}


@pytest.mark.parametrize("first", ["text", "cache", "json"])
@pytest.mark.parametrize("second", ["text", "cache", "json"])
def test_round_trips_keep_every_scale_bit_for_bit(tmp_path, first, second):
    original = parse_ranges(CACHE, "c.cache")
    write_ranges(original, tmp_path / "a", first)
    write_ranges(read_ranges(tmp_path / "a"), tmp_path / "b", second)
    again = read_ranges(tmp_path / "b")
    assert list(again) == list(original)
    for name in original:
        assert np.float32(again.scale(name)).tobytes() == np.float32(original.scale(name)).tobytes(), name


def test_text_amax_gives_float32_amax_over_127(tmp_path):
    ranges = parse_ranges("x:0.1\n", "r.txt")
    assert np.float32(ranges.scale("x")) == np.float32(0.1 / 127)
    write_ranges(ranges, tmp_path / "r.cache")
    assert (tmp_path / "r.cache").read_text().splitlines()[1] == f"x: {bits(np.float32(0.1 / 127))}"


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("a:1\nb:0\n", ":2", "finite and > 0"),
        ("a:-3\n", ":1", "finite and > 0"),
        ("a:nan\n", ":1", "finite and > 0"),
        ("a:inf\n", ":1", "finite and > 0"),
        ("a:1\nno colon here\n", ":2", "expected 'name:value'"),
        ("a:one\n", ":1", "not a number"),
        ("a:1\nb:2\na:3\n", ":3", "given twice with different values"),
        ("TRT-8601-EntropyCalibration2\na: zz\n", ":2", "not the hex bits of a float32"),
        ("TRT-8601-EntropyCalibration2\na: 7f800000\n", ":2", "finite and > 0"),
        ("TRT-8601-EntropyCalibration2\na: bf800000\n", ":2", "finite and > 0"),
        ("TRT-8601-EntropyCalibration2\na 3c010a14\n", ":2", "expected 'name: value'"),
        ("TRT-garbage\na: 3c010a14\n", ":1", "cache header"),
    ],
    ids=["zero", "negative", "nan", "inf", "no-colon", "not-number", "duplicate", "bad-hex", "inf-bits",
         "negative-bits", "cache-no-colon", "bad-header"],
)
def test_malformed_lines_name_the_line(text, where, message):
    with pytest.raises(DataError) as err:
        parse_ranges(text, "r")
    assert f"r{where}:" in str(err.value) and message in str(err.value), str(err.value)


def test_cache_zero_scale_means_no_range(caplog):
    ranges = parse_ranges("TRT-8601-EntropyCalibration2\na: 0\nb: 3c010a14\n", "c")
    assert list(ranges) == ["b"] and "scale 0" in caplog.text


def test_duplicate_with_the_same_value_is_fine():
    assert parse_ranges("a:1.5\na:1.5\n", "r").amax == {"a": 1.5}


def digits_ranges() -> qdq.TensorRanges:
    return qdq.calibrate(DIGITS / "digits.onnx", DIGITS / "calib.npz")


def test_partial_ranges_calibrate_only_the_missing_tensors():
    full = digits_ranges()
    names = list(full)
    given = qdq.TensorRanges({names[0]: 123.0}, method="text")
    # optimize=0: with 123 for the input, the first Conv makes most of the noise, and dominant-layer leaves it float
    result = qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz", ranges=given,
                          config=qdq.QuantizeConfig(optimize=0))
    scales = q_scales(result.model)
    assert scales[names[0]] == np.float32(123.0 / INT8.qmax)
    for name in names[1:]:
        assert scales[name] == np.float32(full.amax[name] / INT8.qmax), name


def test_missing_ranges_without_data_list_names_and_suggest_near_ones():
    full = digits_ranges()
    names = list(full)
    given = qdq.TensorRanges({n + "_x": full.amax[n] for n in names[:-1]} | {names[-1]: 1.0}, method="text")
    with pytest.raises(CalibrationError) as err:
        qdq.quantize(DIGITS / "digits.onnx", ranges=given)
    message = str(err.value)
    assert f"{len(names) - 1} tensors to quantize have no range" in message
    assert f"'{names[0]}' (did you mean '{names[0]}_x'?)" in message


def test_cli_collects_converts_and_applies_a_cache(tmp_path, capsys):
    cache, text = tmp_path / "r.cache", tmp_path / "r.txt"
    assert main(["ranges", str(DIGITS / "digits.onnx"), "--calib", str(DIGITS / "calib.npz"), "-o", str(cache)]) == 0
    assert cache.read_text().startswith("TRT-")
    assert main(["ranges", "--from", str(cache), "-o", str(text)]) == 0
    assert main(["quantize", str(DIGITS / "digits.onnx"), "--ranges", str(cache), "-o", str(tmp_path / "m.onnx")]) == 0
    expected = {line.split(": ")[0]: struct.unpack(">f", struct.pack(">I", int(line.split(": ")[1], 16)))[0]
                for line in cache.read_text().splitlines()[1:]}
    scales = q_scales(onnx.load(str(tmp_path / "m.onnx")))
    assert scales.keys() == expected.keys()
    assert all(scales[n] == np.float32(expected[n]) for n in expected)
    assert "wrote 6 ranges" in capsys.readouterr().out


def test_cli_ranges_usage_errors(tmp_path, capsys):
    assert main(["ranges", "-o", str(tmp_path / "r.txt")]) == 2
    assert "give MODEL and --calib" in capsys.readouterr().err
    assert main(["ranges", "--from", str(tmp_path / "none.txt"), "-o", str(tmp_path / "r.bin")]) == 1
    assert "cannot tell the range format" in capsys.readouterr().err
