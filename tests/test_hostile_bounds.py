"""Unbounded reads and hangs: every input is a regular file (qdq.files.regular_file), range files are read with a
size and a line limit, --num-bins is bounded, and .npz members' declared sizes are checked before inflating."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from conftest import DIGITS
from conftest import run_cli as run
from numpy.lib import format as npy_format

from qdq.calibrate import data as data_module
from qdq.calibrate.data import InputSpec, open_data
from qdq.calibrate.histogram import MAX_BINS, Histogram
from qdq.errors import DataError
from qdq.range_files import MAX_BYTES, MAX_LINES, read_ranges

# --- inputs that are not regular files are refused without being opened (a FIFO would hang) ----------------------

FIFO_INPUTS = {
    "--ranges": ["quantize", DIGITS / "digits.onnx", "-o", "{out}", "--ranges", "{fifo}"],
    "--labels": ["quantize", DIGITS / "digits.onnx", "-o", "{out}", "--calib", DIGITS / "calib.npz", "--labels",
                 "{fifo}"],
    "ranges --from": ["ranges", "--from", "{fifo}", "-o", "{out}.json"],
    "--calib": ["quantize", DIGITS / "digits.onnx", "-o", "{out}", "--calib", "{fifo}"],
    "compare --data": ["compare", DIGITS / "digits.onnx", DIGITS / "digits.onnx", "--data", "{fifo}"],
    "the model": ["quantize", "{fifo}", "-o", "{out}", "--calib", DIGITS / "calib.npz"],
}


@pytest.mark.parametrize("argv", FIFO_INPUTS.values(), ids=FIFO_INPUTS.keys())
def test_a_fifo_as_an_input_is_refused_at_once(tmp_path, capsys, argv):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    argv = [str(a).format(fifo=fifo, out=tmp_path / "o.onnx") for a in argv]
    code, _, err = run(capsys, *argv, "-q")
    assert code == 1 and "FIFO" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.onnx").exists()


def test_a_character_device_as_a_range_file_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "ranges", "--from", "/dev/zero", "-o", tmp_path / "r.json")
    assert code == 1 and "character device" in err and "/dev/zero" in err


# --- range files: a size and a line limit, said in the error -----------------------------------------------------

def test_a_range_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(DataError, match=f"limit of {MAX_BYTES / 1e6:g} MB"):
        read_ranges(big)


def test_a_range_file_over_the_line_limit_is_refused(tmp_path):
    many = tmp_path / "many.txt"
    many.write_text("\n" * (MAX_LINES + 1))
    with pytest.raises(DataError, match=f"more than qdq's limit of {MAX_LINES}"):
        read_ranges(many)


# --- --num-bins: bounded, and the histogram's memory is 8 bytes a bin at every allowed value ----------------------

def test_num_bins_above_the_bound_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", DIGITS / "digits.onnx", "-o", tmp_path / "o.onnx", "--calib",
                       DIGITS / "calib.npz", "--num-bins", "1000000")
    assert code == 2 and str(MAX_BINS) in err


def test_histogram_memory_at_the_largest_bin_count(rng):
    hist = Histogram(MAX_BINS)
    hist.update(rng.normal(size=100_000).astype(np.float32))
    hist.update(rng.normal(size=100_000).astype(np.float32) * 1000)  # doubling merges bins, never adds
    assert hist.counts.nbytes == 8 * MAX_BINS == 128 * 1024, "the README promises 128 KB per tensor at most"


# --- .npz: declared sizes checked before anything is inflated ------------------------------------------------------

def write_member(path, key: str, shape: tuple[int, ...], payload: bytes) -> None:
    """An npz whose member header declares ``shape`` but whose data is ``payload`` (a forged or bomb file)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(f"{key}.npy", "w") as stream:
        npy_format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
        stream.write(payload)


def test_a_member_declaring_more_than_its_zip_entry_holds_is_refused(tmp_path):
    write_member(tmp_path / "forged.npz", "x", (10**9, 32), bytes(4 * 32 * 4))
    spec = InputSpec("x", np.dtype(np.float32), ("N", 32))
    with pytest.raises(DataError, match="declares shape .* but its zip entry holds"):
        open_data(tmp_path / "forged.npz", [spec])


def test_a_run_over_the_memory_budget_is_refused_before_inflating(tmp_path, monkeypatch):
    # A deflate bomb: 4 MB of zeros in a few KB, one huge dynamic dimension; the budget is lowered to 1 MB here.
    monkeypatch.setattr(data_module, "RUN_BYTES_LIMIT", 1 << 20)
    write_member(tmp_path / "bomb.npz", "x", (1, 1 << 20), bytes(4 << 20))
    assert (tmp_path / "bomb.npz").stat().st_size < 64 * 1024
    spec = InputSpec("x", np.dtype(np.float32), ("N", "L"))
    with pytest.raises(DataError, match="one run of 1 samples would take .* GiB .* limit is"):
        open_data(tmp_path / "bomb.npz", [spec])


@pytest.mark.parametrize("header", [b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,", b"\x00" * 40,
                                    b"[" * 5000], ids=["unterminated", "nul", "deeply-nested"])
def test_a_corrupt_npy_header_is_one_data_error(tmp_path, header):
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as archive, archive.open("x.npy", "w") as stream:
        stream.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    with pytest.raises(DataError, match="unreadable .npy header"):
        open_data(tmp_path / "bad.npz", [InputSpec("x", np.dtype(np.float32), ("N", 4))])


def test_labels_from_the_api_refuse_a_fifo_and_a_corrupt_header(tmp_path):
    from qdq.compare import load_labels

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match="FIFO"):
        load_labels(tmp_path / "pipe")
    header = b"{'descr': '<i8', 'fo"
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    with pytest.raises(DataError, match="cannot read labels"):
        load_labels(tmp_path / "bad.npy")
