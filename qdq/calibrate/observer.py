"""The observer: runs calibration data through an executor and yields each batch's values of the watched tensors.

ONNX Runtime is today's executor. An observer knows nothing of statistics or methods; another executor is
another class with the same ``observe``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np
import onnx

from qdq.calibrate.data import Batch, Dataset
from qdq.errors import DataError
from qdq.model_io import first_line
from qdq.runtime import session_exposing, session_reducing

WHAT = "the model prepared for calibration"


@dataclass(frozen=True)
class Observation:
    """One batch: ``(tensor, values, owned)`` per watched tensor. ``owned`` values may be overwritten in place
    (ORT outputs nobody reads again; graph inputs are the caller's). With ``extremes`` the executor reduced each
    tensor to ``[min, max]`` itself."""

    batch: Batch
    values: list[tuple[str, np.ndarray, bool]]


class Observer(Protocol):
    """Yields, batch by batch, the values of the tensors it was made to watch."""

    def observe(self, data: Dataset) -> Iterator[Observation]: ...


class OrtObserver:
    """ONNX Runtime on a copy of the model that exposes the watched tensors as outputs.

    With ORT's optimisations: fused kernels (Conv+BatchNorm+Relu, as TensorRT fuses them) run about twice as
    fast and differ from the graph's unfused ops only by float rounding. With ``extremes=True`` (max
    calibration) ORT reduces each tensor to its min and max itself, sparing the copies of whole activations; a
    batch with a non-finite value is run again exposing the whole tensors, so the caller can count them.
    """

    def __init__(self, model: onnx.ModelProto, names: list[str], *, extremes: bool) -> None:
        graph_inputs = {i.name for i in model.graph.input}
        self.model = model
        self.exposed = [n for n in names if n not in graph_inputs]
        self.fed = [n for n in names if n in graph_inputs]
        self.extremes = extremes and bool(self.exposed)
        self.full = None
        if not self.exposed:
            self.session, self.outputs = None, []
        elif self.extremes:
            self.session, self.outputs = session_reducing(model, self.exposed, what=WHAT)
        else:
            self.session, self.outputs = session_exposing(model, self.exposed, what=WHAT), self.exposed

    def observe(self, data: Dataset) -> Iterator[Observation]:
        for number, batch in enumerate(data, start=1):
            try:
                values = self.run(batch)
            except Exception as exc:  # ORT's InvalidArgument / Fail
                raise DataError(f"ONNX Runtime failed on batch {number} of {data.name}: {first_line(exc)}") from exc
            seen = [(name, value, True) for name, value in zip(self.exposed, values, strict=True)]
            seen += [(name, batch.feeds[name], False) for name in self.fed]
            yield Observation(batch, seen)

    def run(self, batch: Batch) -> list[np.ndarray]:
        if self.session is None:
            return []
        values = self.session.run(self.outputs, batch.feeds)
        if not self.extremes:
            return values
        if all(np.isfinite(v).all() for v in values):  # a NaN anywhere makes the sum NaN
            return [np.stack(values[i:i + 2]) for i in range(0, len(values), 3)]
        self.full = self.full or session_exposing(self.model, self.exposed, what=WHAT)
        return self.full.run(self.exposed, batch.feeds)


# Executor name -> observer factory ``(model, names, extremes=...)``: a second executor is one more entry.
OBSERVERS: Mapping[str, Callable[..., Observer]] = MappingProxyType({"onnxruntime": OrtObserver})
