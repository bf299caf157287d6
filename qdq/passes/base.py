"""The pass contract: a pass takes a model and returns a PassResult; a pipeline runs passes in order."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import onnx

from qdq.errors import ModelError, QdqError
from qdq.model_io import first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) model, whether it changed, and notes for the user."""

    model: onnx.ModelProto
    modified: bool
    notes: tuple[str, ...] = field(default_factory=tuple)


class Pass(Protocol):
    name: str

    def run(self, model: onnx.ModelProto) -> PassResult: ...


def run_passes(model: onnx.ModelProto, passes: Sequence[Pass]) -> tuple[onnx.ModelProto, list[str]]:
    """Run ``passes`` in order; return the final model and every note the passes made.

    An unexpected failure inside a pass becomes a ModelError that names the pass and the ones before it.
    """
    notes: list[str] = []
    done: list[str] = []
    for p in passes:
        try:
            result = p.run(model)
        except QdqError:
            raise
        except Exception as exc:
            after = f" (after {', '.join(done)})" if done else ""
            raise ModelError(f"pass {p.name}{after} failed: {first_line(exc)}") from exc
        for note in result.notes:
            log.info("%s", note)
        notes.extend(result.notes)
        model = result.model
        done.append(p.name)
    return model, notes
