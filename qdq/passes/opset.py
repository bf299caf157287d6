"""Raise the model's opset to the one qdq writes (13: per-channel DequantizeLinear needs ``axis``)."""

from __future__ import annotations

import onnx
from onnx import version_converter

from qdq.errors import ModelError
from qdq.graph import default_opset, restore_weights, structure_only
from qdq.model_io import first_line
from qdq.passes.base import Pass, PassResult

MIN_OPSET = 13
# ONNX's versioning table: opset 13 came with IR version 7.
MIN_IR_FOR_OPSET_13 = 7


class UpgradeOpset(Pass):
    """Convert a model below opset 13 with ONNX's version converter, and say so."""

    name = "upgrade-opset"
    in_place = False

    def __init__(self, minimum: int = MIN_OPSET) -> None:
        self.minimum = minimum

    def run(self, model: onnx.ModelProto) -> PassResult:
        current = default_opset(model)
        if current >= self.minimum:
            return PassResult(model, modified=False)
        try:
            upgraded = restore_weights(version_converter.convert_version(structure_only(model), self.minimum), model)
        except Exception as exc:  # the converter raises ConvertError, RuntimeError or IndexError
            raise ModelError(
                f"the model's opset {current} is below {self.minimum}, which per-channel Q/DQ needs, and ONNX's "
                f"version converter could not upgrade it: {first_line(exc)}; re-export the model at opset "
                f"{self.minimum} or later"
            ) from exc
        # Custom domains (com.microsoft, which every model ONNX Runtime saved declares) are not in ONNX's IR table.
        needed = onnx.helper.find_min_ir_version_for(list(upgraded.opset_import), ignore_unknown=True)
        upgraded.ir_version = max(upgraded.ir_version, MIN_IR_FOR_OPSET_13, needed)
        return PassResult(upgraded, modified=True, notes=(f"opset raised from {current} to {self.minimum}",))
