"""Range files: TensorRT's dynamic-range text, TensorRT calibration caches, and qdq's JSON.

- text (``name:amax`` per line, TensorRT's sampleINT8API): names may hold colons and spaces, so each line is
  split on its last colon.
- cache (TensorRT's implicit-INT8 calibrators): a ``TRT-<version>-<Calibrator>`` header, then ``name: HEX`` per
  line, HEX being the big-endian bits of the float32 *scale* (amax / 127) without leading zeros. A scale of 0
  means "no usable range": such lines are skipped with a warning.
- json: ``{"format": "qdq-ranges", "version": 1, "method": ..., "samples": N, "tensors": {name: {"amax": x}}}``,
  and ``"rescaled_by": [...]`` when the ranges were measured after techniques that rescale activations
  (SmoothQuant, equalization): reusing them means redoing those, which only this format can say.

Reading a file and writing it back in the same format gives the same scales bit for bit. Text and JSON keep the
amax, whatever scheme applies it; a cache stores INT8 scales (TensorRT's calibrators are INT8 only), so
``CACHE_SCHEME`` turns them into amax and back, and an FP8 model built from a cache uses ``amax / 448``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from qdq.errors import DataError, OutputError, printable, shown
from qdq.files import read_bounded
from qdq.model_io import first_line, write_atomic
from qdq.optimize import RESCALING
from qdq.ranges import TensorRanges
from qdq.scheme import INT8

log = logging.getLogger(__name__)

FORMATS = ("text", "cache", "json")
SUFFIXES = {".txt": "text", ".cache": "cache", ".calib": "cache", ".json": "json"}
JSON_FORMAT, JSON_VERSION = "qdq-ranges", 1
CACHE_HEADER = re.compile(r"^TRT-\d+-\w+$")
DEFAULT_CACHE_HEADER = "TRT-100000-EntropyCalibration2"
CACHE_SCHEME = INT8
# Range files are small (one line per activation): these limits stop a wrong path (/dev/zero, a data file) early.
MAX_BYTES, MAX_LINES = 64_000_000, 1_000_000
# Every amax must be a float32 (TensorRT's ranges are float32), and every scale a normal float32.
AMAX_LIMIT = float(np.finfo(np.float32).max)
SCALE_MIN = float(np.finfo(np.float32).tiny)


def check_amax(where: str, name: str, value: float) -> float:
    """``value`` if it is a usable amax; else an error naming ``where`` (``file:line``) and the tensor."""
    if not (math.isfinite(value) and 0 < value <= AMAX_LIMIT):
        raise DataError(f"{where}: {shown(name)} has amax {value!r}; a range must be finite and > 0, at most float32's "
                        f"largest value {AMAX_LIMIT:.4g}")
    return value


def detect_format(text: str) -> str:
    """Tell the format from the content: a TRT-... header is a cache, a JSON object is qdq's, else text."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith("TRT-"):
        return "cache"
    if first.startswith("{"):
        return "json"
    return "text"


def format_for_path(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the range format from the suffix {path.suffix!r}; use .txt (text), "
                        ".cache (TensorRT calibration cache) or .json, or name the format")
    return fmt


def read_ranges(path: str | os.PathLike[str], fmt: str | None = None) -> TensorRanges:
    """Read a range file of at most ``MAX_BYTES`` and ``MAX_LINES`` (a FIFO or ``/dev/zero`` is refused)."""
    path = Path(path)
    data = read_bounded(path, "range file", max_bytes=MAX_BYTES)
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is not part of the first name
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the range file is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if (lines := text.count("\n")) > MAX_LINES:
        raise DataError(f"{path}: the range file has {lines} lines, more than qdq's limit of {MAX_LINES}")
    return parse_ranges(text, str(path), fmt)


def parse_ranges(text: str, where: str, fmt: str | None = None) -> TensorRanges:
    fmt = fmt or detect_format(text)
    if fmt not in FORMATS:
        raise DataError(f"unknown range format {fmt!r}: use one of {', '.join(FORMATS)}")
    parse = {"text": parse_text, "cache": parse_cache, "json": parse_json}[fmt]
    ranges = parse(text, where)
    if not ranges.amax:
        raise DataError(f"{where}: no ranges in the file")
    return ranges


def write_ranges(ranges: TensorRanges, path: str | os.PathLike[str], fmt: str | None = None) -> Path:
    path = Path(path)
    fmt = fmt or format_for_path(path)
    render = {"text": render_text, "cache": render_cache, "json": render_json}[fmt]
    if ranges.rescaled and fmt != "json":
        log.warning("%s: these ranges were measured after %s, which the %s format cannot say: given back with "
                    "--ranges, they would be applied to the model without it; write .json to reuse them",
                    path, " and ".join(ranges.rescaled), fmt)
    return write_atomic(path, render(ranges).encode("utf-8"))


def _entries(text: str, where: str, separator: str, start: int = 0):
    """(line number, name, value) of each non-blank line, split on the last separator."""
    for number, raw in enumerate(text.splitlines()[start:], start=start + 1):
        line = raw.strip()
        if not line:
            continue
        name, sep, value = line.rpartition(separator)
        if not sep or not name.strip():
            raise DataError(f"{where}:{number}: expected 'name{separator}value', got {shown(line)}")
        yield number, name.strip(), value.strip()


def _add(table: dict[str, tuple[float, int]], where: str, number: int, name: str, value: float) -> None:
    if name in table and table[name][0] != value:
        raise DataError(f"{where}:{number}: {shown(name)} is given twice with different values "
                        f"(line {table[name][1]}: {table[name][0]!r}, here: {value!r})")
    table.setdefault(name, (value, number))


def parse_text(text: str, where: str) -> TensorRanges:
    table: dict[str, tuple[float, int]] = {}
    for number, name, value in _entries(text, where, ":"):
        try:
            amax = float(value)
        except ValueError:
            raise DataError(f"{where}:{number}: {shown(name)} has amax {shown(value)}, not a number") from None
        _add(table, where, number, name, check_amax(f"{where}:{number}", name, amax))
    return TensorRanges({name: v for name, (v, _) in table.items()}, method="text")


def parse_cache(text: str, where: str) -> TensorRanges:
    lines = text.splitlines()
    header = lines[0].strip() if lines else ""
    if not CACHE_HEADER.match(header):
        raise DataError(f"{where}:1: expected a TensorRT cache header like 'TRT-8601-EntropyCalibration2', "
                        f"got {shown(header)}")
    table: dict[str, tuple[float, int]] = {}
    unusable = []
    for number, name, value in _entries(text, where, ": ", start=1):
        try:
            bits = int(value, 16)
            if not 0 <= bits < 2**32:
                raise ValueError
        except ValueError:
            raise DataError(f"{where}:{number}: {shown(name)} has {shown(value)}, not the hex bits of a float32"
                            ) from None
        scale = struct.unpack(">f", struct.pack(">I", bits))[0]
        if scale == 0:
            unusable.append(name)
            continue
        if not (math.isfinite(scale) and SCALE_MIN <= scale <= AMAX_LIMIT / CACHE_SCHEME.qmax):
            raise DataError(f"{where}:{number}: {shown(name)} has scale {scale!r} (bits {shown(value)}); a scale "
                            f"must be finite and > 0, a normal float32 from {SCALE_MIN:.4g} to "
                            f"{AMAX_LIMIT / CACHE_SCHEME.qmax:.4g} (0 marks a tensor without a range)")
        _add(table, where, number, name, scale)
    if unusable:
        log.warning("%s: %d tensors have scale 0 (no usable range) and are skipped: %s", where, len(unusable),
                    ", ".join(unusable[:5]) + (" ..." if len(unusable) > 5 else ""))
    scales = {name: v for name, (v, _) in table.items()}
    # amax = scale * 127 is exact in float64 (24 + 7 mantissa bits), so float32(amax / 127) == scale.
    return TensorRanges({n: s * CACHE_SCHEME.qmax for n, s in scales.items()}, method=header.split("-", 2)[2],
                        scales=scales, header=header)


def parse_json(text: str, where: str) -> TensorRanges:
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
            raise DataError(f"{where}: not a qdq range file (no \"format\": \"{JSON_FORMAT}\")")
        amax = {name: check_amax(where, name, float(entry["amax"])) for name, entry in doc["tensors"].items()}
        rescaled = doc.get("rescaled_by", [])
        if not isinstance(rescaled, list) or any(t not in RESCALING for t in rescaled):
            raise DataError(f"{where}: \"rescaled_by\" must be a list of {', '.join(RESCALING)}, got "
                            f"{printable(json.dumps(rescaled))[:100]}")
        return TensorRanges(amax, method=str(doc.get("method", "unknown")), samples=int(doc.get("samples", 0)),
                            rescaled=tuple(t for t in RESCALING if t in rescaled))
    except RecursionError:
        raise DataError(f"{where}: malformed qdq range file (nested too deeply)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{where}: malformed qdq range file ({printable(first_line(exc))[:200]})") from exc


def render_text(ranges: TensorRanges) -> str:
    return "".join(f"{name}:{ranges.amax[name]!r}\n" for name in ranges)


def render_cache(ranges: TensorRanges) -> str:
    lines = [ranges.header or DEFAULT_CACHE_HEADER]
    for name in ranges:
        scale = ranges.scale(name, CACHE_SCHEME)
        if not (math.isfinite(scale) and scale >= SCALE_MIN):
            raise OutputError(f"tensor {shown(name)}: scale {scale!r} cannot be written to a TensorRT cache")
        bits = struct.unpack(">I", struct.pack(">f", scale))[0]
        lines.append(f"{name}: {bits:x}")
    return "\n".join(lines) + "\n"


def render_json(ranges: TensorRanges) -> str:
    tensors = {name: {"amax": ranges.amax[name]} for name in ranges}
    doc = {"format": JSON_FORMAT, "version": JSON_VERSION, "method": ranges.method, "samples": ranges.samples,
           **({"rescaled_by": list(ranges.rescaled)} if ranges.rescaled else {}), "tensors": tensors}
    return json.dumps(doc, indent=1) + "\n"
