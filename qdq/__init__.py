"""qdq: float ONNX models to explicitly quantized INT8 (QuantizeLinear/DequantizeLinear) for TensorRT."""

__version__ = "0.1.0"

from qdq.config import QuantizeConfig  # noqa: E402
from qdq.errors import QdqError  # noqa: E402
from qdq.quantize import QuantizeResult, Report, calibrate, explain, prepare, quantize, sensitivity  # noqa: E402
from qdq.ranges import TensorRanges  # noqa: E402

__all__ = ["QdqError", "QuantizeConfig", "QuantizeResult", "Report", "TensorRanges", "__version__", "calibrate",
           "explain", "prepare", "quantize", "sensitivity"]
