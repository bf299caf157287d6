"""Collect activation ranges: run the data through ONNX Runtime and reduce each planned tensor as it streams."""

from __future__ import annotations

import logging
import time

import onnx

from qdq.calibrate.data import Dataset
from qdq.calibrate.stats import AbsMax
from qdq.errors import CalibrationError, DataError
from qdq.model_io import first_line
from qdq.ranges import TensorRanges
from qdq.runtime import make_session, with_outputs

log = logging.getLogger(__name__)


def collect_ranges(model: onnx.ModelProto, names: list[str], data: Dataset, *, method: str = "max") -> TensorRanges:
    """The amax of each tensor in ``names`` over all of ``data``.

    A copy of the model exposes exactly those tensors as outputs; each batch's values are reduced into a
    per-tensor statistic and dropped, so memory does not grow with the amount of data.
    """
    graph_inputs = {i.name for i in model.graph.input}
    exposed = [n for n in names if n not in graph_inputs]
    # No graph optimisations: the ranges are those of exactly the graph's ops, the ops TensorRT will see.
    session = make_session(with_outputs(model, exposed), optimize=False,
                           what="the model prepared for calibration") if exposed else None
    stats = {name: AbsMax() for name in names}
    samples = runs = 0
    started = time.perf_counter()
    for batch in data:
        try:
            values = session.run(exposed, batch.feeds) if session else []
        except Exception as exc:  # ORT's InvalidArgument / Fail
            raise DataError(f"ONNX Runtime failed on batch {runs + 1} of {data.name}: {first_line(exc)}") from exc
        for name, value in zip(exposed, values, strict=True):
            stats[name].update(value)
        for name in names:
            if name in graph_inputs:
                stats[name].update(batch.feeds[name])
        samples += batch.samples
        runs += 1
    if runs == 0:
        raise DataError(f"{data.name}: no batches to calibrate with")
    log.info("calibrated %d tensors on %d samples (%d runs) in %.1f s",
             len(names), samples, runs, time.perf_counter() - started)
    return TensorRanges(reduce_stats(stats, samples), method=method, samples=samples)


def reduce_stats(stats: dict[str, AbsMax], samples: int) -> dict[str, float]:
    """Each statistic's amax, with warnings for what deserves a look."""
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
        amax[name] = stat.amax
    return amax
