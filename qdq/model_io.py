"""Reading and writing ONNX models: external data aware, atomic, never touching the input."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx.external_data_helper import load_external_data_for_model

from qdq.errors import ArgumentError, ModelError, OutputError, shown
from qdq.files import Identity, RunFiles, prepare_output

log = logging.getLogger(__name__)

# Protobuf cannot serialise a message of 2 GiB or more; above this size weights go to an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(source: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """Read a model from a path (with its external data) or copy a ModelProto, and check it is valid ONNX.

    The caller's ModelProto is never modified: qdq works on a copy.
    """
    if isinstance(source, onnx.ModelProto):
        if external := external_tensors(source):
            location = next((e.value for e in external[0].external_data if e.key == "location"), "")
            raise ModelError(f"the model keeps {len(external)} tensors in external files (e.g. {shown(location)} "
                             f"for {shown(external[0].name)}), which a ModelProto cannot locate: pass the model's "
                             "path instead (qdq reads external data from the model's folder only)")
        model = onnx.ModelProto()
        model.CopyFrom(source)
        where = "the model"
    elif not isinstance(source, str | os.PathLike):
        raise ArgumentError(f"the model must be a path or an onnx.ModelProto, got a {type(source).__name__}")
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
        if path.stat().st_size == 0:
            raise ModelError(f"{path}: the file is empty, not an ONNX model")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
        except OSError as exc:
            raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        load_external_weights(model, path)
    if not model.graph.node:
        raise ModelError(f"{where}: the graph has no nodes (is this an ONNX model?)")
    try:
        if isinstance(source, onnx.ModelProto):
            check_in_memory(model, full=False)
        else:
            onnx.checker.check_model(str(source))  # by path: no Python-side serialisation of the weights
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{where}: invalid ONNX model: {first_line(exc)}") from exc
    return model


def load_external_weights(model: onnx.ModelProto, path: Path) -> None:
    """Read the weights a model keeps in external files, refusing any location outside the model's folder.

    A location that is absolute, climbs out with ``..`` or resolves (through a symlink) outside the folder could
    make qdq read an arbitrary file: such models are refused.
    """
    folder = path.resolve().parent
    for tensor in external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        name = shown(tensor.name)
        if "\0" in location:
            raise ModelError(f"{path}: tensor {name} has an external data location with a NUL character; "
                             "the model is damaged")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or ".." in Path(location).parts or not target.is_relative_to(
                folder):
            raise ModelError(f"{path}: tensor {name} points its external data at {shown(location)}, outside the "
                             "model's folder; refusing to read it (move the data file next to the model)")
        if not target.is_file():
            raise ModelError(f"{path}: tensor {name} needs the external data file {shown(location)}, which is "
                             f"not in {folder}")
        if os.path.samefile(target, path):
            raise ModelError(f"{path}: tensor {name} names the model file itself as its external data; the model "
                             "is damaged")
    try:
        load_external_data_for_model(model, str(folder))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{path}: its external data cannot be read ({first_line(exc)})") from exc


def external_data_files(path: Path) -> list[Path]:
    """The files inside the model's folder that its tensors name as external data (read without the weights)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - load_model reports an unreadable model properly
        return []
    folder = path.resolve().parent
    files = set()
    for tensor in external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and "\0" not in location and (folder / location).is_file():
            files.add(folder / location)
    return sorted(files)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def check_in_memory(model: onnx.ModelProto, *, full: bool) -> None:
    """``onnx.checker`` on a model in memory; one of 2 GB or more is checked when it is saved, by path."""
    try:
        onnx.checker.check_model(model, full_check=full)
    except (EncodeError, ValueError) as exc:  # protobuf cannot serialise 2 GB or more
        if isinstance(exc, ValueError) and "2GB" not in str(exc):
            raise
        log.info("the model is over 2 GB: it is checked by path when written")


def check_writable(path: str | os.PathLike[str], *, not_same_as: str | os.PathLike[str] | None = None) -> Path:
    """Fail early, before any long work, when ``path`` cannot be written as an output file."""
    output = prepare_output(Path(path), "output")
    if not_same_as is not None and Identity.of(output.target).same(Identity.of(Path(not_same_as))):
        raise OutputError(f"{path}: the output would overwrite the input {not_same_as}; choose another path")
    return Path(path)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, check: bool = True) -> Path:
    """Write ``model`` to ``path`` atomically: staged in the same directory, checked, then renamed.

    Models of 1.8 GB or more store their weights in ``<name>.data`` beside the model. Whatever was at
    ``path`` before survives intact when anything fails.
    """
    external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    with RunFiles() as files:
        staged_path = files.writes(path, "the model")
        try:
            if external:
                onnx.save_model(model, str(staged_path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=f"{staged_path.name}.data", size_threshold=1024)
                # Saving moved the weights out of the caller's proto: read them back so it stays whole.
                load_external_data_for_model(model, str(staged_path.parent))
            else:
                staged_path.write_bytes(model.SerializeToString(deterministic=True))
            if check:
                onnx.checker.check_model(str(staged_path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise OutputError(f"{path}: the quantized model fails the ONNX checker, not written: "
                              f"{first_line(exc)}") from exc
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    return Path(path)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a staged file and a rename: never a half-written file."""
    with RunFiles() as files:
        staged_path = files.writes(path, "output")
        try:
            staged_path.write_bytes(data)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    return Path(path)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line errors."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
