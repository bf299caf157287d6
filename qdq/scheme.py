"""The quantization scheme as a value: linear, symmetric over [-amax, amax], zero point 0 (../specs/scheme.md).

A :class:`Scheme` says what a Q/DQ pair stores and how an amax becomes a scale. Materialization, range files,
``qdq check`` and the calibration methods take one; :data:`INT8` is the default and the only place its numbers
are written. Adding a scheme is one more value here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto


@dataclass(frozen=True)
class Scheme:
    """How values are quantized.

    Attributes:
        name: the ``--scheme`` name.
        element_type: the ONNX type of the quantized values and of the zero point (which selects it).
        qmax: the largest quantized magnitude: ``scale = amax / qmax``.
        min_opset: the ONNX opset that has QuantizeLinear/DequantizeLinear of this type (and per-channel ``axis``).
        amax_floor: a smaller amax (a tensor that was all zeros) is raised to it, so the scale stays a positive,
            normal float (the caller warns).
        amax_ceiling: a larger amax is lowered to it, so the scale stays finite in ``scale_dtype``.
        scale_dtype: the scales' float type.
    """

    name: str
    element_type: int
    qmax: float
    min_opset: int
    amax_floor: float
    amax_ceiling: float
    scale_dtype: type = np.float32

    @property
    def element_dtype(self) -> np.dtype:
        """The numpy dtype of the quantized values (``int8``, ``ml_dtypes.float8_e4m3fn``)."""
        return np.dtype(ELEMENT_DTYPES[self.element_type])

    @property
    def is_float(self) -> bool:
        return self.element_dtype.kind not in "iu"

    def scale(self, amax: float | np.ndarray) -> np.ndarray:
        """``scale_dtype(amax / qmax)``, amax clamped to ``[amax_floor, amax_ceiling]``; per tensor or channel."""
        amax64 = np.clip(np.asarray(amax, dtype=np.float64), self.amax_floor, self.amax_ceiling)
        return (amax64 / self.qmax).astype(self.scale_dtype)

    def zero_point(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=self.element_dtype)

    def quantize(self, values: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
        """What QuantizeLinear computes: ``saturate(round_half_even(x / scale))`` into the element type."""
        if axis is not None:
            shape = [1] * values.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        x = values.astype(np.float32) / scale.astype(np.float32)
        if self.is_float:
            # The cast rounds to nearest even; saturate first, as QuantizeLinear's default saturate=1 does
            # (ml_dtypes turns out-of-range values into NaN).
            return np.clip(x, -self.qmax, self.qmax).astype(self.element_dtype)
        info = np.iinfo(self.element_dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(self.element_dtype)

    def fake_quantize(self, values: np.ndarray, amax: np.ndarray) -> np.ndarray:
        """Quantize-dequantize of non-negative ``values`` against each ``amax`` (float64, for the MSE method)."""
        scale = np.asarray(amax, dtype=np.float64) / self.qmax
        x = np.minimum(values / scale, self.qmax)
        if self.is_float:
            return x.astype(self.element_dtype).astype(np.float64) * scale
        return np.rint(x) * scale


ELEMENT_DTYPES = {TensorProto.INT8: np.int8, TensorProto.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn}

# An all-zeros tensor's amax becomes 1e-6: small enough not to matter, large enough that amax / qmax is a normal
# float32. No finite float32 amax overflows a float32 scale.
INT8 = Scheme("int8", TensorProto.INT8, qmax=127, min_opset=13, amax_floor=1e-6,
              amax_ceiling=float(np.finfo(np.float32).max))
# TensorRT's FP8 (Hopper, Blackwell): E4M3 with no infinities, largest finite 448; FLOAT8 Q/DQ came in opset 19.
FP8 = Scheme("fp8", TensorProto.FLOAT8E4M3FN, qmax=448, min_opset=19, amax_floor=1e-6,
             amax_ceiling=float(np.finfo(np.float32).max))
SCHEMES = {s.name: s for s in (INT8, FP8)}


def with_fp16_scales(scheme: Scheme) -> Scheme:
    """``scheme`` for a model whose scales are stored in FP16 (``--high-precision fp16``).

    The floor rises so that ``amax / qmax`` is a normal FP16 number (an all-zeros tensor's 1e-6 would round to a
    scale of 0), and the ceiling falls to FP16's largest value, which an FP16 activation cannot exceed.
    """
    half = np.finfo(np.float16)
    return dataclasses.replace(scheme, amax_floor=max(scheme.amax_floor, float(half.tiny) * scheme.qmax),
                               amax_ceiling=min(scheme.amax_ceiling, float(half.max)))


def bounds_note(scheme: Scheme, amax: float) -> str:
    """What the scheme's floor or ceiling did to ``amax``, for messages and doc strings ("" when nothing)."""
    if amax < scheme.amax_floor:
        return f"raised to the floor {scheme.amax_floor:.6g}"
    if amax > scheme.amax_ceiling:
        return f"lowered to the ceiling {scheme.amax_ceiling:.6g}"
    return ""


def symmetric_scale(amax: float | np.ndarray) -> np.ndarray:
    """The default scheme's scale, ``float32(amax / 127)``."""
    return INT8.scale(amax)


def weight_amax(values: np.ndarray, axis: int | None) -> np.ndarray:
    """``max |w|`` over everything but ``axis`` (per channel), or over the whole tensor."""
    magnitude = np.abs(values.astype(np.float32))
    if axis is None:
        return np.asarray(magnitude.max() if magnitude.size else 0.0, dtype=np.float32)
    others = tuple(i for i in range(values.ndim) if i != axis)
    return magnitude.max(axis=others) if others else magnitude
