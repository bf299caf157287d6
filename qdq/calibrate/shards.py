"""Sharded calibration: the data's batches split into shards, each observed by its own ONNX Runtime session in
another process (local workers, or Ray tasks), and only the statistics sent back to be merged.

Ranges are bit-identical to one process's whatever the shard count or the order shards finish in: a shard is a
set of whole batches (the same batches a single process runs), statistics merge exactly (histograms grow by
powers of two, so bins nest), and the merge goes in shard order. A shard whose worker fails (an exception that is
not a QdqError, or a dead process) is run again, up to ``ATTEMPTS`` times.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

import onnx

from qdq.calibrate.data import Batch, Dataset
from qdq.calibrate.options import CalibrationOptions
from qdq.calibrate.registry import Statistic, new_statistic
from qdq.errors import CalibrationError, DataError, QdqError

log = logging.getLogger(__name__)

ATTEMPTS = 3  # runs of one shard before calibration gives up
MODEL_LIMIT = 2**31 - 1  # protobuf's serialisation limit: bigger models calibrate in one process


@dataclass(frozen=True)
class Shard:
    """The batches (by position in the dataset) one worker observes."""

    index: int
    batches: frozenset[int]


@dataclass(frozen=True)
class ShardResult:
    """What comes back from a worker: a statistic per tensor, the samples seen, and the pickled size."""

    index: int
    stats: dict[str, Statistic]
    samples: int
    nbytes: int = 0


class ShardData:
    """The batches of ``data`` in ``shard``, in their order; rereadable when ``data`` is."""

    def __init__(self, data: Dataset, shard: Shard) -> None:
        self.data, self.shard = data, shard
        self.name = f"{data.name} (shard {shard.index})"

    def runs(self) -> int:
        return len(self.shard.batches)

    def rereadable(self) -> bool:
        return self.data.rereadable()

    def __iter__(self) -> Iterator[Batch]:
        last = max(self.shard.batches, default=-1)
        for number, batch in enumerate(self.data):
            if number in self.shard.batches:
                yield batch
            if number >= last:
                return


def plan_shards(runs: int, count: int) -> list[Shard]:
    """``count`` shards of consecutive batches, as equal as possible (never an empty one)."""
    count = max(1, min(count, runs))
    bounds = [runs * k // count for k in range(count + 1)]
    return [Shard(k, frozenset(range(bounds[k], bounds[k + 1]))) for k in range(count)]


def observe_shard(model_bytes: bytes, names: list[str], data: Dataset, shard: Shard,
                  options: CalibrationOptions) -> ShardResult:
    """A worker's job: its own session over its shard. Runs in the worker process."""
    from qdq.calibrate.collect import collect_statistics

    model = onnx.load_from_string(model_bytes)
    local = replace(options, workers=1, ray_address=None)
    stats, samples = collect_statistics(model, names, ShardData(data, shard), local)
    result = ShardResult(shard.index, stats, samples)
    return replace(result, nbytes=len(pickle.dumps(result)))


def merge_results(results: list[ShardResult], names: list[str], options: CalibrationOptions
                  ) -> tuple[dict[str, Statistic], int]:
    """All shards' statistics merged in shard order, and the total samples."""
    stats = {name: new_statistic(options) for name in names}
    samples = 0
    for result in sorted(results, key=lambda r: r.index):
        for name in names:
            stats[name] = stats[name].merge(result.stats[name])
        samples += result.samples
    return stats, samples


def collect_sharded(model: onnx.ModelProto, names: list[str], data: Dataset, options: CalibrationOptions
                    ) -> tuple[dict[str, Statistic], int]:
    """Statistics of ``names`` over ``data``, observed shard by shard in other processes."""
    runs = data.runs()
    if runs is None or not data.rereadable():
        raise DataError(f"sharded calibration (--workers/--ray) needs data whose batches can be counted and read "
                        f"again (a file, a folder, a dict or a list); {data.name} is a one-shot iterator")
    if runs == 0:
        raise DataError(f"{data.name}: no batches to calibrate with")
    model_bytes = model.SerializeToString() if model.ByteSize() < MODEL_LIMIT else None
    if model_bytes is None:
        raise CalibrationError("sharded calibration sends the model to each worker, and models of 2 GB or more "
                               "cannot be serialised: calibrate this model without --workers/--ray")
    if options.ray_address is not None:
        from qdq.calibrate.ray_workers import run_on_ray

        results = run_on_ray(model_bytes, names, data, runs, options)
    else:
        results = run_in_processes(model_bytes, names, data, plan_shards(runs, options.workers), options)
    sent = sum(r.nbytes for r in results)
    log.info("calibrated %d shards; statistics sent back: %d bytes in all, at most %d per shard", len(results),
             sent, max(r.nbytes for r in results))
    return merge_results(results, names, options)


def run_in_processes(model_bytes: bytes, names: list[str], data: Dataset, shards: list[Shard],
                     options: CalibrationOptions) -> list[ShardResult]:
    """Each shard in a local worker process (spawned: no ORT threads forked), rerun when its worker fails."""
    done: dict[int, ShardResult] = {}
    failures: dict[int, int] = {}
    context = multiprocessing.get_context("spawn")
    while len(done) < len(shards):
        todo = [s for s in shards if s.index not in done]
        with ProcessPoolExecutor(max_workers=min(options.workers, len(todo)), mp_context=context) as pool:
            futures: dict[int, Future] = {s.index: pool.submit(observe_shard, model_bytes, names, data, s, options)
                                          for s in todo}
            for index, future in futures.items():
                try:
                    done[index] = future.result()
                except QdqError:
                    raise  # bad data or model: the same in every attempt
                except (BrokenProcessPool, Exception) as exc:  # noqa: PERF203 - one retry decision per shard
                    failures[index] = failures.get(index, 0) + 1
                    log.warning("shard %d failed (attempt %d of %d): %s", index, failures[index], ATTEMPTS,
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                    if failures[index] >= ATTEMPTS:
                        raise CalibrationError(f"calibration shard {index} failed {ATTEMPTS} times; last error: "
                                               f"{type(exc).__name__}: {exc}") from exc
    return [done[s.index] for s in shards]
