"""A streaming histogram of |x|: O(bins) memory per tensor, mergeable, independent of batching.

The bins cover ``[0, top]`` where ``top`` is the smallest power of two at or above the largest |x| seen. When a
batch exceeds ``top``, ``top`` doubles and pairs of bins merge, so old counts map exactly onto the new bins.
Because ``top`` depends only on the overall maximum, the same samples give the same histogram whatever the
batch size or order: the amax methods are then pure functions of the data (NVIDIA/Model-Optimizer#619 reports
entropy scales that changed with the batch size). The data fills between half and all of the bins.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 1 << 16
# --num-bins stops here: 8 bytes a bin, so a histogram takes at most 128 KB per tensor (16 KB at the default
# 2048), and the entropy method's candidates x 128-levels tables stay near 100 MB while they are computed.
MAX_BINS = 16384
# The smallest top. Below it, num_bins / top would overflow float32 and bin indices would wrap around: data
# whose largest |x| is smaller (subnormal, vanished activations) fills the lowest bins, and its amax is floored.
MIN_TOP = 2.0 ** -100


class Histogram:
    """Counts of |x| in ``num_bins`` equal bins over ``[0, top]``, plus the running absmax and non-finite count."""

    def __init__(self, num_bins: int = 2048) -> None:
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.top = 0.0  # 0 until a non-zero value is seen; a power of two after
        self.amax = 0.0
        self.nonfinite = 0

    @property
    def num_bins(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def edges(self) -> np.ndarray:
        return np.arange(self.num_bins + 1, dtype=np.float64) * (self.top / self.num_bins)

    def update(self, x: np.ndarray, *, owned: bool = False) -> None:
        """Add a batch. ``owned=True`` lets the histogram work in ``x``'s memory (an ORT output nobody reads again)."""
        if x.size == 0:
            return
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        hi, lo = float(x.max()), float(x.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = x[finite]
            if x.size == 0:
                return
            hi, lo = float(x.max()), float(x.min())
        self.amax = max(self.amax, hi, -lo)
        if self.amax == 0.0:
            self.counts[0] += x.size
            return
        self._grow(self.amax)
        # bins / top is a power of two, so the product is exact and bin membership is the same at any resolution.
        # Blocks keep the int64 bin indices in cache; counting them is the cost.
        factor = np.float32(self.num_bins / self.top)
        index = np.empty(min(x.size, BLOCK), dtype=np.intp)
        counts = np.zeros(self.num_bins + 1, dtype=np.int64)  # the extra bin holds |x| == top exactly
        for start in range(0, x.size, BLOCK):
            part = x[start:start + BLOCK]
            scaled = np.abs(part, out=part if owned else None) if lo < 0 else (part if owned else part.copy())
            np.multiply(scaled, factor, out=scaled)
            np.copyto(index[:len(scaled)], scaled, casting="unsafe")
            np.add.at(counts, index[:len(scaled)], 1)  # numpy 2's add.at beats bincount here by a quarter
        counts[-2] += counts[-1]
        self.counts += counts[:-1]

    def merge(self, other: Histogram) -> Histogram:
        """The histogram of both data sets together."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
        merged = Histogram(self.num_bins)
        for part in (self, other):
            copy = part.copy()
            copy._grow(max(self.top, other.top))
            merged.counts += copy.counts
        merged.top = max(self.top, other.top)
        merged.amax = max(self.amax, other.amax)
        merged.nonfinite = self.nonfinite + other.nonfinite
        return merged

    def copy(self) -> Histogram:
        clone = Histogram(self.num_bins)
        clone.counts[:] = self.counts
        clone.top, clone.amax, clone.nonfinite = self.top, self.amax, self.nonfinite
        return clone

    def _grow(self, value: float) -> None:
        """Widen to cover ``value``: the first top is a power of two; each doubling merges bin pairs."""
        if value <= self.top or value == 0.0:
            return
        if self.top == 0.0:
            # Counts so far are all zeros (bin 0), which stay in bin 0 at any top.
            self.top = max(2.0 ** math.ceil(math.log2(value)), MIN_TOP)
            while self.top < value:  # log2 may round down just above a power of two
                self.top *= 2.0
            return
        while self.top < value:
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1),
                                          np.zeros(self.num_bins // 2, dtype=np.int64)])
            self.top *= 2.0
