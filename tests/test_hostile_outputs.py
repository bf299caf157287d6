"""Nothing a user owns is lost: every output is checked against every input and output of the run (qdq.files),
staged, and committed only when the whole run succeeded; special files are written through, never replaced."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS, ROOT, nodes_by_op, parse
from conftest import run_cli as run

import qdq.commands
from qdq.errors import OutputError

ARGS = ["--method", "max", "-q"]



@pytest.fixture
def folder(tmp_path) -> Path:
    """A user's folder: the sample model, its data and labels, a range file, and earlier outputs."""
    for name in ("digits.onnx", "calib.npz", "labels.npy"):
        shutil.copy(DIGITS / name, tmp_path / name)
    (tmp_path / "ranges.txt").write_text("image:1.0\n")
    (tmp_path / "a.cache").write_text("TRT-8601-EntropyCalibration2\nimage: 3c010204\n")
    (tmp_path / "out.onnx").write_bytes(b"an earlier output")
    (tmp_path / "report.html").write_text("<p>an earlier report</p>")
    return tmp_path


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, bool]]:
    """Every entry's bytes, mtime and kind: what a failed run must leave exactly as it was."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        info = os.lstat(path)
        data = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        entries[str(path.relative_to(folder))] = (data, info.st_mtime_ns, stat.S_ISREG(info.st_mode))
    return entries


# --- one output clashing with an input or another output: refused before any work, naming both -----------------

CLASHES = {
    "quantize --report MODEL": ["quantize", "digits.onnx", "-o", "new.onnx", "--calib", "calib.npz", "--report",
                                "digits.onnx"],
    "quantize -o CALIB": ["quantize", "digits.onnx", "-o", "calib.npz", "--calib", "calib.npz"],
    "quantize --report OUTPUT": ["quantize", "digits.onnx", "-o", "out.onnx", "--calib", "calib.npz", "--report",
                                 "out.onnx"],
    "quantize --save-ranges RANGES": ["quantize", "digits.onnx", "-o", "new.onnx", "--ranges", "ranges.txt",
                                      "--save-ranges", "ranges.txt"],
    "quantize --save-ranges OUTPUT (new)": ["quantize", "digits.onnx", "-o", "x.json", "--calib", "calib.npz",
                                            "--save-ranges", "x.json"],
    "quantize -o LABELS": ["quantize", "digits.onnx", "-o", "labels.npy", "--calib", "calib.npz", "--labels",
                           "labels.npy"],
    "ranges -o CALIB": ["ranges", "digits.onnx", "--calib", "calib.npz", "-o", "calib.npz", "--format", "text"],
    "ranges --from X -o X": ["ranges", "--from", "a.cache", "-o", "a.cache", "--format", "json"],
    "compare --report FLOAT": ["compare", "digits.onnx", "out.onnx", "--data", "calib.npz", "--report",
                               "digits.onnx"],
    "sensitivity --report MODEL": ["sensitivity", "digits.onnx", "--calib", "calib.npz", "--report", "digits.onnx"],
    "-o through x/../": ["quantize", "digits.onnx", "-o", "sub/../digits.onnx", "--calib", "calib.npz"],
    "-o a symlink to the model": ["quantize", "digits.onnx", "-o", "link.onnx", "--calib", "calib.npz"],
    "-o a hard link to the model": ["quantize", "digits.onnx", "-o", "hard.onnx", "--calib", "calib.npz"],
    "--report a hard link to --calib": ["quantize", "digits.onnx", "-o", "new.onnx", "--calib", "calib.npz",
                                        "--report", "calib-hard.npz"],
}


@pytest.mark.parametrize("argv", CLASHES.values(), ids=CLASHES.keys())
def test_an_output_that_is_an_input_or_another_output_is_refused(folder, capsys, monkeypatch, argv):
    (folder / "sub").mkdir()
    (folder / "link.onnx").symlink_to(folder / "digits.onnx")
    os.link(folder / "digits.onnx", folder / "hard.onnx")
    os.link(folder / "calib.npz", folder / "calib-hard.npz")
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    code, out, err = run(capsys, *argv, *ARGS[-1:])
    assert code == 1 and "would overwrite" in err and err.count("\n") == 1, err
    assert snapshot(folder) == before, "a refused run changed the folder"


def test_external_data_of_the_input_is_an_input(tmp_path, capsys, rng):
    model = parse('<ir_version: 8, opset_import: ["" : 13]>\ng (float[N, 32] x) => (float[N, 32] y) '
                  '<float[32, 32] w = {0.0}> { y = MatMul (x, w) }', rng)
    onnx.save(model, str(tmp_path / "good.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(4, 32)).astype(np.float32))
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "quantize", tmp_path / "good.onnx", "-o", tmp_path / "w.bin", "--calib",
                       tmp_path / "c.npz", "-q")
    assert code == 1 and "w.bin" in err and "external data of good.onnx" in err, err
    assert snapshot(tmp_path) == before


# --- outputs committed together: a later failure leaves the earlier outputs as they were ---------------------------

def test_a_failing_report_leaves_the_existing_output_byte_identical(folder, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OutputError("report.html: cannot write (No space left on device)")

    monkeypatch.setattr(qdq.commands, "write_report", disk_full)
    before = snapshot(folder)
    code, _, err = run(capsys, "quantize", folder / "digits.onnx", "-o", folder / "out.onnx", "--calib",
                       folder / "calib.npz", "--save-ranges", folder / "new.json", "--report",
                       folder / "report.html", *ARGS)
    assert code == 1 and "No space left" in err
    assert snapshot(folder) == before, "the -o file or a staging folder changed although the run failed"


def test_all_outputs_land_together_on_success(folder, capsys):
    code, _, err = run(capsys, "quantize", folder / "digits.onnx", "-o", folder / "out.onnx", "--calib",
                       folder / "calib.npz", "--save-ranges", folder / "new.json", "--report",
                       folder / "report.html", *ARGS)
    assert code == 0, err
    assert onnx.load(str(folder / "out.onnx")).graph.node, "the new model replaced the earlier output"
    assert (folder / "new.json").read_text().startswith("{") and "<html>" in (folder / "report.html").read_text()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_an_output_through_a_symlink_replaces_the_file_it_points_to(folder, capsys):
    (folder / "real").mkdir()
    (folder / "real" / "model.onnx").write_bytes(b"old")
    (folder / "link.onnx").symlink_to(folder / "real" / "model.onnx")
    code, _, err = run(capsys, "quantize", folder / "digits.onnx", "-o", folder / "link.onnx", "--calib",
                       folder / "calib.npz", *ARGS)
    assert code == 0, err
    assert (folder / "link.onnx").is_symlink(), "the symlink must stay a symlink"
    assert onnx.load(str(folder / "real" / "model.onnx")).graph.node


# --- targets that are not regular files: written through, never replaced ------------------------------------------

def test_a_fifo_output_is_written_through_and_stays_a_fifo(folder, capsys):
    fifo = folder / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _, err = run(capsys, "quantize", folder / "digits.onnx", "-o", fifo, "--calib", folder / "calib.npz",
                       *ARGS)
    reader.join(timeout=60)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"
    assert received and onnx.load_from_string(received[0]).graph.node, "the model did not go through the FIFO"


def test_a_socket_output_is_refused(folder, capsys):
    import socket

    path = folder / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        code, _, err = run(capsys, "quantize", folder / "digits.onnx", "-o", path, "--calib",
                           folder / "calib.npz", *ARGS)
    assert code == 1 and "a socket" in err and stat.S_ISSOCK(os.lstat(path).st_mode)


DEVICE_SCRIPT = r"""
set -u
mount -t tmpfs tmpfs "$DEV" || exit 90
mknod "$DEV/null" c 1 3 && mknod "$DEV/full" c 1 7 || exit 91
qdq() { "$PYTHON" -c 'import sys; from qdq.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
qdq quantize "$MODEL" -o "$DEV/null" --calib "$CALIB" --method max -q; echo "null exit $?"
test -c "$DEV/null" && echo "null is still a device"
qdq quantize "$MODEL" -o "$OUT" --calib "$CALIB" --method max -q --report "$DEV/full" 2>&1; echo "full exit $?"
test -c "$DEV/full" && echo "full is still a device"
"""


def test_device_outputs_are_written_through_inside_a_private_mount_namespace(folder):
    """A fake /dev/null and /dev/full on a tmpfs only this test's mount namespace sees; never the real ones."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("unshare -m is not permitted here: no private mount namespace for fake device nodes")
    (folder / "dev").mkdir()
    before = (folder / "out.onnx").read_bytes()
    env = {**os.environ, "DEV": str(folder / "dev"), "PYTHON": sys.executable, "MODEL": str(folder / "digits.onnx"),
           "CALIB": str(folder / "calib.npz"), "OUT": str(folder / "out.onnx"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["unshare", "-m", "sh", "-c", DEVICE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode in (90, 91):
        pytest.skip(f"cannot mount a tmpfs or make device nodes in the namespace: {done.stderr.strip()}")
    lines = done.stdout
    assert "null exit 0" in lines and "null is still a device" in lines, lines + done.stderr
    assert "full exit 1" in lines and "No space left on device" in lines, lines + done.stderr
    assert "full is still a device" in lines, lines
    assert (folder / "out.onnx").read_bytes() == before, "a failed --report must leave -o as it was"


# --- done when: a run that fails for any reason leaves every pre-existing file byte-identical ---------------------

FAILING = {
    "data that fits no input": ["quantize", "digits.onnx", "-o", "out.onnx", "--calib", "wrong.npz",
                                "--save-ranges", "ranges.json", "--report", "report.html"],
    "a malformed range file": ["quantize", "digits.onnx", "-o", "out.onnx", "--ranges", "bad.txt"],
    "labels of the wrong type": ["quantize", "digits.onnx", "-o", "out.onnx", "--calib", "calib.npz", "--labels",
                                 "float-labels.npy", "--report", "report.html"],
    "no finite value": ["quantize", "digits.onnx", "-o", "out.onnx", "--calib", "nan.npz", "--save-ranges",
                        "ranges.json"],
    "convert a bad cache": ["ranges", "--from", "bad.cache", "-o", "ranges.json"],
    "calibrate with missing data": ["ranges", "digits.onnx", "--calib", "none.npz", "-o", "ranges.json"],
    "compare with a broken model": ["compare", "digits.onnx", "out.onnx", "--data", "calib.npz", "--report",
                                    "report.html"],
    "sensitivity without data": ["sensitivity", "digits.onnx", "--calib", "none.npz", "--report", "report.html"],
    "a report that cannot be written": ["quantize", "digits.onnx", "-o", "out.onnx", "--calib", "calib.npz",
                                        "--save-ranges", "ranges.json", "--report", "report.html"],
    "interrupted while writing the report": ["quantize", "digits.onnx", "-o", "out.onnx", "--calib", "calib.npz",
                                             "--report", "report.html", "--json"],
}


def test_failing_runs_leave_every_file_byte_identical(folder, capsys, monkeypatch):
    np.savez(folder / "wrong.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    np.savez(folder / "nan.npz", image=np.full((4, 1, 8, 8), np.nan, np.float32))
    np.save(folder / "float-labels.npy", np.zeros(128, np.float32))
    (folder / "bad.txt").write_text("image 1.0\n")
    (folder / "bad.cache").write_text("TRT-8601-EntropyCalibration2\nimage: zz\n")
    (folder / "ranges.json").write_text('{"earlier": true}')
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    real_report = qdq.commands.write_report
    for name, argv in FAILING.items():
        def failing_report(*args, _name=name, **kwargs):
            if _name == "a report that cannot be written":
                raise OutputError("report.html: cannot write (No space left on device)")
            if _name.startswith("interrupted"):
                raise KeyboardInterrupt
            return real_report(*args, **kwargs)

        monkeypatch.setattr(qdq.commands, "write_report", failing_report)
        code, _, err = run(capsys, *argv, "-q")
        assert code != 0, f"{name}: expected a failure, got exit 0"
        assert "internal error" not in err, f"{name}: {err}"
        assert snapshot(folder) == before, f"{name}: a failed run changed the folder"


# A detector's head: scores kept above a threshold, so the output's length depends on the values; INT8 rounding
# moves some scores across the threshold (as torchvision's score_thresh before NMS).
THRESHOLDED = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 8, 8, 8] x) => (float[n] kept, float[1, 16, 8, 8] s) <float[16, 8, 3, 3] w = {0.0},
    int64[1] flat = {-1}, float threshold = {2.0}> {
  s = Conv <pads = [1, 1, 1, 1]> (x, w)
  f = Reshape (s, flat)
  keep = Greater (f, threshold)
  kept = Compress <axis = 0> (f, keep)
}"""


def test_an_output_whose_length_depends_on_its_values_is_compared_where_the_shapes_agree(rng, capsys, tmp_path):
    model = parse(THRESHOLDED, rng)
    x = rng.normal(size=(64, 1, 8, 8, 8)).astype(np.float32)  # stacked runs of batch 1
    result = qdq.quantize(model, {"x": x}, evaluation_data={"x": x})
    kept, s = result.report.comparison.outputs
    assert kept.shape_mismatches > 0, "some scores must have crossed the threshold for this test to test anything"
    assert kept.shape_mismatches < 64 and not np.isnan(kept.sqnr_db), "the runs of equal length are compared"
    assert s.shape_mismatches == 0 and s.sqnr_db > 30
    path, data = tmp_path / "m.onnx", tmp_path / "x.npz"
    onnx.save(model, path)
    np.savez(data, x=x)
    code, out, _ = run(capsys, "quantize", path, "--calib", data, "-o", tmp_path / "q.onnx")
    assert code == 0 and "kept: float and int8 gave it different shapes on" in out, out


def no_detections_model(rng: np.random.Generator) -> onnx.ModelProto:
    """FCOS-style post-processing: the boxes whose score passes a threshold (none here), reshaped through
    [M, 2, 2] by shapes computed from Shape, as torchvision's export at opset 17 writes it."""
    h, T = onnx.helper, onnx.TensorProto

    def ints(name, values):
        return onnx.numpy_helper.from_array(np.array(values, np.int64), name)
    nodes = [h.make_node("Conv", ["x", "w"], ["f"], pads=[1, 1, 1, 1]),
             h.make_node("Reshape", ["f", "rows5"], ["p"]),
             h.make_node("Slice", ["p", "i0", "i4", "i1"], ["boxes_all"]),
             h.make_node("Slice", ["p", "i4", "i5", "i1"], ["score2d"]),
             h.make_node("Reshape", ["score2d", "flat"], ["score"]),
             h.make_node("Greater", ["score", "threshold"], ["keep"]),
             h.make_node("NonZero", ["keep"], ["nz"]),
             h.make_node("Reshape", ["nz", "flat"], ["idx"]),
             h.make_node("Gather", ["boxes_all", "idx"], ["b"], axis=0),
             h.make_node("Shape", ["b"], ["sb"]),
             h.make_node("Gather", ["sb", "z0"], ["d0"], axis=0),
             h.make_node("Gather", ["sb", "z1"], ["d1"], axis=0),
             h.make_node("Unsqueeze", ["d0", "ax0"], ["u0"]),
             h.make_node("Unsqueeze", ["d1", "ax0"], ["u1"]),
             h.make_node("Concat", ["u0", "two", "two"], ["s3"], axis=0),
             h.make_node("Reshape", ["b", "s3"], ["c"]),
             h.make_node("Concat", ["u0", "u1"], ["s2"], axis=0),
             h.make_node("Reshape", ["c", "s2"], ["boxes"])]
    inits = [onnx.numpy_helper.from_array((rng.standard_normal((5, 16, 3, 3)) * 0.2).astype(np.float32), "w"),
             ints("rows5", [-1, 5]), ints("flat", [-1]), ints("i0", [0]), ints("i1", [1]), ints("i4", [4]),
             ints("i5", [5]), onnx.numpy_helper.from_array(np.array(100.0, np.float32), "threshold"),
             ints("z0", 0), ints("z1", 1), ints("ax0", [0]), ints("two", [2])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 16, 8, 8])],
                         [h.make_tensor_value_info("boxes", T.FLOAT, ["M", 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_detector_that_keeps_no_box_quantizes_and_its_output_runs_with_ort_optimisations(rng):
    """With data-propagated shapes in its value_info, ONNX Runtime's optimiser rewrote the last Reshape to
    [0, -1], which an empty tensor cannot take: calibration failed (torchvision's FCOS and RetinaNet at opset 17),
    and a model written with them would fail for its users on an image without detections."""
    data = {"x": rng.random((16, 16, 8, 8), dtype=np.float32)}
    result = qdq.quantize(no_detections_model(rng), data)
    assert nodes_by_op(result.model, "QuantizeLinear")
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": data["x"][:1]})[0].shape == (0, 4)


def test_an_integer_output_is_marked_so_no_low_sqnr_warning_reads_class_ids_as_a_signal():
    from qdq.compare import OutputAccumulator

    labels = OutputAccumulator()
    labels.update(np.array([[3], [7]], np.int64), np.array([[3], [2]], np.int64))
    scores = OutputAccumulator()
    scores.update(np.array([0.5, 0.25], np.float32), np.array([0.5, 0.5], np.float32))
    assert labels.metrics("labels").integer and not scores.metrics("scores").integer


def test_keep_or_drop_checks_read_float_outputs_and_stop_at_a_non_finite_one():
    from qdq.compare import OutputMetrics, worst_sqnr

    floats = OutputMetrics("scores", 31.0, 0.1)
    token_ids = OutputMetrics("tokens", 0.4, 3.0, integer=True)  # one flipped id in 32
    thresholded = OutputMetrics("kept", float("nan"), float("nan"), shape_mismatches=8)
    non_finite = OutputMetrics("logits", float("nan"), float("nan"))
    assert worst_sqnr([floats, token_ids, thresholded]) == 31.0
    assert np.isnan(worst_sqnr([floats, non_finite, token_ids])), "a NaN output leaves the decision undecided"
    assert np.isnan(worst_sqnr([token_ids]))
