"""The quantization scheme: INT8, linear, symmetric over [-amax, amax], zero point 0 (../specs/scheme.md)."""

from __future__ import annotations

import numpy as np

QMAX = 127
# A tensor that was all zeros in calibration still needs a positive, normal scale. Its amax becomes this floor
# (the caller warns): small enough not to matter, large enough that amax / 127 is a normal float32.
AMAX_FLOOR = 1e-6


def symmetric_scale(amax: float | np.ndarray) -> np.ndarray:
    """``float32(amax / 127)``, with amax below the floor raised to it. Works per tensor or per channel."""
    amax64 = np.maximum(np.asarray(amax, dtype=np.float64), AMAX_FLOOR)
    return (amax64 / QMAX).astype(np.float32)


def quantize_int8(values: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """What QuantizeLinear computes: ``saturate(round_half_even(x / scale))`` into int8."""
    if axis is not None:
        shape = [1] * values.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    q = np.rint(values.astype(np.float32) / scale)
    return np.clip(q, -128, 127).astype(np.int8)


def weight_amax(values: np.ndarray, axis: int | None) -> np.ndarray:
    """``max |w|`` over everything but ``axis`` (per channel), or over the whole tensor."""
    magnitude = np.abs(values.astype(np.float32))
    if axis is None:
        return np.asarray(magnitude.max() if magnitude.size else 0.0, dtype=np.float32)
    others = tuple(i for i in range(values.ndim) if i != axis)
    return magnitude.max(axis=others) if others else magnitude
