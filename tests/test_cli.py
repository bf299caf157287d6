"""The ``qdq`` command end to end: the sample model, determinism, and every error a user can cause."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import DIGITS, parse, read_only
from conftest import run_cli as run

from qdq.cli import main

DEMO = ["--calib", str(DIGITS / "calib.npz"), "--eval", str(DIGITS / "eval.npz"),
        "--labels", str(DIGITS / "labels.npy")]



def test_sample_model_quantizes_and_keeps_its_accuracy(tmp_path, capsys):
    out = tmp_path / "digits.qdq.onnx"
    before = read_only(DIGITS / "digits.onnx")
    code, stdout, _ = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", out, *DEMO)
    assert code == 0
    assert read_only(DIGITS / "digits.onnx") == before, "the input model is never modified"
    onnx.checker.check_model(str(out), full_check=True)
    line = next(x for x in stdout.splitlines() if x.startswith("accuracy:"))
    float_acc, int8_acc = (float(w.rstrip("%")) for w in line.split() if w.endswith("%"))
    assert float_acc > 97 and abs(float_acc - int8_acc) <= 1.0, line
    sqnr = float(next(x for x in stdout.splitlines() if x.strip().startswith("logits")).split()[1])
    assert sqnr > 30, stdout


def test_same_inputs_give_byte_identical_output(tmp_path, capsys):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (first, second):
        assert run(capsys, "quantize", DIGITS / "digits.onnx", "-o", out, "--calib", DIGITS / "calib.npz")[0] == 0
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("level, data", [("0", ()), ("1", ("--calib", DIGITS / "calib.npz"))],
                         ids=["optimize-0-without-data", "default-with-data-for-bias-correction"])
def test_saved_ranges_reproduce_the_model(level, data, tmp_path, capsys):
    """Ranges alone reproduce a model at --optimize 0; bias correction (level 1) also needs the data again."""
    ranges, first, second = tmp_path / "r.json", tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run(capsys, "quantize", DIGITS / "digits.onnx", "-o", first, "--calib", DIGITS / "calib.npz",
               "--save-ranges", ranges, "--optimize", level)[0] == 0
    assert run(capsys, "quantize", DIGITS / "digits.onnx", "-o", second, "--ranges", ranges, "--optimize", level,
               *data)[0] == 0
    assert first.read_bytes() == second.read_bytes()


def test_console_script_runs(tmp_path):
    out = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "qdq.cli", "quantize", str(DIGITS / "digits.onnx"), "-o", str(out),
                           "--calib", str(DIGITS / "calib.npz"), "-q"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and out.exists()


def bad_models(tmp_path):
    digits = (DIGITS / "digits.onnx").read_bytes()
    broken = parse('<ir_version: 8, opset_import: ["" : 13]> g (float[2] x) => (float[2] y) { y = Relu (x) }')
    broken.graph.node[0].input[0] = "undefined_tensor"
    files = {
        "empty": b"",
        "random": np.random.default_rng(0).bytes(2048),
        "truncated": digits[: len(digits) // 2],
        "invalid": broken.SerializeToString(),
    }
    for name, content in files.items():
        (tmp_path / f"{name}.onnx").write_bytes(content)
    return files


@pytest.mark.parametrize(
    ("model", "message"),
    [("missing", "no such file"), ("empty", "empty"), ("random", "not a readable ONNX model"),
     ("truncated", "not a readable ONNX model"), ("invalid", "invalid ONNX model")],
)
def test_bad_models_fail_in_one_line_without_output(tmp_path, capsys, model, message):
    bad_models(tmp_path)
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, "quantize", tmp_path / f"{model}.onnx", "-o", out, "--calib", DIGITS / "calib.npz")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("qdq: error:") and message in err, err
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]


def test_data_that_does_not_fit_the_model(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", out, "--calib", tmp_path / "bad.npz")
    assert code == 1 and "bad.npz: no array for model input 'image'" in err and not out.exists()


def test_no_data_and_no_ranges(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", tmp_path / "o.onnx")
    assert code == 1 and "have no range" in err and "pass calibration data" in err


def test_output_over_the_input_is_refused(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes((DIGITS / "digits.onnx").read_bytes())
    before = read_only(model)
    code, _, err = run(capsys, "quantize", model, "-o", model, "--calib", DIGITS / "calib.npz")
    assert code == 1 and "overwrite the input" in err
    assert read_only(model) == before


def test_output_directory_must_exist(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", tmp_path / "no" / "m.onnx",
                       "--calib", DIGITS / "calib.npz")
    assert code == 1 and "does not exist" in err


def test_failure_mid_write_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous result")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    code, _, err = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", out, "--calib", DIGITS / "calib.npz")
    assert code == 1 and "No space left on device" in err
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "no staging leftovers"


def test_already_quantized_model_is_refused(tmp_path, capsys):
    once = tmp_path / "once.onnx"
    assert run(capsys, "quantize", DIGITS / "digits.onnx", "-o", once, "--calib", DIGITS / "calib.npz")[0] == 0
    code, _, err = run(capsys, "quantize", once, "-o", tmp_path / "twice.onnx", "--calib", DIGITS / "calib.npz")
    assert code == 1 and "already quantized" in err and not (tmp_path / "twice.onnx").exists()


def test_nothing_to_quantize_writes_the_float_model_and_says_so(tmp_path, capsys):
    model = tmp_path / "relu.onnx"
    onnx.save(parse('<ir_version: 8, opset_import: ["" : 13]> g (float[N, 4] x) => (float[N, 4] y) '
                    "{ y = Relu (x) }"), str(model))
    np.savez(tmp_path / "d.npz", x=np.ones((3, 4), np.float32))
    code, stdout, err = run(capsys, "quantize", model, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "d.npz")
    assert code == 0 and "nothing to quantize" in err
    assert [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node] == ["Relu"]


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "model.onnx"])
    assert exit_info.value.code == 2


def test_quantize_json_summary(tmp_path, capsys):
    import json

    code, out, _ = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", tmp_path / "m.onnx", *DEMO, "--json", "-q")
    assert code == 0
    doc = json.loads(out)
    assert doc["activations"] == 6 and doc["comparison"]["quant_accuracy"] > 0.97 and "relu_2" in doc["ranges"]


def test_explain_says_each_preparation_note_once(capsys, tmp_path, rng):
    """explain prints the plan and the techniques: the model is prepared once for both."""
    model = parse('<ir_version: 7, opset_import: ["" : 11]> g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) '
                  "<float[16, 16, 3, 3] w = {0.0}> { y = Conv <pads = [1, 1, 1, 1]> (x, w) }", rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, _, err = run(capsys, "explain", path)
    assert code == 0 and err.count("opset raised from 11 to 13") == 1, err
