"""The files one run reads and writes: no output may be an input or another output, and outputs land together.

A command registers every file it reads (the model and its external data, data, labels, range files) and every
file it writes. Each output is refused when it is, or resolves to (symlink, hard link, ``x/../x``), a file the
run reads or another of its outputs. Outputs are staged in a private folder beside their target and committed
only when the whole run succeeded; a failure leaves every existing file as it was.

Targets that are not regular files (a FIFO, ``/dev/null``, ``/dev/stdout``) are written through, as ``cp`` and
``tee`` do, never renamed over: replacing ``/dev/null`` with a regular file would break the system.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from qdq.errors import DataError, ModelError, OutputError

log = logging.getLogger(__name__)

KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}


def kind(mode: int) -> str:
    return KINDS.get(stat.S_IFMT(mode), "not a regular file")


def regular_file(path: str | os.PathLike[str], what: str, error: type[Exception] = DataError) -> Path:
    """``path`` if it is a regular file (after symlinks); else an error. Never opens it: a FIFO would hang."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such file ({what})") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is {kind(mode)}, not a regular file; qdq reads the {what} from regular files only")
    return path


def read_bounded(path: str | os.PathLike[str], what: str, *, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; larger files are refused before they are read."""
    path = regular_file(path, what)
    try:
        with path.open("rb") as stream:
            data = stream.read(max_bytes + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    if len(data) > max_bytes:
        raise DataError(f"{path}: the {what} is larger than qdq's limit of {max_bytes / 1e6:g} MB; is this the "
                        "right file?")
    return data


@dataclass(frozen=True)
class Identity:
    """What makes two paths the same file: the inode when it exists, else the fully resolved path."""

    path: str
    inode: tuple[int, int] | None

    @classmethod
    def of(cls, path: Path) -> Identity:
        try:
            info = os.stat(path)
            inode = (info.st_dev, info.st_ino)
        except (OSError, ValueError):
            inode = None
        return cls(os.path.realpath(path), inode)

    def same(self, other: Identity) -> bool:
        return self.path == other.path or (self.inode is not None and self.inode == other.inode)


@dataclass
class Output:
    """One output: the path the user gave, where it lands, and where it is staged until the commit."""

    given: Path
    what: str
    target: Path  # the regular file to replace (symlinks resolved), or the special file to write through
    special: bool
    workdir: Path

    @property
    def staged(self) -> Path:
        return self.workdir / self.target.name


class RunFiles:
    """The inputs and outputs of one run. Use as a context manager: outputs commit when the block succeeds.

    >>> with RunFiles() as files:
    ...     files.reads(model_path, "model")
    ...     staged = files.writes(output_path, "-o")   # refused here if it clashes with an input
    ...     save(staged)                               # written to the staging folder
    ... # committed here, all outputs together; on an exception every staging folder is removed instead
    """

    def __init__(self) -> None:
        self.inputs: list[tuple[Path, str, Identity]] = []
        self.outputs: list[Output] = []
        self.pending: list[tuple[Path, str]] = []  # files updated in place that do not exist yet

    def reads(self, path: str | os.PathLike[str] | None, what: str) -> None:
        """Register a file the run reads (a folder: the ``.npz`` files in it). Non-regular files are refused."""
        if path is None:
            return
        path = Path(path)
        if path.is_dir():
            for member in sorted(path.iterdir()):
                if member.suffix == ".npz" and member.is_file():
                    self.inputs.append((member, what, Identity.of(member)))
            return
        regular_file(path, what)
        self.inputs.append((path, what, Identity.of(path)))

    def reads_model(self, path: str | os.PathLike[str]) -> None:
        """Register a model and the external-data files it names (only those inside its folder exist for qdq)."""
        from qdq.model_io import external_data_files

        path = regular_file(path, "model", error=ModelError)
        self.inputs.append((path, "the model", Identity.of(path)))
        for data in external_data_files(path):
            self.inputs.append((data, f"external data of {path.name}", Identity.of(data)))

    def updates(self, path: str | os.PathLike[str], what: str) -> None:
        """Register a file the run reads and rewrites in place (a timing cache): no output may be it.

        It may not exist yet; then no output may take its path either.
        """
        path = Path(path)
        if path.exists():
            self.reads(path, what)
            return
        for output in self.outputs:
            if output.target.resolve() == path.resolve():
                raise OutputError(f"{output.given} ({output.what}) is also {path} ({what}); give each its own path")
        self.pending.append((path, what))

    def writes(self, path: str | os.PathLike[str], what: str) -> Path:
        """Register an output, refuse it if it clashes, and return the staged path to write it to."""
        output = prepare_output(Path(path), what)
        self.refuse_clash(output.given, what, Identity.of(output.target))
        for other, other_what in self.pending:
            if other.resolve() == output.target.resolve():
                raise OutputError(f"{output.given} ({what}) is also {other} ({other_what}); give each its own path")
        output.workdir = Path(tempfile.mkdtemp(prefix=f".{output.target.name}.", dir=staging_folder(output)))
        self.outputs.append(output)
        return output.staged

    def refuse_clash(self, path: Path, what: str, identity: Identity, *, besides: Output | None = None) -> None:
        for source, source_what, source_id in self.inputs:
            if identity.same(source_id):
                raise OutputError(f"{path} ({what}) would overwrite the input {source} ({source_what}), which "
                                  "this run reads; choose another output path")
        for other in self.outputs:
            if other is not besides and identity.same(Identity.of(other.target)):
                raise OutputError(f"{path} ({what}) would overwrite {other.given} ({other.what}), another output "
                                  "of this run; give each output its own path")

    def commit(self) -> None:
        """Move every staged output into place: checks first, then writes through special files, renames last."""
        moves: list[tuple[Path, Path]] = []
        for output in self.outputs:
            produced = sorted(output.workdir.iterdir(), key=lambda p: p.name == output.target.name)
            if not output.staged.exists():
                raise OutputError(f"{output.given}: nothing was written ({output.what})")
            if output.special and len(produced) > 1:
                raise OutputError(f"{output.given} is {kind(os.stat(output.target).st_mode)}; a model with "
                                  "external data can only be written to a regular file")
            for file in produced:
                destination = output.target.parent / file.name
                if file.name != output.target.name:
                    self.refuse_clash(destination, f"external data of {output.what}", Identity.of(destination),
                                      besides=output)
                moves.append((file, destination))
        try:
            for output in self.outputs:
                if output.special:
                    write_through(output.staged, output.target)
            for file, destination in moves:
                if not any(o.special and o.staged == file for o in self.outputs):
                    os.replace(file, destination)
        except OSError as exc:
            raise OutputError(f"{exc.filename or 'output'}: cannot write ({exc.strerror or exc})") from exc
        finally:
            self.discard()

    def discard(self) -> None:
        for output in self.outputs:
            shutil.rmtree(output.workdir, ignore_errors=True)
        self.outputs.clear()

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, kind_: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
                 ) -> None:
        if kind_ is None:
            self.commit()
        else:
            self.discard()


def prepare_output(path: Path, what: str) -> Output:
    """Where ``path`` lands: a regular file (through symlinks) to replace, or a FIFO/character device."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: cannot write ({what}: {getattr(exc, 'strerror', None) or exc})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"{path}: is a directory; give a file name such as {path / 'model.qdq.onnx'}")
    if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path}: no permission to write ({what})")
        return Output(path, what, path, True, Path())
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{path}: is {kind(mode)}; qdq writes regular files, FIFOs and character devices only")
    target = Path(os.path.realpath(path))
    parent = target.parent
    if not Path(path).parent.is_dir() or not parent.is_dir():
        raise OutputError(f"{path}: the directory {Path(path).parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: no permission to write in {parent}")
    return Output(path, what, target, False, Path())


def staging_folder(output: Output) -> Path:
    """Regular targets stage beside themselves (one filesystem: the rename is atomic); special ones in /tmp."""
    return Path(tempfile.gettempdir()) if output.special else output.target.parent


def write_through(source: Path, target: Path) -> None:
    """Copy ``source`` into an existing FIFO or device without creating, truncating or replacing it."""
    descriptor = os.open(target, os.O_WRONLY | os.O_NOCTTY)
    with os.fdopen(descriptor, "wb") as sink, source.open("rb") as data:
        shutil.copyfileobj(data, sink, 1 << 20)

