"""Calibration: data sources, streaming statistics, range collection with ONNX Runtime."""

from qdq.calibrate.collect import collect_ranges
from qdq.calibrate.data import Batch, Dataset, InputSpec, input_specs, open_data

__all__ = ["Batch", "Dataset", "InputSpec", "collect_ranges", "input_specs", "open_data"]
