"""Options for quantization: frozen dataclasses, validated when they are made."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

WeightFormat = Literal["int8", "float"]
WEIGHT_FORMATS: tuple[str, ...] = ("int8", "float")
METHODS: tuple[str, ...] = ("max",)


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """How to quantize.

    Attributes:
        method: how activation statistics become an amax. ``max`` is the largest |x| seen.
        batch_size: samples per inference run when the data's first axis is the model's batch axis;
            ``None`` takes the input's fixed batch size, or 16 when the batch axis is dynamic.
        weights: ``int8`` stores each quantized weight as an int8 initializer feeding a DequantizeLinear
            (4x smaller file); ``float`` keeps the float weight behind a QuantizeLinear/DequantizeLinear pair.
            TensorRT accepts both and builds the same engine.
        per_channel: one weight scale per output channel (TensorRT's recommendation) instead of one per tensor.
    """

    method: str = "max"
    batch_size: int | None = None
    weights: WeightFormat = "int8"
    per_channel: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")

    def to_json(self) -> str:
        """The options as compact, key-sorted JSON (recorded in the output model's metadata)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
