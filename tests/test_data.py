"""Calibration data: layouts, batching, streaming npz reads, and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest

from qdq.calibrate.data import InputSpec, open_data
from qdq.errors import DataError

IMAGE = InputSpec("image", np.dtype("float32"), ("batch", 3, 4, 4))
FIXED = InputSpec("image", np.dtype("float32"), (2, 3, 4, 4))
TOKENS = InputSpec("ids", np.dtype("int64"), (1, 7))


def images(n: int, rng) -> np.ndarray:
    return rng.normal(size=(n, 3, 4, 4)).astype(np.float32)


def batches(data) -> list:
    return list(data)


def test_npz_batches_stream_in_order_with_a_short_last_batch(tmp_path, rng):
    x = images(10, rng)
    np.savez(tmp_path / "d.npz", image=x)
    got = batches(open_data(tmp_path / "d.npz", [IMAGE], batch_size=4))
    assert [b.samples for b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b.feeds["image"] for b in got]), x)


def test_compressed_npz_streams_too(tmp_path, rng):
    x = images(5, rng)
    np.savez_compressed(tmp_path / "d.npz", image=x)
    got = batches(open_data(tmp_path / "d.npz", [IMAGE], batch_size=2))
    np.testing.assert_array_equal(np.concatenate([b.feeds["image"] for b in got]), x)


def test_fixed_batch_drops_the_incomplete_tail(tmp_path, rng, caplog):
    np.savez(tmp_path / "d.npz", image=images(5, rng))
    got = batches(open_data(tmp_path / "d.npz", [FIXED]))
    assert [b.feeds["image"].shape[0] for b in got] == [2, 2]
    assert "last 1 samples" in caplog.text


def test_stacked_layout_feeds_one_whole_input_per_run(tmp_path, rng):
    ids = rng.integers(0, 100, (6, 1, 7))
    np.savez(tmp_path / "d.npz", ids=ids)
    got = batches(open_data(tmp_path / "d.npz", [TOKENS]))
    assert len(got) == 6 and got[0].feeds["ids"].shape == (1, 7) and got[0].samples == 1
    np.testing.assert_array_equal(got[5].feeds["ids"], ids[5])


# A recurrent audio model as exported (Silero VAD): a [batch, time] signal, a [layers, batch, hidden] state whose
# batch axis is not the first, and a scalar sample rate. Such files hold one run's inputs as they are.
SIGNAL = InputSpec("input", np.dtype("float32"), ("batch", "time"))
STATE = InputSpec("state", np.dtype("float32"), (2, "batch", 128))
RATE = InputSpec("sr", np.dtype("int64"), ())


def test_a_file_of_one_runs_inputs_is_fed_as_it_is(tmp_path, rng):
    run = {"input": rng.normal(size=(1, 576)).astype(np.float32),
           "state": rng.normal(size=(2, 1, 128)).astype(np.float32), "sr": np.array(16000)}
    for k in range(3):
        np.savez(tmp_path / f"{k}.npz", **run)
    got = batches(open_data(tmp_path, [SIGNAL, STATE, RATE]))
    assert len(got) == 3 and all(b.samples == 1 for b in got)
    for name, value in run.items():
        np.testing.assert_array_equal(got[2].feeds[name], value)
    # The same from memory; a state without the rate differs from the signal in its first dim: still one run.
    got = batches(open_data({"input": run["input"], "state": run["state"]}, [SIGNAL, STATE]))
    assert len(got) == 1 and got[0].feeds["state"].shape == (2, 1, 128)


def test_one_runs_inputs_are_checked_against_the_model(tmp_path, rng):
    np.savez(tmp_path / "d.npz", input=np.zeros((1, 576), np.float32), state=np.zeros((3, 1, 128), np.float32),
             sr=np.array(16000))
    with pytest.raises(DataError, match=r"d.npz: input 'state' has shape \[3, 1, 128\], the model expects "
                                        r"float32 \[2, batch, 128\]"):
        open_data(tmp_path / "d.npz", [SIGNAL, STATE, RATE])


def test_batches_of_different_lengths_are_a_mistake_not_one_run(rng):
    scale = InputSpec("scale", np.dtype("float32"), ("batch",))
    with pytest.raises(DataError, match=r"the inputs hold different numbers of samples \(\[10, 12\]\)"):
        open_data({"image": images(10, rng), "scale": np.ones(12, np.float32)}, [IMAGE, scale])


def test_folder_of_npz_files_read_in_name_order(tmp_path, rng):
    a, b = images(3, rng), images(2, rng)
    np.savez(tmp_path / "b.npz", image=b)
    np.savez(tmp_path / "a.npz", image=a)
    got = batches(open_data(tmp_path, [IMAGE], batch_size=8))
    np.testing.assert_array_equal(np.concatenate([x.feeds["image"] for x in got]), np.concatenate([a, b]))


def test_iterable_of_feeds_is_fed_as_given(rng):
    feeds = [{"image": images(2, rng)}, {"image": images(3, rng)}]
    got = batches(open_data(feeds, [IMAGE]))
    assert [b.samples for b in got] == [2, 3]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"img": np.zeros((2, 3, 4, 4), np.float32)}, "no array for model input 'image'"),
        ({"image": np.zeros((2, 3, 4, 4), np.float32), "extra": np.zeros(2)}, "'extra' is not a model input"),
        ({"image": np.zeros((2, 3, 4, 4), np.float64)}, "is float64, the model expects float32"),
        ({"image": np.zeros((2, 3, 5, 4), np.float32)}, "has shape [2, 3, 5, 4], the model expects float32 [batch"),
        ({"image": np.zeros((2, 4, 4), np.float32)}, "has shape [2, 4, 4], expected"),
        ({"image": np.zeros((0, 3, 4, 4), np.float32)}, "holds no samples"),
    ],
    ids=["missing", "unknown", "dtype", "shape", "rank", "empty"],
)
def test_bad_npz_names_the_file_the_input_and_the_expectation(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match="bad.npz") as err:
        open_data(tmp_path / "bad.npz", [IMAGE])
    assert message in str(err.value)


def test_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="pickle"):
        open_data(tmp_path / "p.npz", [IMAGE])


def test_not_an_npz_file(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        open_data(tmp_path / "x.npz", [IMAGE])


def test_fewer_samples_than_a_fixed_batch(tmp_path, rng):
    np.savez(tmp_path / "d.npz", image=images(1, rng))
    with pytest.raises(DataError, match="1 samples, fewer than the model's fixed batch size 2"):
        open_data(tmp_path / "d.npz", [FIXED])


def test_batch_size_conflicting_with_a_fixed_batch(tmp_path, rng):
    np.savez(tmp_path / "d.npz", image=images(4, rng))
    with pytest.raises(DataError, match="fixed at 2"):
        open_data(tmp_path / "d.npz", [FIXED], batch_size=3)


def test_iterable_item_with_wrong_dtype_names_the_item(rng):
    data = open_data([{"image": images(2, rng)}, {"image": images(2, rng).astype(np.float16)}], [IMAGE])
    with pytest.raises(DataError, match="item 1 of the data: input 'image' is float16"):
        batches(data)


def test_missing_path():
    with pytest.raises(DataError, match="no such file or folder"):
        open_data("nowhere.npz", [IMAGE])


def test_head_keeps_the_first_batches_that_hold_the_samples(rng):
    specs = [InputSpec("x", np.dtype("float32"), ("batch", 3))]
    x = rng.normal(size=(10, 3)).astype(np.float32)
    head = open_data({"x": x}, specs, 4).head(5)
    batches = list(head)
    assert [b.samples for b in batches] == [4, 4], "whole batches, until 5 samples are held"
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in batches]), x[:8])
    assert head.rereadable() and head.runs() == 2 and len(list(head)) == 2
    assert head.name == "the first 8 samples of the data"
