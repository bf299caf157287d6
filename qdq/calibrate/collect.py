"""Collect activation ranges: observe the planned tensors batch by batch, fold them into mergeable statistics,
and reduce each statistic to an amax by the method's function.

``collect_statistics`` is the part that shards (see ``shards.py``): its result merges exactly, so ranges do not
depend on how the data was split.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from tqdm import tqdm

from qdq.calibrate.auto import AUTO_SAMPLES, Recording, choose, first_samples
from qdq.calibrate.data import Dataset
from qdq.calibrate.histogram import Histogram
from qdq.calibrate.methods import quiet_cap
from qdq.calibrate.observer import OBSERVERS
from qdq.calibrate.options import CalibrationOptions
from qdq.calibrate.registry import METHODS, Statistic, method_amax, new_statistic
from qdq.errors import CalibrationError, DataError
from qdq.placement import QuantPlan, plan_quantization
from qdq.ranges import TensorRanges

log = logging.getLogger(__name__)


def collect_ranges(model: onnx.ModelProto, names: list[str], data: Dataset,
                   options: CalibrationOptions | None = None, *, plan: QuantPlan | None = None,
                   progress: bool = False) -> TensorRanges:
    """The amax of each tensor in ``names`` over all of ``data``, by ``options.method``.

    A copy of the model exposes the tensors as outputs, at most ``options.max_tensors_per_pass`` at a time (more
    tensors: more passes over the data). Each batch's values are reduced into a fixed-size statistic per tensor
    and dropped, so memory does not grow with the amount of data. With ``workers``/``ray_address`` the data is
    split into shards, each observed by its own session; only the statistics come back.

    ``auto`` then scores candidates on the consumers of each tensor as ``plan`` places them (default: the plan of
    ``model`` with default placement), on the first ``AUTO_SAMPLES`` samples (kept while the data streams by).
    """
    options = options or CalibrationOptions()
    started = time.perf_counter()
    recording = Recording(data, AUTO_SAMPLES) if options.method == "auto" and not options.sharded else None
    if options.sharded:
        from qdq.calibrate.shards import collect_sharded

        stats, samples = collect_sharded(model, names, data, options)
    else:
        stats, samples = collect_statistics(model, names, recording or data, options, progress=progress)
    log.info("calibrated %d tensors (%s) on %d samples in %.1f s", len(names), options.method, samples,
             time.perf_counter() - started)
    ranges = reduce_statistics(stats, options, samples)
    if options.method != "auto":
        return ranges
    sample = recording.kept if recording else first_samples(data, AUTO_SAMPLES)
    amax, sources = choose(model, plan or plan_quantization(model), dict(ranges.histograms), sample,
                           options.max_tensors_per_pass, options.scheme)
    return dataclasses.replace(ranges, amax=amax, sources=sources)


def collect_statistics(model: onnx.ModelProto, names: list[str], data: Dataset, options: CalibrationOptions,
                       *, progress: bool = False) -> tuple[dict[str, Statistic], int]:
    """One statistic per tensor over all of ``data``, and the number of samples seen."""
    stats = {name: new_statistic(options) for name in names}
    passes = list(chunks(names, options.max_tensors_per_pass or max(len(names), 1)))
    if len(passes) > 1 and not data.rereadable():
        raise DataError(f"calibrating {len(names)} tensors in {len(passes)} passes needs data that can be read "
                        "more than once (a file, a folder, a list); a one-shot iterator was given")
    samples = 0
    for number, group in enumerate(passes, start=1):
        label = "calibrating" if len(passes) == 1 else f"calibrating, pass {number}/{len(passes)}"
        samples = observe(model, group, data, stats, options, label=label, progress=progress)
    return stats, samples


def reduce_statistics(stats: dict[str, Statistic], options: CalibrationOptions, samples: int) -> TensorRanges:
    """Each statistic's amax by the method, with warnings for what deserves a look."""
    amax = {}
    for name, stat in stats.items():
        if stat.nonfinite:
            log.warning("tensor %r: %d non-finite values (NaN/Inf) seen in calibration were ignored",
                        name, stat.nonfinite)
        if stat.amax == 0.0:
            if stat.nonfinite:
                raise CalibrationError(f"tensor {name!r}: calibration saw no finite value; check the data, "
                                       "or exclude the node that reads it")
            log.warning("tensor %r was all zeros on %d samples; its scale uses the floor amax", name, samples)
        amax[name] = float(np.float32(method_amax(stat, options)))
    histograms = {name: stat for name, stat in stats.items() if isinstance(stat, Histogram)}
    sources = {}
    if options.method == "mse":
        capped = [name for name, hist in histograms.items()
                  if (cap := quiet_cap(hist, options.scheme)) is not None and amax[name] == float(np.float32(cap))]
        sources = dict.fromkeys(capped, "mse, capped for quiet samples")
        if capped:
            log.info("mse: %d ranges capped so that the quietest tenth of the samples do not round to zero (%s)",
                     len(capped), ", ".join(capped[:3]) + (" ..." if len(capped) > 3 else ""))
    return TensorRanges(amax, method=options.method, samples=samples, histograms=histograms, sources=sources)


def chunks(names: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(names), size):
        yield names[start:start + size]


def observe(model: onnx.ModelProto, names: list[str], data: Dataset, stats: dict[str, Statistic],
            options: CalibrationOptions, *, label: str, progress: bool) -> int:
    """One pass over the data, updating the statistics of ``names``; returns the number of samples seen."""
    observer = OBSERVERS[options.executor](model, names, extremes=METHODS[options.method].statistic == "absmax")
    samples = runs = 0
    bar = tqdm(total=data.runs(), desc=label, unit="batch", disable=None if progress else True, leave=False)
    # Statistics of batch n are reduced on a worker thread while ORT computes batch n+1 (both release the GIL),
    # so at most two batches of exposed outputs are alive at once.
    with bar, ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        for seen in observer.observe(data):
            if pending is not None:
                pending.result()
            pending = worker.submit(update_all, [(stats[name], value, owned) for name, value, owned in seen.values],
                                    seen.batch.samples)
            samples += seen.batch.samples
            runs += 1
            bar.update()
        if pending is not None:
            pending.result()
    if runs == 0:
        raise DataError(f"{data.name}: no batches to calibrate with")
    return samples


def update_all(updates: list[tuple[Statistic, np.ndarray, bool]], samples: int) -> None:
    for stat, value, owned in updates:
        stat.update(value, owned=owned, samples=samples)
