"""Streaming statistics: O(1) per tensor, updated batch by batch, mergeable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AbsMax:
    """The running max of |x| over finite values, and how many non-finite values were seen."""

    amax: float = 0.0
    nonfinite: int = 0

    def update(self, x: np.ndarray, *, owned: bool = False, samples: int | None = None) -> None:
        if x.size == 0:
            return
        hi, lo = x.max(), x.min()  # no |x| temporary: two reductions over the batch instead
        if not (np.isfinite(hi) and np.isfinite(lo)):
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            if not finite.any():
                return
            hi, lo = x[finite].max(), x[finite].min()
        self.amax = max(self.amax, float(hi), -float(lo))

    def merge(self, other: AbsMax) -> AbsMax:
        return AbsMax(max(self.amax, other.amax), self.nonfinite + other.nonfinite)
