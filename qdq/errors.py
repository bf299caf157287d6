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


class ArgumentError(QdqError, TypeError):
    """An API function was called with an argument of the wrong type."""


NAME_LIMIT = 80  # characters of a name a message shows; longer names keep their start and end


def shown(name: object, limit: int = NAME_LIMIT) -> str:
    """A name from a model or a file as messages show it: quoted, control characters escaped, long ones shortened.

    Names come from files a user may not control: an ANSI escape or a 50 MB name must not reach the terminal.
    """
    text = repr(str(name))
    if len(text) <= limit:
        return text
    keep = limit // 2 - 2
    return f"{text[:keep]}...{text[-keep:]} ({len(str(name))} characters)"


WORD_LIMIT, LINE_LIMIT = 120, 2000


def printable(text: str) -> str:
    """Text for a terminal: control characters escaped, words over 120 and lines over 2000 characters shortened.

    The CLI passes every message and every printed line through this, wherever the names in it came from.
    """
    lines = []
    for line in str(text).split("\n"):
        line = "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)
        words = [w if len(w) <= WORD_LIMIT else f"{w[:50]}...{w[-50:]} ({len(w)} characters)"
                 for w in line.split(" ")]
        line = " ".join(words)
        if len(line) > LINE_LIMIT:
            line = f"{line[:LINE_LIMIT // 2]} ... {line[-LINE_LIMIT // 4:]}"
        lines.append(line)
    return "\n".join(lines)
