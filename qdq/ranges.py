"""Per-tensor ranges (amax) and qdq's JSON range file."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qdq.errors import DataError

FORMAT = "qdq-ranges"
VERSION = 1


@dataclass(frozen=True)
class TensorRanges:
    """``amax`` per tensor name, and how they were obtained."""

    amax: Mapping[str, float]
    method: str = "max"
    samples: int = 0
    extra: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.amax.items():
            if not (isinstance(value, float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"tensor {name!r}: amax must be a finite float >= 0, got {value!r}")

    def __contains__(self, name: str) -> bool:
        return name in self.amax

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.amax))

    def __len__(self) -> int:
        return len(self.amax)

    def names(self) -> set[str]:
        return set(self.amax)

    def to_json(self) -> str:
        tensors = {name: {"amax": self.amax[name], **self.extra.get(name, {})} for name in sorted(self.amax)}
        doc = {"format": FORMAT, "version": VERSION, "method": self.method, "samples": self.samples,
               "tensors": tensors}
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "the ranges") -> TensorRanges:
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT:
                raise DataError(f"{where}: not a qdq range file (no \"format\": \"{FORMAT}\")")
            amax = {name: float(entry["amax"]) for name, entry in doc["tensors"].items()}
            return cls(amax, method=str(doc.get("method", "unknown")), samples=int(doc.get("samples", 0)))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{where}: malformed qdq range file ({exc})") from exc
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        from qdq.model_io import write_atomic

        write_atomic(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TensorRanges:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        return cls.from_json(text, where=str(path))
