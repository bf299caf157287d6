"""Messages and formats: --json is strict JSON on its own on stdout (commands.print_json), names from models and
files are escaped and shortened on every line qdq prints (errors.printable, the CLI's log formatter), stderr
carries qdq's lines only, and hints name things that exist."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from conftest import DIGITS, ROOT, parse
from conftest import run_cli as run
from onnx import TensorProto, helper, numpy_helper

import qdq
from qdq.calibrate.data import InputSpec, check_array
from qdq.errors import DataError, printable, shown

HEADER = '<ir_version: 8, opset_import: ["" : 13]>'
MATMUL = HEADER + """
g (float[N, 32] x) => (float[N, 32] y) <float[32, 32] w = {0.0}> { y = MatMul (x, w) }"""
HOSTILE = "evil\x1b[31m\x07\x00name" + "x" * 5000



def strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def hostile_model(tmp_path, rng) -> None:
    """The MatMul model with its input, weight and node named by an attacker."""
    model = parse(MATMUL, rng)
    for graph_input in model.graph.input:
        graph_input.name = HOSTILE
    model.graph.node[0].input[0] = HOSTILE
    model.graph.node[0].name = HOSTILE + "node"
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", **{HOSTILE: rng.normal(size=(8, 32)).astype(np.float32)})


# --- --json: strict, alone on stdout --------------------------------------------------------------------------------

def test_json_is_strict_when_a_metric_is_infinite(tmp_path, capsys, rng):
    # All-zero data: the quantized output equals the float one exactly, an infinite SQNR. JSON says null.
    onnx.save(parse(MATMUL, rng), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "z.npz", x=np.zeros((4, 32), np.float32))
    code, out, err = run(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--calib",
                         tmp_path / "z.npz", "--json", "-q")
    assert code == 0, err
    doc = strict_json(out)
    assert doc["comparison"]["outputs"][0]["sqnr_db"] is None


def test_json_with_explain_is_one_json_document(tmp_path, capsys):
    code, out, err = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", tmp_path / "o.onnx", "--calib",
                         DIGITS / "calib.npz", "--method", "max", "--json", "--explain", "-q")
    assert code == 0, err
    doc = strict_json(out)
    assert doc["plan"] and doc["quantized_nodes"] == 8


# --- names from files: control characters escaped, long names shortened -------------------------------------------

def test_printable_escapes_and_shortens():
    line = printable(f"tensor {HOSTILE} is odd")
    assert "\x1b" not in line and "\x07" not in line and "\x00" not in line and len(line) < 300
    assert "\\x1b" in line and "characters)" in line
    assert len(shown(HOSTILE)) < 120 and "\\x1b" in shown(HOSTILE)


def test_hostile_names_reach_the_terminal_escaped(tmp_path, capsys, rng):
    hostile_model(tmp_path, rng)
    for argv in (["explain", tmp_path / "m.onnx"],
                 ["quantize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--calib", tmp_path / "d.npz",
                  "--method", "max", "--explain"],
                 ["quantize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--ranges", tmp_path / "r.txt"]):
        (tmp_path / "r.txt").write_text(f"{HOSTILE}z:1.0\n")  # near the real name: "did you mean" quotes both
        code, out, err = run(capsys, *argv)
        for text in (out, err):
            assert not any(c in text for c in "\x1b\x07\x00"), f"{argv[0]}: a raw control character was printed"
            assert max(map(len, text.splitlines() or [""])) <= 2100, f"{argv[0]}: a line of {len(text)} characters"


def test_stderr_carries_only_qdq_lines(tmp_path):
    """Subnormal data (numpy warnings) and an unused initializer (an ORT log line) in a separate process."""
    model = parse(MATMUL, np.random.default_rng(0))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=(np.random.default_rng(1).normal(size=(8, 32)) * 1e-40).astype(np.float32))
    done = subprocess.run([sys.executable, "-c", "import sys; from qdq.cli import main; sys.exit(main(sys.argv[1:]))",
                           "quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib",
                           str(tmp_path / "d.npz"), "--method", "entropy"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    strays = [line for line in done.stderr.splitlines() if not line.startswith("qdq: ")]
    assert not strays, f"lines on stderr that are not qdq's: {strays[:3]}"


# --- hints and notes --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, hint", [
    (np.dtype(np.float16), "np.float16"),
    (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)), "ml_dtypes.bfloat16"),
    (np.dtype(object), "strings"),
], ids=["float16", "bfloat16", "string"])
def test_dtype_hints_name_things_that_exist(dtype, hint):
    with pytest.raises(DataError) as err:
        check_array("d", InputSpec("x", dtype, ("N",)), np.dtype(np.float32), (4,), leading=1)
    assert hint in str(err.value) and "np.bfloat16" not in str(err.value) and "np.object" not in str(err.value)


def test_a_graph_input_that_is_also_an_initializer_is_noted(rng):
    model = parse(MATMUL, rng)
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [32, 32]))
    result = qdq.quantize(model, {"x": rng.normal(size=(4, 32)).astype(np.float32)})
    assert any("also have an initializer ('w')" in note for note in result.report.notes), result.report.notes


def test_view_on_a_missing_file_is_exit_1_and_a_bad_port_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "view", tmp_path / "none.onnx")
    assert code == 1 and "no such file" in err
    code, _, err = run(capsys, "view", DIGITS / "digits.onnx", "--port", "70000")
    assert code == 2 and "between 1 and 65535" in err


def test_numpy_warnings_stay_off_stderr(capsys, monkeypatch):
    import qdq.commands

    real = qdq.commands.load_model

    def load_noisily(path):
        np.log(np.zeros(1, np.float32))  # RuntimeWarning: divide by zero
        return real(path)

    monkeypatch.setattr(qdq.commands, "load_model", load_noisily)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that reached the default handling would fail the command
        code, _, err = run(capsys, "inspect", DIGITS / "digits.onnx")
    assert code == 0 and "RuntimeWarning" not in err, err
