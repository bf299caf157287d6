"""Per-tensor ranges: the amax of each activation, and exact scales where a file fixed them.

A pure value: reading and writing files is ``qdq.range_files``'s job (``read_ranges``, ``write_ranges``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx

from qdq.graph import GraphIndex
from qdq.ops import RESHAPE_OPS
from qdq.scheme import INT8, Scheme

if TYPE_CHECKING:
    from qdq.calibrate.histogram import Histogram


SHARED = ", shared with "


@dataclass(frozen=True)
class TensorRanges:
    """``amax`` per tensor name, how they were obtained, and exact scales where a file gave them.

    ``scales`` holds INT8 float32 scales that must be used bit for bit (a TensorRT calibration cache stores the
    INT8 scale, not the amax); otherwise, and for every other scheme, the scale is the scheme's of the amax.
    ``header`` keeps a cache's first line so that writing it back reproduces the file. ``histograms`` are the
    calibration statistics of the histogram methods (for reports; O(bins) each). ``sources`` says, per tensor, what
    chose its amax where that is not ``method`` itself (``auto: mse``: auto picked MSE's threshold; ``shared with
    t``: a Concat group's). ``rescaled`` names the techniques that rescaled activations (``equalize``,
    ``smoothquant``) before the ranges were measured: the tensors are then the rescaled model's, and using the
    ranges again means rescaling the model again.
    """

    amax: Mapping[str, float]
    method: str = "max"
    samples: int = 0
    scales: Mapping[str, float] = field(default_factory=dict)
    header: str | None = None
    histograms: Mapping[str, Histogram] = field(default_factory=dict, compare=False, repr=False)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    rescaled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, value in self.amax.items():
            if not (isinstance(value, float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"tensor {name!r}: amax must be a finite float >= 0, got {value!r}")

    def __contains__(self, name: object) -> bool:
        return name in self.amax

    def __iter__(self) -> Iterator[str]:
        return iter(self.amax)

    def __len__(self) -> int:
        return len(self.amax)

    def names(self) -> set[str]:
        return set(self.amax)

    def scale(self, name: str, scheme: Scheme = INT8) -> float:
        """The scale of a tensor: for INT8 the file's exact scale where it has one, else ``scheme.scale(amax)``."""
        if scheme == INT8 and name in self.scales:
            return self.scales[name]
        return float(scheme.scale(self.amax[name]))

    def source(self, name: str) -> str:
        """What chose this tensor's amax: the method, or more precisely where ``sources`` says."""
        return self.sources.get(name, self.method)

    def subset(self, names: list[str]) -> TensorRanges:
        return TensorRanges({n: self.amax[n] for n in names}, method=self.method, samples=self.samples,
                            scales={n: self.scales[n] for n in names if n in self.scales}, header=self.header,
                            histograms={n: self.histograms[n] for n in names if n in self.histograms},
                            sources={n: self.sources[n] for n in names if n in self.sources},
                            rescaled=self.rescaled)

    def merged(self, other: TensorRanges) -> TensorRanges:
        """These ranges completed by ``other``'s (ours win where both have a tensor)."""
        if not self.amax:
            return other
        method = self.method if self.method == other.method else f"{self.method}+{other.method}"
        return TensorRanges({**other.amax, **self.amax}, method=method, samples=other.samples or self.samples,
                            scales={**other.scales, **self.scales}, header=self.header,
                            histograms={**other.histograms, **self.histograms},
                            sources={**{n: other.source(n) for n in other}, **{n: self.source(n) for n in self}},
                            rescaled=self.rescaled or other.rescaled)

    def shared(self, groups: tuple[tuple[str, ...], ...]) -> TensorRanges:
        """Each group's members all take the group's largest range (one scale for a Concat and its inputs)."""
        amax, scales, sources = dict(self.amax), dict(self.scales), dict(self.sources)
        for group in groups:
            members = [n for n in group if n in amax]
            if len(members) < 2:
                continue
            widest = max(members, key=lambda n: (self.scale(n), n))
            chosen_by = self.source(widest).split(SHARED)[0]  # sharing twice says it once
            for name in members:
                amax[name] = self.amax[widest]
                sources[name] = chosen_by if name == widest else f"{chosen_by}{SHARED}{widest}"
                if widest in self.scales:
                    scales[name] = self.scales[widest]
                else:
                    scales.pop(name, None)
        return TensorRanges(amax, method=self.method, samples=self.samples, scales=scales, header=self.header,
                            histograms=self.histograms, sources=sources, rescaled=self.rescaled)


def inherit_through_copies(model: onnx.ModelProto, names: list[str], ranges: TensorRanges
                           ) -> tuple[TensorRanges, list[str]]:
    """Give tensors made by reshape ops (Reshape, Flatten, Transpose...) the range of their input when they lack one.

    Range files name the tensors TensorRT saw; a reshape before a classifier often has none, but it holds the
    same values as its input. Returns the completed ranges and a note per inherited tensor.
    """
    index = GraphIndex(model)
    amax, scales, notes = dict(ranges.amax), dict(ranges.scales), []
    for name in names:
        source, node = name, index.producer(name)
        while source not in amax and node is not None and node.op_type in RESHAPE_OPS:
            source = node.input[0]
            node = index.producer(source)
        if source != name and source in amax:
            amax[name] = amax[source]
            if source in scales:
                scales[name] = scales[source]
            notes.append(f"tensor {name!r} takes the range of {source!r} (same values through copy ops)")
    if not notes:
        return ranges, notes
    return TensorRanges(amax, method=ranges.method, samples=ranges.samples, scales=scales,
                        header=ranges.header, rescaled=ranges.rescaled), notes
