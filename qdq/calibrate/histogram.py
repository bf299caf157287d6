"""A streaming histogram of |x|: O(bins) memory per tensor, mergeable, independent of batching.

The counts are kept at a fine resolution, ``resolution`` fine bins per bin, over ``[0, top]`` where ``top`` is
the smallest power of two at or above the largest |x| seen. When a batch exceeds ``top``, ``top`` doubles and
pairs of fine bins merge, so old counts map exactly onto the new bins. Because ``top`` depends only on the
overall maximum, the same samples give the same histogram whatever the batch size or order: the amax methods are
then pure functions of the data (NVIDIA/Model-Optimizer#619 reports entropy scales that changed with the batch
size). The data fills between half and all of the bins.

Two views serve the methods:
- :attr:`Histogram.counts`: ``num_bins`` bins over ``[0, top]`` (sums of fine bins, exact);
- :meth:`Histogram.over_max`: ``num_bins`` bins over ``[0, amax]``, the grid of TensorRT's entropy calibration
  (pytorch-quantization's histogram of a single batch), re-binned from the fine counts. Each of its bins spans
  at least ``resolution / 2`` fine bins; a fine bin cut by a bin edge is split in proportion to its overlap.

Each sample's peak |x| is counted too, on a log scale (:attr:`Histogram.peaks`, a quarter octave a bin), so that
MSE can keep quiet samples representable (``methods.quiet_cap``).

Memory: ``num_bins * resolution`` int64 counts per tensor (``FINE_BINS`` at most): 256 KB at the default 2048 bins
(resolution 16), never more; 8 KB of peak counts.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

BLOCK = 1 << 16
# --num-bins stops here: the entropy method's candidates x 128-levels tables stay near 100 MB while computed.
MAX_BINS = 16384
# Fine bins kept per histogram: num_bins times the resolution, the resolution the largest whole number that keeps
# at most this many (16 at the default 2048 bins, 2 at MAX_BINS): 256 KB of int64 counts per tensor at most.
FINE_BINS = 32768
# The smallest top. Below it, num_bins / top would overflow float32 and bin indices would wrap around: data
# whose largest |x| is smaller (subnormal, vanished activations) fills the lowest bins, and its amax is floored.
MIN_TOP = 2.0 ** -100
# Each sample's largest |x| is counted on a log scale, PEAK_BINS_PER_OCTAVE bins per power of two over
# [2^-PEAK_OCTAVES, 2^PEAK_OCTAVES): O(1) memory, and merge-exact like the counts.
PEAK_BINS_PER_OCTAVE = 4
PEAK_OCTAVES = 128


class Histogram:
    """Counts of |x| in ``num_bins`` equal bins over ``[0, top]`` (kept ``resolution`` times finer), plus the
    running absmax, the non-finite count, and how large each sample's largest |x| was (log bins)."""

    def __init__(self, num_bins: int = 2048) -> None:
        self.resolution = max(1, FINE_BINS // num_bins)
        self.fine = np.zeros(num_bins * self.resolution, dtype=np.int64)
        self.top = 0.0  # 0 until a non-zero value is seen; a power of two after
        self.amax = 0.0
        self.nonfinite = 0
        self.peaks = np.zeros(2 * PEAK_OCTAVES * PEAK_BINS_PER_OCTAVE, dtype=np.int64)

    @property
    def num_bins(self) -> int:
        return len(self.fine) // self.resolution

    @property
    def counts(self) -> np.ndarray:
        """``num_bins`` counts over ``[0, top]``."""
        return self.fine.reshape(-1, self.resolution).sum(axis=1)

    @property
    def total(self) -> int:
        return int(self.fine.sum())

    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` edges of :attr:`counts`."""
        return np.arange(self.num_bins + 1, dtype=np.float64) * (self.top / self.num_bins)

    def over_max(self, bins: int | None = None) -> np.ndarray:
        """Counts (float) in ``bins`` equal bins over ``[0, amax]`` (default ``num_bins``); bin ``i`` ends at
        ``(i + 1) * amax / bins``. The largest |x| falls in the last bin, as in ``histc(x, bins, 0, max)``.

        The counts are linear interpolation of the fine cumulative counts: exact at fine edges, proportional
        inside a fine bin. A bin that overlaps no non-empty fine bin stays exactly empty.
        """
        bins = bins or self.num_bins
        if self.amax == 0.0:
            out = np.zeros(bins)
            out[0] = self.total
            return out
        width = self.top / len(self.fine)
        last = min(int(self.amax / width), len(self.fine) - 1)  # the fine bin holding amax
        cumulative = np.concatenate([[0], np.cumsum(self.fine[:last + 1])]).astype(np.float64)
        # The fine bin holding amax ends at amax, not at its grid edge: nothing lies beyond the maximum.
        points = np.arange(last + 2, dtype=np.float64) * width
        points[-1] = max(self.amax, points[-2])
        targets = np.arange(bins + 1, dtype=np.float64) * (self.amax / bins)
        at = np.interp(targets, points, cumulative)
        at[0], at[-1] = 0.0, cumulative[-1]
        return np.maximum(np.diff(at), 0.0)

    def update(self, x: np.ndarray, *, owned: bool = False, samples: int | None = None) -> None:
        """Add a batch. ``owned=True`` lets the histogram work in ``x``'s memory (an ORT output nobody reads again).

        ``samples``: how many samples the batch holds; where ``x``'s first axis has that length, each row's peak
        is a sample's, else the whole batch's peak counts as one.
        """
        if x.size == 0:
            return
        x = np.asarray(x, dtype=np.float32)
        rows = x.reshape(samples if samples and x.ndim and x.shape[0] == samples else 1, -1)
        highs, lows = rows.max(axis=1), rows.min(axis=1)
        x = x.reshape(-1)
        hi, lo = float(highs.max()), float(lows.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            finite = np.isfinite(rows)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            highs = np.where(finite, np.abs(rows), 0.0).max(axis=1)
            lows = np.zeros_like(highs)
            x = x[finite.reshape(-1)]
            if x.size == 0:
                return
            hi, lo = float(x.max()), float(x.min())
        self.amax = max(self.amax, hi, -lo)
        peaks = np.maximum(highs, -lows)
        np.add.at(self.peaks, peak_bins(peaks[peaks > 0]), 1)
        if self.amax == 0.0:
            self.fine[0] += x.size
            return
        self._grow(self.amax)
        # bins / top is a power of two, so the product is exact and bin membership is the same at any resolution.
        # Blocks keep the int64 bin indices in cache; counting them is the cost.
        factor = np.float32(len(self.fine) / self.top)
        index = np.empty(min(x.size, BLOCK), dtype=np.intp)
        counts = np.zeros(len(self.fine) + 1, dtype=np.int64)  # the extra bin holds |x| == top exactly
        for start in range(0, x.size, BLOCK):
            part = x[start:start + BLOCK]
            scaled = np.abs(part, out=part if owned else None) if lo < 0 else (part if owned else part.copy())
            np.multiply(scaled, factor, out=scaled)
            np.copyto(index[:len(scaled)], scaled, casting="unsafe")
            np.add.at(counts, index[:len(scaled)], 1)  # numpy 2's add.at beats bincount here by a quarter
        counts[-2] += counts[-1]
        self.fine += counts[:-1]

    def quiet_peak(self, fraction: float) -> float | None:
        """A value at or below the peak |x| of the quietest ``fraction`` of the samples that held a non-zero value
        (the lower edge of its log bin), or None if there were none."""
        total = int(self.peaks.sum())
        if total == 0:
            return None
        index = int(np.searchsorted(np.cumsum(self.peaks), max(1, math.ceil(fraction * total))))
        return 2.0 ** (index / PEAK_BINS_PER_OCTAVE - PEAK_OCTAVES)

    def merge(self, other: Histogram) -> Histogram:
        """The histogram of both data sets together."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
        merged = Histogram(self.num_bins)
        for part in (self, other):
            copy = part.copy()
            copy._grow(max(self.top, other.top))
            merged.fine += copy.fine
        merged.top = max(self.top, other.top)
        merged.amax = max(self.amax, other.amax)
        merged.nonfinite = self.nonfinite + other.nonfinite
        merged.peaks = self.peaks + other.peaks
        return merged

    def __getstate__(self) -> dict:
        """Pickled small (statistics cross process boundaries when calibration is sharded): the counts up to the
        last non-empty fine bin, in the narrowest unsigned type that holds them, zlib-compressed."""
        used = int(np.flatnonzero(self.fine).max(initial=-1)) + 1
        dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                     if used == 0 or int(self.fine[:used].max()) <= np.iinfo(t).max)
        packed = zlib.compress(self.fine[:used].astype(dtype).tobytes(), 1)
        return {"num_bins": self.num_bins, "used": used, "dtype": np.dtype(dtype).str, "counts": packed,
                "top": self.top, "amax": self.amax, "nonfinite": self.nonfinite,
                "peaks": {int(i): int(self.peaks[i]) for i in np.flatnonzero(self.peaks)}}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["num_bins"])
        used = state["used"]
        self.fine[:used] = np.frombuffer(zlib.decompress(state["counts"]), dtype=state["dtype"], count=used)
        self.top, self.amax, self.nonfinite = state["top"], state["amax"], state["nonfinite"]
        for index, count in state["peaks"].items():
            self.peaks[index] = count

    def copy(self) -> Histogram:
        clone = Histogram(self.num_bins)
        clone.fine[:] = self.fine
        clone.top, clone.amax, clone.nonfinite = self.top, self.amax, self.nonfinite
        clone.peaks[:] = self.peaks
        return clone

    def _grow(self, value: float) -> None:
        """Widen to cover ``value``: the first top is a power of two; each doubling merges fine bin pairs."""
        if value <= self.top or value == 0.0:
            return
        if self.top == 0.0:
            # Counts so far are all zeros (bin 0), which stay in bin 0 at any top.
            self.top = max(2.0 ** math.ceil(math.log2(value)), MIN_TOP)
            while self.top < value:  # log2 may round down just above a power of two
                self.top *= 2.0
            return
        while self.top < value:
            self.fine = np.concatenate([self.fine.reshape(-1, 2).sum(axis=1),
                                        np.zeros(len(self.fine) // 2, dtype=np.int64)])
            self.top *= 2.0


def peak_bins(peaks: np.ndarray) -> np.ndarray:
    """The log bins of positive peaks: bin k holds [2^(k/4 - 128), 2^((k+1)/4 - 128)), clamped to the range."""
    index = np.floor((np.log2(peaks.astype(np.float64)) + PEAK_OCTAVES) * PEAK_BINS_PER_OCTAVE).astype(np.intp)
    return np.clip(index, 0, 2 * PEAK_OCTAVES * PEAK_BINS_PER_OCTAVE - 1)
