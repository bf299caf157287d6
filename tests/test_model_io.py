"""Loading and saving: external data, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS, run_ort

import qdq
from qdq import model_io
from qdq.errors import ModelError


def test_large_models_are_written_with_external_data(tmp_path, monkeypatch):
    # Pretend the 2 GB protobuf limit is tiny so the external-data path runs on the sample model.
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    result = qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz")
    out = result.save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 100_000
    assert out.stat().st_size < 50_000, "weights live in the data file"
    reloaded = model_io.load_model(out)
    x = {"image": np.load(DIGITS / "eval.npz")["image"][:4]}
    np.testing.assert_array_equal(run_ort(reloaded, x)[0], run_ort(result.model, x)[0])


def test_external_data_models_load_with_their_weights(tmp_path, rng):
    model = onnx.load(str(DIGITS / "digits.onnx"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    result = qdq.quantize(tmp_path / "ext.onnx", DIGITS / "calib.npz")
    assert result.report.weights == 6  # the six Convs; the 10-class head (N = 10 < 16) stays float


def test_missing_external_data_is_a_model_error(tmp_path):
    model = onnx.load(str(DIGITS / "digits.onnx"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ModelError, match="ext.onnx"):
        model_io.load_model(tmp_path / "ext.onnx")


def test_model_without_nodes_is_refused():
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    with pytest.raises(ModelError, match="no nodes"):
        model_io.load_model(empty)


def external_model(folder, location: str):
    """The sample model with its weights in an external file, then pointed at ``location``."""
    model = onnx.load(str(DIGITS / "digits.onnx"))
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    saved = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in saved.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (folder / "m.onnx").write_bytes(saved.SerializeToString())
    return folder / "m.onnx"


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, where):
    inside = tmp_path / "model"
    inside.mkdir()
    secret = tmp_path / "secret.data"
    secret.write_bytes(b"\0" * 1_000_000)
    location = {"parent": "../secret.data", "absolute": str(secret), "symlink": "link.data"}[where]
    if where == "symlink":
        (inside / "link.data").symlink_to(secret)
    path = external_model(inside, location)
    with pytest.raises(ModelError, match="outside the model's folder"):
        model_io.load_model(path)
