"""qdq's exceptions: one hierarchy, messages a user can act on.

The CLI catches :class:`QdqError` once, prints its message on one line and exits with its ``exit_code``.
"""

from __future__ import annotations


class QdqError(Exception):
    """Base of every error qdq raises on purpose. The message names the file, tensor or node at fault."""

    exit_code = 1


class ModelError(QdqError):
    """The model cannot be read, is invalid, or cannot be prepared for quantization."""


class DataError(QdqError):
    """Calibration or evaluation data is missing or does not fit the model's inputs."""


class CalibrationError(QdqError):
    """Ranges cannot be collected, or a collected range is unusable."""


class PlacementError(QdqError):
    """The model cannot be planned for quantization (for example, it is quantized already)."""


class OutputError(QdqError):
    """The output cannot be written where it was asked to go."""


class MissingDependencyError(QdqError):
    """An optional dependency (TensorRT, ...) is not installed."""

    exit_code = 3
