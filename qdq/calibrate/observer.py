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
from qdq.graph import GraphIndex
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
    Nonnegative tensors (a Relu's output) are reduced by pooling ops that keep ORT's blocked layout.
    """

    def __init__(self, model: onnx.ModelProto, names: list[str], *, extremes: bool) -> None:
        graph_inputs = {i.name for i in model.graph.input}
        self.model = model
        self.exposed = [n for n in names if n not in graph_inputs]
        self.fed = [n for n in names if n in graph_inputs]
        self.extremes = extremes and bool(self.exposed)
        self.full = None
        self.groups: list[tuple[str, ...]] = []  # with extremes: each exposed tensor's reduced outputs
        if not self.exposed:
            self.session = None
        elif self.extremes:
            self.session, self.groups = session_reducing(model, self.exposed, pooled=poolable(model, self.exposed),
                                                         what=WHAT)
        else:
            self.session = session_exposing(model, self.exposed, what=WHAT)

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
        if not self.extremes:
            return self.session.run(self.exposed, batch.feeds)
        outputs = [o for group in self.groups for o in group]
        values = dict(zip(outputs, self.session.run(outputs, batch.feeds), strict=True))
        if all(np.isfinite(v).all() for v in values.values()):  # a NaN anywhere makes a sum or an average NaN
            return [extremes(*(values[o] for o in group)) for group in self.groups]
        self.full = self.full or session_exposing(self.model, self.exposed, what=WHAT)
        return self.full.run(self.exposed, batch.feeds)


def extremes(*reduced: np.ndarray) -> np.ndarray:
    """``[min, max]`` of a tensor from its ``(min, max, sum)``, or from ``(max, average)`` when it is nonnegative
    (its min is then given as 0: only max|x| is used)."""
    if len(reduced) == 3:
        return np.stack(reduced[:2])
    return np.array([0.0, reduced[0].max(initial=0.0)], dtype=np.float32)


def poolable(model: onnx.ModelProto, names: list[str]) -> frozenset[str]:
    """The tensors ORT can reduce in its blocked layout: float, rank >= 3, never negative by their ops."""
    index = GraphIndex(model)
    return frozenset(n for n in names if index.elem_type(n) == onnx.TensorProto.FLOAT
                     and (index.rank(n) or 0) >= 3 and index.nonnegative(n))


# Executor name -> observer factory ``(model, names, extremes=...)``: a second executor is one more entry.
OBSERVERS: Mapping[str, Callable[..., Observer]] = MappingProxyType({"onnxruntime": OrtObserver})
