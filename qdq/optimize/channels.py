"""Per-channel statistics of activations on the first calibration samples, for the techniques that act per channel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qdq.calibrate.data import Dataset
from qdq.runtime import session_exposing

SAMPLES = 32  # channel statistics are read on this many samples; with fewer they are too loose to act on


@dataclass(frozen=True)
class Channels:
    """Max |x| and mean x² per channel (axis 1) of one tensor."""

    max: np.ndarray
    mean_square: np.ndarray


def channel_statistics(model: onnx.ModelProto, tensors: list[str], data: Dataset, *, why: str
                       ) -> tuple[dict[str, Channels], int]:
    """Each tensor's channel statistics over the first ``SAMPLES`` samples of ``data`` in the float ``model``,
    and the samples read. Tensors with fewer than two dimensions, or empty, are left out. NaN is skipped by the
    max (an all-NaN channel stays NaN) and carried by the mean square."""
    batches = list(data.head(SAMPLES))
    session = session_exposing(model, tensors, what=f"the model ({why})")
    maxima: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        for name, value in zip(tensors, session.run(tensors, batch.feeds), strict=True):
            if value.ndim < 2 or value.size == 0:
                continue
            axes = tuple(a for a in range(value.ndim) if a != 1)
            found = np.fmax.reduce(np.abs(value), axis=axes)
            rows = value.reshape(value.shape[0], value.shape[1], -1)
            square = np.einsum("nck,nck->c", rows, rows, dtype=np.float64)  # no float64 copy of the tensor
            maxima[name] = found if name not in maxima else np.maximum(maxima[name], found)
            squares[name] = square if name not in squares else squares[name] + square
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
    stats = {name: Channels(maxima[name], squares[name] / counts[name]) for name in maxima}
    return stats, sum(b.samples for b in batches)
