"""Collect activation ranges: run the data through ONNX Runtime and reduce each planned tensor as it streams."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from tqdm import tqdm

from qdq.calibrate.auto import AUTO_SAMPLES, Recording, choose
from qdq.calibrate.data import Dataset
from qdq.calibrate.histogram import Histogram
from qdq.calibrate.methods import amax_entropy, amax_entropy_guarded, amax_mse, amax_percentile
from qdq.calibrate.stats import AbsMax
from qdq.config import QuantizeConfig
from qdq.errors import CalibrationError, DataError
from qdq.model_io import first_line
from qdq.placement import QuantPlan, plan_quantization
from qdq.ranges import TensorRanges
from qdq.runtime import session_exposing, session_reducing

log = logging.getLogger(__name__)

Stat = AbsMax | Histogram


def collect_ranges(model: onnx.ModelProto, names: list[str], data: Dataset, config: QuantizeConfig | None = None,
                   *, plan: QuantPlan | None = None, progress: bool = False) -> TensorRanges:
    """The amax of each tensor in ``names`` over all of ``data``, by ``config.method``.

    A copy of the model exposes the tensors as outputs, at most ``config.max_tensors_per_pass`` at a time (more
    tensors: more passes over the data). Each batch's values are reduced into a fixed-size statistic per tensor
    and dropped, so memory does not grow with the amount of data. ``--method auto`` then scores candidates on
    the consumers of each tensor, as ``plan`` (default: the plan of ``model`` with ``config``) places them.
    """
    config = config or QuantizeConfig()
    if config.method == "auto":
        data = Recording(data, AUTO_SAMPLES)
    stats = {name: new_stat(config) for name in names}
    passes = list(chunks(names, config.max_tensors_per_pass or max(len(names), 1)))
    if len(passes) > 1 and not data.rereadable():
        raise DataError(f"calibrating {len(names)} tensors in {len(passes)} passes needs data that can be read "
                        "more than once (a file, a folder, a list); a one-shot iterator was given")
    started = time.perf_counter()
    samples = 0
    for number, group in enumerate(passes, start=1):
        label = "calibrating" if len(passes) == 1 else f"calibrating, pass {number}/{len(passes)}"
        samples = observe(model, group, data, stats, label=label, progress=progress)
    log.info("calibrated %d tensors (%s) on %d samples in %.1f s%s", len(names), config.method, samples,
             time.perf_counter() - started, f", {len(passes)} passes" if len(passes) > 1 else "")
    histograms = {name: stat for name, stat in stats.items() if isinstance(stat, Histogram)}
    amax = reduce_stats(stats, config, samples)
    sources = {}
    if config.method == "auto":
        plan = plan or plan_quantization(model, config.placement())
        amax, sources = choose(model, plan, histograms, data.kept, config.max_tensors_per_pass)
    return TensorRanges(amax, method=config.method, samples=samples, histograms=histograms, sources=sources)


def new_stat(config: QuantizeConfig) -> Stat:
    return AbsMax() if config.method == "max" else Histogram(config.num_bins)


def chunks(names: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(names), size):
        yield names[start:start + size]


def observe(model: onnx.ModelProto, names: list[str], data: Dataset, stats: dict[str, Stat], *, label: str,
            progress: bool) -> int:
    """One pass over the data, updating the statistics of ``names``; returns the number of samples seen."""
    graph_inputs = {i.name for i in model.graph.input}
    exposed = [n for n in names if n not in graph_inputs]
    fed = [n for n in names if n in graph_inputs]
    # With ORT's optimisations: fused kernels (Conv+BatchNorm+Relu, as TensorRT fuses them) run about twice as
    # fast and differ from the graph's unfused ops only by float rounding. For max calibration ORT also reduces
    # each tensor to its extremes itself; histograms need the whole tensors.
    reduce_in_ort = bool(exposed) and all(isinstance(stats[n], AbsMax) for n in exposed)
    what = "the model prepared for calibration"
    if not exposed:
        session, outputs = None, []
    elif reduce_in_ort:
        session, outputs = session_reducing(model, exposed, what=what)
    else:
        session, outputs = session_exposing(model, exposed, what=what), exposed
    full_session = None  # made when a reduced extreme is NaN/Inf: those batches need every value to count them
    samples = runs = 0
    bar = tqdm(total=data.runs(), desc=label, unit="batch", disable=None if progress else True, leave=False)
    # Statistics of batch n are reduced on a worker thread while ORT computes batch n+1 (both release the GIL),
    # so at most two batches of exposed outputs are alive at once.
    with bar, ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        for batch in data:
            try:
                values = session.run(outputs, batch.feeds) if session else []
                if reduce_in_ort:
                    finite = all(np.isfinite(v).all() for v in values)  # a NaN anywhere makes the sum NaN
                    values = [np.stack(values[i:i + 2]) for i in range(0, len(values), 3)]
                    if not finite:
                        full_session = full_session or session_exposing(model, exposed, what=what)
                        values = full_session.run(exposed, batch.feeds)
            except Exception as exc:  # ORT's InvalidArgument / Fail
                raise DataError(f"ONNX Runtime failed on batch {runs + 1} of {data.name}: {first_line(exc)}") from exc
            if pending is not None:
                pending.result()
            updates = [(stats[name], value, True) for name, value in zip(exposed, values, strict=True)]
            updates += [(stats[name], batch.feeds[name], False) for name in fed]
            pending = worker.submit(update_all, updates)
            samples += batch.samples
            runs += 1
            bar.update()
        if pending is not None:
            pending.result()
    if runs == 0:
        raise DataError(f"{data.name}: no batches to calibrate with")
    return samples


def update_all(updates: list[tuple[Stat, np.ndarray, bool]]) -> None:
    for stat, value, owned in updates:
        stat.update(value, owned=owned)


def reduce_stats(stats: dict[str, Stat], config: QuantizeConfig, samples: int) -> dict[str, float]:
    """Each statistic's amax by the configured method, with warnings for what deserves a look."""
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
        amax[name] = float(np.float32(method_amax(stat, config)))
    return amax


def method_amax(stat: Stat, config: QuantizeConfig) -> float:
    if isinstance(stat, AbsMax):
        return stat.amax
    if config.method == "percentile":
        return amax_percentile(stat, config.percentile)
    if config.method == "entropy":
        return amax_entropy(stat)
    if config.method == "entropy-guarded":
        return amax_entropy_guarded(stat)
    if config.method == "mse":
        return amax_mse(stat)
    return stat.amax
