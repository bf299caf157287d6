"""Options for quantization: frozen dataclasses, validated when they are made."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from qdq.calibrate.options import CalibrationOptions
from qdq.calibrate.registry import DEFAULT_METHOD
from qdq.calibrate.registry import METHODS as METHOD_REGISTRY
from qdq.ops import CONTROL_FLOW_OPS, RECURRENT_OPS
from qdq.optimize import TECHNIQUES
from qdq.placement.planner import PlacementOptions
from qdq.scheme import SCHEMES, Scheme, with_fp16_scales

WeightFormat = Literal["int8", "float"]
WEIGHT_FORMATS: tuple[str, ...] = ("int8", "float")
HIGH_PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
METHODS: tuple[str, ...] = tuple(METHOD_REGISTRY)


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """How to quantize.

    Attributes:
        method: how activation statistics become an amax (../specs/calibration.md). ``mse`` (default): the
            threshold with the least quantization error of the tensor. ``auto``: per tensor, the candidate
            (max, entropies, MSE, percentiles, a grid) with the least error in the consuming layers' outputs (past
            an Add or a pooling, in the layers they lead to).
            ``entropy``: TensorRT's entropy calibration as published (pytorch-quantization). ``entropy-guarded``:
            the same KL search with two guards (never clip more than 0.1% of the values; smoothing for outliers
            past a gap), qdq's earlier default. ``max``: the largest |x| seen (fastest: no histogram);
            ``percentile``: the ``percentile``-th percentile of |x|.
        percentile: for ``percentile``; 99.99 as pytorch-quantization (ONNX Runtime uses 99.999).
        num_bins: histogram bins for the histogram methods (2048, as TensorRT); even, from 256 to 16384.
        max_tensors_per_pass: observe at most this many tensors per pass over the data; a model with more is
            calibrated in several passes. Bounds the memory ONNX Runtime holds for exposed outputs.
        batch_size: samples per inference run when the data's first axis is the model's batch axis;
            ``None`` takes the input's fixed batch size, or 16 when the batch axis is dynamic.
        weights: ``int8`` stores each quantized weight as an int8 initializer feeding a DequantizeLinear
            (4x smaller file); ``float`` keeps the float weight behind a QuantizeLinear/DequantizeLinear pair.
            TensorRT accepts both and builds the same engine.
        per_channel: one weight scale per output channel (TensorRT's recommendation) instead of one per tensor.
        exclude_nodes: regular expressions; nodes whose name matches one (``re.search``) stay float.
        exclude_op_types: op types that stay float.
        include_op_types: op types to quantize besides the defaults (e.g. ``Add``, ``Mul``, ``Resize``): their
            float activation inputs get Q/DQ, except in normalisation/GELU/Softmax regions and masks.
        high_precision: the precision of what is not INT8. ``fp32`` leaves the float parts as they are (strongly
            typed TensorRT runs them in FP32); ``fp16`` casts them to FP16 except normalisations, Softmax,
            reductions and exp/log/pow, and raises the opset to 19 for FP16 Q/DQ scales.
        target_sqnr: leave the most sensitive layers float until the first output's SQNR against the float
            model reaches this many dB on the evaluation data (which it then needs).
        scheme: ``int8`` (default; ``scale = amax / 127``, int8 zero point) or ``fp8`` (E4M3, ``scale = amax /
            448``, FLOAT8E4M3FN zero point, opset 19; TensorRT on Hopper and later).
        workers: calibrate with this many local processes, each observing a shard of the data with its own ONNX
            Runtime session; the ranges are bit-identical to one process's.
        ray_address: calibrate the shards as Ray tasks (``""`` starts a local Ray, else a cluster address);
            needs ``pip install "qdq[ray]"``.
        optimize: how hard to work for accuracy beyond calibrated ranges (``qdq.optimize``): 0 is nearest
            rounding and nothing else; 1 (default) adds cross-layer equalization of the Conv pairs predicted
            to gain, SmoothQuant (every MatMul/Gemm input with outlier channels), bias correction, and leaves
            float the depthwise Convs whose input channels are very uneven (uneven-depthwise); 2 adds learned
            rounding (greedy up/down flips per weight). Equalization, bias correction and learned rounding are
            each kept only if the model's outputs on the calibration data get closer to float's; level 2 costs
            more time (README, "Accuracy techniques").
        techniques: exactly these techniques (names in ``qdq.optimize.TECHNIQUES``), overriding the level's
            set; ``()`` for none.
        max_top1_drop: likewise, until the first output's top-1 agreement with the float model is at least
            100 - this percent (a classifier's ``[batch, classes]`` output).
    """

    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    num_bins: int = 2048
    max_tensors_per_pass: int | None = None
    batch_size: int | None = None
    weights: WeightFormat = "int8"
    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    include_op_types: tuple[str, ...] = ()
    high_precision: str = "fp32"
    target_sqnr: float | None = None
    max_top1_drop: float | None = None
    scheme: str = "int8"
    workers: int = 1
    ray_address: str | None = None
    optimize: int = 1
    techniques: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("exclude_nodes", "exclude_op_types", "include_op_types"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{field} must be a sequence of strings, got {value!r}")
            object.__setattr__(self, field, tuple(value))
        if unquantizable := [t for t in self.include_op_types if t in RECURRENT_OPS | CONTROL_FLOW_OPS]:
            raise ValueError(f"include_op_types: {', '.join(unquantizable)} cannot be quantized with Q/DQ on its "
                             "inputs (a recurrent layer's weights and a control-flow op's subgraphs are inside the "
                             "op; If branches are quantized anyway, see qdq.branches)")
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude_nodes: {pattern!r} is not a regular expression ({exc})") from None
        if self.optimize not in (0, 1, 2):
            raise ValueError(f"optimize must be 0, 1 or 2, got {self.optimize!r}")
        if self.techniques is not None:
            if isinstance(self.techniques, str) or not all(isinstance(t, str) for t in self.techniques):
                raise ValueError(f"techniques must be a sequence of names, got {self.techniques!r}")
            object.__setattr__(self, "techniques", tuple(self.techniques))
            if unknown := [t for t in self.techniques if t not in TECHNIQUES]:
                raise ValueError(f"unknown techniques {', '.join(unknown)}: choose from {', '.join(TECHNIQUES)}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.target_sqnr is not None and not (isinstance(self.target_sqnr, int | float)
                                                 and math.isfinite(self.target_sqnr)):
            raise ValueError(f"target_sqnr must be a finite number of dB, got {self.target_sqnr!r}")
        if self.max_top1_drop is not None and not 0 <= self.max_top1_drop < 100:
            raise ValueError(f"max_top1_drop must be a percentage in [0, 100), got {self.max_top1_drop!r}")
        if self.high_precision not in HIGH_PRECISIONS:
            raise ValueError(f"high_precision must be one of {', '.join(HIGH_PRECISIONS)}, got {self.high_precision!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        self.calibration()  # validates the calibration options
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")

    def calibration(self) -> CalibrationOptions:
        return CalibrationOptions(method=self.method, percentile=self.percentile, num_bins=self.num_bins,
                                  max_tensors_per_pass=self.max_tensors_per_pass, scheme=self.quant_scheme(),
                                  workers=self.workers, ray_address=self.ray_address)

    def quant_scheme(self) -> Scheme:
        scheme = SCHEMES[self.scheme]
        return with_fp16_scales(scheme) if self.high_precision == "fp16" else scheme

    def placement(self) -> PlacementOptions:
        return PlacementOptions(per_channel=self.per_channel, exclude_nodes=self.exclude_nodes,
                                exclude_op_types=self.exclude_op_types, include_op_types=self.include_op_types,
                                scheme=self.scheme)

    def to_json(self) -> str:
        """The options as compact, key-sorted JSON (recorded in the output model's metadata).

        Where calibration ran (``workers``, ``ray_address``) is left out: it does not change the output.
        """
        options = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("workers", "ray_address")}
        return json.dumps(options, sort_keys=True, separators=(",", ":"))
