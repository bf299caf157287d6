"""Sharded calibration: local worker processes and Ray give ranges bit-identical to one process, for every method,
whatever the shard count or order; a worker that dies is retried."""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS

import qdq
from qdq.calibrate.collect import collect_ranges, collect_statistics, reduce_statistics
from qdq.calibrate.data import Dataset, InMemoryData, input_specs, open_data
from qdq.calibrate.options import CalibrationOptions
from qdq.calibrate.registry import METHODS
from qdq.calibrate.shards import ShardData, merge_results, observe_shard, plan_shards, run_in_processes
from qdq.config import QuantizeConfig
from qdq.errors import DataError
from qdq.placement import plan_quantization
from qdq.quantize import prepare


@pytest.fixture(scope="module")
def digits():
    """The prepared digits model, its planned activations, and its 128 calibration samples in 16 batches of 8."""
    model, _ = prepare(qdq.model_io.load_model(DIGITS / "digits.onnx"))
    names = plan_quantization(model).activation_names()
    with np.load(DIGITS / "calib.npz") as calib:
        arrays = {k: calib[k] for k in calib.files}
    return model, names, Dataset([InMemoryData(arrays, input_specs(model), 8)], "digits calib")


def single_process(model, names, data, options):
    return collect_statistics(model, names, data, options)


@pytest.mark.parametrize("statistic", ["histogram", "absmax"])
def test_shards_in_any_order_merge_to_the_single_process_statistics(digits, statistic):
    """In process (no spawning): every shard count from 1 to 7, shards merged in a shuffled order."""
    model, names, data = digits
    options = CalibrationOptions(method="entropy" if statistic == "histogram" else "max", num_bins=512)
    reference, samples = single_process(model, names, data, options)
    shuffle = random.Random(7)
    for count in range(1, 8):
        results = [observe_shard(model.SerializeToString(), names, data, shard, options)
                   for shard in plan_shards(data.runs(), count)]
        shuffle.shuffle(results)
        merged, merged_samples = merge_results(results, names, options)
        assert merged_samples == samples, f"{count} shards: {merged_samples} samples, expected {samples}"
        for method, spec in METHODS.items():
            if spec.statistic != statistic:
                continue
            chosen = CalibrationOptions(method=method, num_bins=512)
            want = reduce_statistics(reference, chosen, samples).amax
            got = reduce_statistics(merged, chosen, merged_samples).amax
            assert got == want, f"{method}, {count} shards: {got} != {want} (must be bit-identical)"


def test_local_workers_match_one_process_for_every_method_and_multi_pass(digits):
    model, names, data = digits
    for method in ("entropy", "max"):
        base = CalibrationOptions(method=method, num_bins=512, max_tensors_per_pass=2)
        reference, samples = single_process(model, names, data, base)
        results = run_in_processes(model.SerializeToString(), names, data, plan_shards(data.runs(), 3),
                                   CalibrationOptions(method=method, num_bins=512, max_tensors_per_pass=2,
                                                      workers=2))
        assert all(r.nbytes < 64 * 1024 for r in results), "only statistics come back"
        merged, merged_samples = merge_results(results, names, base)
        for other, spec in METHODS.items():
            if spec.statistic != METHODS[method].statistic:
                continue
            chosen = CalibrationOptions(method=other, num_bins=512)
            assert (reduce_statistics(merged, chosen, merged_samples).amax
                    == reduce_statistics(reference, chosen, samples).amax), f"{other}: workers differ from one process"


class DiesOnce:
    """A data part whose first read in a worker process kills the worker (a crash, not an exception)."""

    def __init__(self, inner: InMemoryData, marker: Path) -> None:
        self.inner, self.marker = inner, marker

    def runs(self) -> int:
        return self.inner.runs()

    def __iter__(self):
        if multiprocessing.parent_process() is not None and not self.marker.exists():
            self.marker.write_text("died")
            os._exit(3)
        yield from self.inner


def test_a_worker_that_dies_is_retried(digits, tmp_path):
    model, names, data = digits
    flaky = Dataset([DiesOnce(data.parts[0], tmp_path / "died")], "flaky data")
    options = CalibrationOptions(method="max", workers=2)
    ranges = collect_ranges(model, names, flaky, options)
    assert (tmp_path / "died").exists(), "the worker should have died once"
    reference = collect_ranges(model, names, data, CalibrationOptions(method="max"))
    assert ranges.amax == reference.amax, "the retried shard must give the same ranges"


def test_cli_workers_write_the_same_ranges_as_one_process(tmp_path):
    from qdq.cli import main

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["ranges", str(DIGITS / "digits.onnx"), "--calib", str(DIGITS / "calib.npz"), "-o", str(one),
                 "--method", "percentile", "-q"]) == 0
    assert main(["ranges", str(DIGITS / "digits.onnx"), "--calib", str(DIGITS / "calib.npz"), "-o", str(two),
                 "--method", "percentile", "--workers", "2", "-q"]) == 0
    assert one.read_text() == two.read_text(), "the range files must be identical"


def test_one_shot_data_cannot_be_sharded(digits):
    model, names, _ = digits
    feeds = iter([{"image": np.zeros((8, 1, 8, 8), np.float32)}])
    data = open_data(feeds, input_specs(model))
    with pytest.raises(DataError, match="one-shot"):
        collect_ranges(model, names, data, CalibrationOptions(method="max", workers=2))


def test_shard_data_reads_only_its_batches(digits):
    _, _, data = digits
    shards = plan_shards(data.runs(), 3)
    seen = [sum(b.samples for b in ShardData(data, s)) for s in shards]
    assert sum(seen) == 128 and min(seen) >= 8 * (16 // 3), f"shards hold {seen} samples"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install \"qdq[ray]\")")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's data classes travel by value
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


class RaisesOnce(DiesOnce):
    """A data part whose first read on a Ray worker raises (Ray reruns the task)."""

    def __iter__(self):
        if not self.marker.exists():
            self.marker.write_text("raised")
            raise RuntimeError("a flaky worker")
        yield from self.inner


def test_ray_matches_one_process_and_retries_a_failed_task(digits, ray_cluster, tmp_path):
    model, names, data = digits
    flaky = Dataset([RaisesOnce(data.parts[0], tmp_path / "raised")], "flaky data")
    options = CalibrationOptions(method="entropy", num_bins=512, ray_address="", workers=3)
    ranges = collect_ranges(model, names, flaky, options)
    assert (tmp_path / "raised").exists(), "a task should have failed once"
    reference = collect_ranges(model, names, data,
                                                     CalibrationOptions(method="entropy", num_bins=512))
    assert ranges.amax == reference.amax, "Ray's ranges must be bit-identical to one process's"


def test_missing_ray_is_exit_3(monkeypatch, tmp_path):
    from qdq.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code = main(["ranges", str(DIGITS / "digits.onnx"), "--calib", str(DIGITS / "calib.npz"),
                 "-o", str(tmp_path / "r.json"), "--method", "max", "--ray", "-q"])
    assert code == 3, "a missing optional dependency exits 3"
    assert QuantizeConfig(workers=2).calibration().sharded


def test_quantize_with_workers_writes_the_same_model(digits):
    model, _, data = digits
    arrays = data.parts[0].arrays
    one = qdq.quantize(model, arrays, config=QuantizeConfig(method="entropy", batch_size=8)).model
    two = qdq.quantize(model, arrays, config=QuantizeConfig(method="entropy", batch_size=8, workers=2)).model
    assert one.SerializeToString() == two.SerializeToString(), "workers must not change a byte of the output"
