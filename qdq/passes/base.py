"""The pass contract: a pass takes a model and returns a PassResult; a Pipeline of passes is itself a pass.

Every pass says whether it edits the model it is given (``in_place = True``: the caller must not reuse its
input) or leaves it untouched and returns a new one (``in_place = False``). Calling a pass (``p(model)``)
checks its precondition (``requires``), runs it, and checks its postcondition (``ensures``); a failure names
the pass, and in a pipeline the passes that ran before it (as onnx-ir's pass infrastructure does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

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


class PassError(ModelError):
    """A pass's precondition or postcondition does not hold, or the pass failed unexpectedly."""


class Pass:
    """One job on a model. Subclasses set ``name`` and ``in_place`` and implement ``run``."""

    name: str = "pass"
    in_place: bool = False

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise (a QdqError naming what is missing) when ``model`` is not fit for this pass."""

    def ensures(self, model: onnx.ModelProto) -> None:
        """Raise when the pass's result breaks what it promises."""

    def run(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        result = self.run(model)
        self.ensures(result.model)
        return result


class Pipeline(Pass):
    """Passes run in order, as one pass: edits in place when any member does; notes gathered in order.

    ``until_fixed`` repeats the whole sequence until a round modifies nothing (at most ``max_rounds``).
    """

    def __init__(self, passes: Sequence[Pass], *, name: str | None = None, until_fixed: bool = False,
                 max_rounds: int = 8) -> None:
        self.passes = tuple(passes)
        self.name = name or "+".join(p.name for p in self.passes)
        self.in_place = any(p.in_place for p in self.passes)
        self.until_fixed, self.max_rounds = until_fixed, max_rounds

    def run(self, model: onnx.ModelProto) -> PassResult:
        notes: list[str] = []
        modified = False
        for _ in range(self.max_rounds if self.until_fixed else 1):
            model, changed = self.run_once(model, notes)
            modified |= changed
            if not changed:
                break
        return PassResult(model, modified, tuple(notes))

    def run_once(self, model: onnx.ModelProto, notes: list[str]) -> tuple[onnx.ModelProto, bool]:
        done: list[str] = []
        modified = False
        for p in self.passes:
            try:
                result = p(model)
            except QdqError as exc:
                if done and isinstance(exc, PassError):
                    raise PassError(f"{exc} (after {', '.join(done)})") from exc
                raise
            except Exception as exc:
                after = f" (after {', '.join(done)})" if done else ""
                raise PassError(f"pass {p.name}{after} failed: {first_line(exc)}") from exc
            for note in result.notes:
                log.info("%s", note)
            notes.extend(result.notes)
            model, modified = result.model, modified or result.modified
            done.append(p.name)
        return model, modified


def run_passes(model: onnx.ModelProto, passes: Sequence[Pass]) -> tuple[onnx.ModelProto, list[str]]:
    """Run ``passes`` as one Pipeline; return the final model and every note the passes made."""
    result = Pipeline(passes)(model)
    return result.model, list(result.notes)
