"""Calibration's own options: what statistic, how it becomes an amax, and where the work runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from qdq.calibrate.histogram import MAX_BINS
from qdq.calibrate.observer import OBSERVERS
from qdq.calibrate.registry import DEFAULT_METHOD, METHODS
from qdq.scheme import INT8, Scheme


@dataclass(frozen=True, kw_only=True)
class CalibrationOptions:
    """How to calibrate; made from a QuantizeConfig by ``config.calibration()`` or directly.

    Attributes:
        method: a name in :data:`qdq.calibrate.registry.METHODS`.
        percentile: for ``percentile``.
        num_bins: histogram bins for the histogram methods; even, from 256 to ``MAX_BINS``.
        max_tensors_per_pass: observe at most this many tensors per pass over the data.
        scheme: the quantization scheme the ranges are for (the MSE method measures its rounding).
        workers: local processes, each with its own ONNX Runtime session over a shard of the data (1: in process).
        ray_address: run the shards as Ray tasks: ``"auto"``/``"ray://..."`` for a cluster, ``""`` for a local one.
        executor: what runs the model to observe it, a name in :data:`qdq.calibrate.observer.OBSERVERS`.
    """

    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    num_bins: int = 2048
    max_tensors_per_pass: int | None = None
    scheme: Scheme = field(default=INT8)
    workers: int = 1
    ray_address: str | None = None
    executor: str = "onnxruntime"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if not isinstance(self.num_bins, int) or not 256 <= self.num_bins <= MAX_BINS or self.num_bins % 2:
            raise ValueError(f"num_bins must be an even integer from 256 to {MAX_BINS}, got {self.num_bins!r}")
        if self.max_tensors_per_pass is not None and (
                not isinstance(self.max_tensors_per_pass, int) or self.max_tensors_per_pass < 1):
            raise ValueError(f"max_tensors_per_pass must be a positive integer, got {self.max_tensors_per_pass!r}")
        if self.executor not in OBSERVERS:
            raise ValueError(f"executor {self.executor!r} is not one of {', '.join(OBSERVERS)}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")

    @property
    def sharded(self) -> bool:
        return self.workers > 1 or self.ray_address is not None
