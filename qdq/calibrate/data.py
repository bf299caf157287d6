"""Calibration and evaluation data: npz files, folders of them, in-memory arrays, or iterables of feeds.

Three npz layouts (../specs/scheme.md), told apart by rank: an array of the input's rank is cut into batches
along its first (batch) axis; an array of one rank more stacks whole model inputs, fed one per run. When arrays
of the inputs' ranks cannot be batches along a first axis (an input is a scalar, or their first dims differ where
an input's first dim is fixed: a recurrent state ``[layers, batch, hidden]`` beside a ``[batch, time]`` signal),
the file is one run's inputs, fed as they are.
Everything is validated against the model's inputs before any inference runs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qdq.calibrate.npz import iter_rows, read_members
from qdq.errors import DataError, shown
from qdq.files import regular_file

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
# One run's inputs may take at most this much memory. Checked on the declared shapes before anything is read, so
# a damaged or hostile file (a deflate bomb declaring a huge dynamic dimension) fails at once instead of inflating.
RUN_BYTES_LIMIT = 1 << 30

Dim = int | str | None
DataLike = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (``str``/``None`` for dynamic dims; ``None`` if rank unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype} [{dims}]"


@dataclass(frozen=True)
class Batch:
    """One inference run's inputs, and how many samples it holds."""

    feeds: dict[str, np.ndarray]
    samples: int


def per_sample(value: np.ndarray, samples: int) -> list[np.ndarray]:
    """A tensor of a run of ``samples`` samples, split by sample along its first axis, which holds them whole
    (``[batch, ...]``) or with other rows flattened in (a ``[batch*tokens, features]`` Gemm input, Swin's windows);
    when it does not divide, the whole run as one sample. Counting its rows instead would count tokens."""
    if value.ndim == 0 or samples <= 1 or value.shape[0] % samples:
        return [value]
    return np.split(value, samples)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


class ArrayData:
    """Arrays keyed by input name (an npz file's, or in memory), cut into runs per the layout rules."""

    def __init__(self, where: str, meta: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                 specs: list[InputSpec], batch_size: int | None) -> None:
        self.where = where
        self.layout, self.samples = check_layout(where, meta, specs)
        self.rows = resolve_batch_size(where, specs, batch_size) if self.layout == "batched" else 1
        fixed = self.layout == "batched" and any(s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0
                                                 for s in specs)
        if fixed and self.samples < self.rows:
            raise DataError(f"{where}: {self.samples} samples, fewer than the model's fixed batch size {self.rows}")
        self.usable = self.samples - self.samples % self.rows if fixed else self.samples
        check_run_bytes(where, meta, None if self.layout == "feed" else min(self.rows, self.samples))
        if self.usable < self.samples:
            log.warning("%s: the last %d samples do not fill a batch of %d and are skipped",
                        where, self.samples - self.usable, self.rows)

    def runs(self) -> int:
        return -(-self.usable // self.rows)

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        seen = 0
        for block in self.blocks():
            if seen >= self.usable:
                return
            if self.layout == "feed":
                yield Batch(block, samples=1)
                return
            if self.layout == "stacked":
                # v[0] of a stacked scalar input would be a numpy scalar, which ONNX Runtime does not take.
                yield Batch({k: np.asarray(v[0]) for k, v in block.items()}, samples=1)
            else:
                yield Batch(block, samples=next(iter(block.values())).shape[0])
            seen += next(iter(block.values())).shape[0]


class NpzData(ArrayData):
    def __init__(self, path: Path, specs: list[InputSpec], batch_size: int | None) -> None:
        self.path = regular_file(path, "data")
        members = read_members(path)
        super().__init__(str(path), {k: (m.dtype, m.shape) for k, m in members.items()}, specs, batch_size)
        self.keys = [s.name for s in specs]

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        if self.layout == "feed":  # one run's inputs, at most RUN_BYTES_LIMIT (checked): read whole
            with np.load(self.path, allow_pickle=False) as arrays:
                yield {k: arrays[k] for k in self.keys}
            return
        yield from iter_rows(self.path, self.keys, self.rows)


class InMemoryData(ArrayData):
    def __init__(self, arrays: Mapping[str, np.ndarray], specs: list[InputSpec], batch_size: int | None) -> None:
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        super().__init__("the data", {k: (v.dtype, v.shape) for k, v in self.arrays.items()}, specs, batch_size)

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        if self.layout == "feed":
            yield self.arrays
            return
        for start in range(0, self.usable, self.rows):
            yield {k: v[start:start + self.rows] for k, v in self.arrays.items()}


class FeedData:
    """An iterable of ``{input name: array}`` feeds, each fed as one run, checked as it comes."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]], specs: list[InputSpec]) -> None:
        self.feeds, self.specs, self.where = feeds, specs, "the data"

    def runs(self) -> int | None:
        return len(self.feeds) if hasattr(self.feeds, "__len__") else None

    def rereadable(self) -> bool:
        return iter(self.feeds) is not self.feeds

    def __iter__(self) -> Iterator[Batch]:
        for i, feed in enumerate(self.feeds):
            if not isinstance(feed, Mapping):
                raise DataError(f"item {i} of the data is a {type(feed).__name__}, expected a dict of arrays")
            arrays = {k: np.asarray(v) for k, v in feed.items()}
            check_names(f"item {i} of the data", arrays, self.specs)
            for spec in self.specs:
                check_array(f"item {i} of the data", spec, arrays[spec.name].dtype, arrays[spec.name].shape,
                            leading=0)
            first = arrays[self.specs[0].name]
            yield Batch(arrays, samples=first.shape[0] if first.ndim else 1)


class Dataset:
    """All batches of a data source, in a fixed order; iterate as often as needed."""

    def __init__(self, parts: list[ArrayData] | list[FeedData] | list[KeptBatches], name: str) -> None:
        self.parts, self.name = parts, name

    def runs(self) -> int | None:
        counts = [p.runs() for p in self.parts]
        return None if None in counts else sum(c for c in counts if c is not None)

    def rereadable(self) -> bool:
        """Whether iterating again gives the same batches (false for a one-shot iterator of feeds)."""
        return all(not isinstance(p, FeedData) or p.rereadable() for p in self.parts)

    def __iter__(self) -> Iterator[Batch]:
        for part in self.parts:
            yield from part

    def head(self, samples: int) -> Dataset:
        """The first batches holding ``samples`` samples (at least one batch), read now and kept."""
        kept, seen = [], 0
        for batch in self:
            if seen >= samples:
                break
            kept.append(batch)
            seen += batch.samples
        return Dataset([KeptBatches(kept)], f"the first {seen} samples of {self.name}")


class KeptBatches:
    """Batches held in memory: a Dataset part that can be read again."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def runs(self) -> int:
        return len(self.batches)

    def rereadable(self) -> bool:
        return True

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


def open_data(data: DataLike, specs: list[InputSpec], batch_size: int | None = None) -> Dataset:
    """A Dataset over ``data``: an ``.npz`` path, a folder of them, ``{name: array}``, or an iterable of those."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
            if not files:
                raise DataError(f"{path}: the folder holds no .npz files")
            return Dataset([NpzData(f, specs, batch_size) for f in files], str(path))
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        return Dataset([NpzData(path, specs, batch_size)], str(path))
    if isinstance(data, Mapping):
        return Dataset([InMemoryData(data, specs, batch_size)], "the data")
    if isinstance(data, Iterable):
        return Dataset([FeedData(data, specs)], "the data")
    raise DataError(f"cannot read data from a {type(data).__name__}: give an .npz path, a folder, "
                    "a dict of arrays or an iterable of dicts")


def check_names(where: str, present: Iterable[str], specs: list[InputSpec]) -> None:
    names = {s.name for s in specs}
    present = set(present)
    if missing := sorted(names - present):
        raise DataError(f"{where}: no array for model input {shown(missing[0])} (model inputs: {listed(names)}; "
                        f"found: {listed(present) or 'none'})")
    if extra := sorted(present - names):
        raise DataError(f"{where}: array {shown(extra[0])} is not a model input (model inputs: {listed(names)})")


def listed(names: Iterable[str], limit: int = 10) -> str:
    """Names for a message: quoted, escaped, at most ``limit`` of them."""
    ordered = sorted(names)
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return ", ".join(map(shown, ordered[:limit])) + more


def check_array(where: str, spec: InputSpec, dtype: np.dtype, shape: tuple[int, ...], *, leading: int) -> None:
    """Check an array's dtype, and its static dims after the first ``leading`` axes, against ``spec``.

    ``leading`` is 0 for a feed given as is, 1 for samples along the batch axis (the batch dim is free), and 1
    for stacked whole inputs (the stacking axis comes on top of the input's own shape).
    """
    if dtype != spec.dtype:
        raise DataError(f"{where}: input {shown(spec.name)} is {dtype}, the model expects {spec.dtype} "
                        f"({conversion_hint(spec.dtype)})")
    if spec.shape is None:
        return
    own = shape[leading:]  # dims that must match the input's trailing dims
    expected = spec.shape[len(spec.shape) - len(own):] if len(own) <= len(spec.shape) else ()
    mismatch = (leading == 0 and len(own) != len(spec.shape)) or len(own) != len(expected) or any(
        isinstance(e, int) and e > 0 and e != s for s, e in zip(own, expected, strict=True))
    if mismatch:
        raise DataError(f"{where}: input {shown(spec.name)} has shape {list(shape)}, the model expects "
                        f"{spec.describe()}")


def conversion_hint(dtype: np.dtype) -> str:
    """How to convert to ``dtype`` in numpy: ``np.float16`` exists; bfloat16 lives in ml_dtypes, strings are str."""
    if dtype.kind in "OSU":
        return "the model takes strings: give an array of str"
    if getattr(np, dtype.name, None) is not None and np.dtype(getattr(np, dtype.name)) == dtype:
        return f"convert with .astype(np.{dtype.name})"
    return f"convert with .astype(ml_dtypes.{dtype.name})" if dtype.name in ("bfloat16",) or dtype.name.startswith(
        "float8") else f"convert to {dtype}"


def check_layout(where: str, meta: Mapping[str, tuple[np.dtype, tuple[int, ...]]], specs: list[InputSpec]
                 ) -> tuple[str, int]:
    """Validate arrays against the inputs; return the layout (``batched``, ``stacked`` or ``feed``) and the number
    of samples (1 for a feed)."""
    check_names(where, meta, specs)
    if one_feed(meta, specs):
        for spec in specs:
            check_array(where, spec, *meta[spec.name], leading=0)
        return "feed", 1
    layouts = set()
    for spec in specs:
        dtype, shape = meta[spec.name]
        rank = None if spec.shape is None else len(spec.shape)
        if rank is not None and len(shape) not in (rank, rank + 1):
            raise DataError(f"{where}: input {shown(spec.name)} has shape {list(shape)}, expected {spec.describe()} "
                            f"(samples along the batch axis) or one more leading axis stacking such inputs")
        if not shape and rank == 0:
            raise DataError(f"{where}: input {shown(spec.name)} is a scalar: stack its samples along a first axis, "
                            "shape (N,)")
        if not shape or shape[0] == 0:
            raise DataError(f"{where}: input {shown(spec.name)} holds no samples (shape {list(shape)})")
        stacked = rank is not None and len(shape) == rank + 1
        layouts.add(stacked)
        check_array(where, spec, dtype, shape, leading=1)
    if len(layouts) > 1:
        raise DataError(f"{where}: some arrays stack whole inputs and others batch along axis 0; use one layout")
    counts = {meta[s.name][1][0] for s in specs}
    if len(counts) > 1:
        raise DataError(f"{where}: the inputs hold different numbers of samples ({sorted(counts)})")
    return "stacked" if layouts.pop() else "batched", counts.pop()


def one_feed(meta: Mapping[str, tuple[np.dtype, tuple[int, ...]]], specs: list[InputSpec]) -> bool:
    """Whether the arrays can only be one run's inputs as they are: each has its input's rank, and axis 0 cannot
    be their batch axis, because an input is a scalar, or the first dims differ where an input's first dim is
    fixed (a recurrent state ``[layers, batch, hidden]``). First dims that differ where all are free are a
    mistake, said as such by check_layout."""
    if any(s.shape is None or len(meta[s.name][1]) != len(s.shape) for s in specs):
        return False
    if any(not s.shape for s in specs):
        return True
    fixed_first = any(isinstance(s.shape[0], int) and s.shape[0] > 0 for s in specs)
    return fixed_first and len({meta[s.name][1][0] for s in specs}) > 1


def check_run_bytes(where: str, meta: Mapping[str, tuple[np.dtype, tuple[int, ...]]], rows: int | None) -> None:
    """Refuse data whose runs of ``rows`` samples (``None``: the whole arrays, one run) would need more than
    :data:`RUN_BYTES_LIMIT` of memory."""
    sizes = {name: math.prod(shape) * np.dtype(dtype).itemsize if rows is None else
             rows * math.prod(shape[1:]) * np.dtype(dtype).itemsize for name, (dtype, shape) in meta.items()}
    if (total := sum(sizes.values())) > RUN_BYTES_LIMIT:
        name = max(sizes, key=sizes.__getitem__)
        run, fix = ("one run", "check the file") if rows is None else (
            f"one run of {rows} samples", "use a smaller --batch-size, or check the file")
        raise DataError(f"{where}: {run} would take {total / 2**30:.3g} GiB of inputs ({shown(name)} is declared "
                        f"{list(meta[name][1])}); qdq's limit is {RUN_BYTES_LIMIT / 2**30:g} GiB per run: {fix}")


def resolve_batch_size(where: str, specs: list[InputSpec], requested: int | None) -> int:
    """The model's fixed batch size, the requested one for a dynamic batch axis, or the default."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    if len(fixed) > 1:
        raise DataError(f"{where}: the model's inputs have different fixed batch sizes {sorted(fixed)}; "
                        "stack whole inputs along a new first axis instead")
    if fixed:
        size = fixed.pop()
        if requested is not None and requested != size:
            raise DataError(f"batch size {requested} was asked for, but the model's batch axis is fixed at {size}")
        return size
    return requested or DEFAULT_BATCH_SIZE
