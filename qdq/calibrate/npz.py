"""Read ``.npz`` members row block by row block, so data files larger than memory stream through.

``numpy.load`` reads a whole member at once; here each member's ``.npy`` header is parsed and rows are read
from the (possibly compressed) zip stream on demand. Pickled (object) arrays are refused.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tokenize import TokenError

import numpy as np
from numpy.lib import format as npy_format

from qdq.errors import DataError, shown

WHOLE_READ_LIMIT = 1 << 30  # Fortran-order members cannot be streamed by rows; larger ones are refused


@dataclass(frozen=True)
class Member:
    """One array in an npz file: its key, dtype and shape, read from the header only."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_members(path: Path) -> dict[str, Member]:
    """The arrays an npz file holds, without reading their data."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as stream:
                    member = _header(path, info.filename[:-4], stream)
                    # Checked before inflating anything: a deflate bomb declares far more than its zip entry holds.
                    if member.nbytes > info.file_size - stream.tell():
                        raise DataError(f"{path}: array {shown(member.key)} declares shape {list(member.shape)} "
                                        f"({member.nbytes / 1e6:.6g} MB) but its zip entry holds "
                                        f"{info.file_size / 1e6:.6g} MB: the file is damaged")
                    members[member.key] = member
            return members
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc


def iter_rows(path: Path, keys: list[str], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{key: array}`` blocks of at most ``rows`` rows along axis 0, all keys in lockstep."""
    with zipfile.ZipFile(path) as archive:
        streams = {key: archive.open(f"{key}.npy") for key in keys}
        try:
            heads = {key: _header(path, key, stream) for key, stream in streams.items()}
            total = min(head.shape[0] for head in heads.values())
            if any(head.fortran for head in heads.values()):
                if (size := sum(head.nbytes for head in heads.values())) > WHOLE_READ_LIMIT:
                    raise DataError(f"{path}: Fortran-order arrays are read whole, and these take {size / 2**30:.3g} "
                                    "GiB; save them in C order (np.ascontiguousarray) to stream them")
                # Fortran order cannot be cut into rows from a stream: read those members whole.
                whole = {k: np.load(path, allow_pickle=False)[k] for k in keys}
                for start in range(0, total, rows):
                    yield {k: np.ascontiguousarray(v[start:start + rows]) for k, v in whole.items()}
                return
            for start in range(0, total, rows):
                count = min(rows, total - start)
                yield {key: _read(path, stream, heads[key], count) for key, stream in streams.items()}
        finally:
            for stream in streams.values():
                stream.close()


def _header(path: Path, key: str, stream) -> Member:
    try:
        version = npy_format.read_magic(stream)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except (ValueError, EOFError, SyntaxError, TokenError, RecursionError, MemoryError, TypeError) as exc:
        raise DataError(f"{path}: array {shown(key)} has an unreadable .npy header ({type(exc).__name__})") from exc
    if dtype.hasobject:
        raise DataError(f"{path}: array {shown(key)} holds Python objects (pickle); qdq reads numeric arrays only")
    return Member(key, dtype, tuple(shape), fortran)


def _read(path: Path, stream, head: Member, count: int) -> np.ndarray:
    row_shape = head.shape[1:]
    nbytes = count * math.prod(row_shape) * head.dtype.itemsize
    buffer = stream.read(nbytes)
    if len(buffer) != nbytes:
        raise DataError(f"{path}: array {shown(head.key)} is truncated")
    return np.frombuffer(buffer, dtype=head.dtype).reshape((count, *row_shape)).copy()
