"""What TensorRT's engine inspector says about an engine: each layer's precision and the ONNX nodes it holds.

Reads the JSON of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` (also what
``trtexec --profilingVerbosity=detailed --exportLayerInfo=FILE`` writes) in both layouts:

- TensorRT 10: each layer tensor has one ``"Format/Datatype"`` string ("Row major linear FP32",
  "Channel major INT8 format where channel % 16 == 0", or just "Half" when no execution context was set);
  the engine's I/O tensor names are listed under ``"Bindings"``.
- TensorRT 11: the data type and the format are separate keys (layer tensors: ``"Datatype"`` and
  ``"Format"``; I/O tensors under ``"I/O Tensors"`` with ``"DataType"``). Keys are matched without regard to
  case, the 11 ones first, then 10's.

Needs no TensorRT. Data-type words are matched case-insensitively over TensorRT's whole DataType set; a string
naming none (or more than one) is reported as unknown, never guessed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Every word TensorRT uses for a data type (DataType enum names with or without their "k", the inspector's
# format strings, its short kgen names), lower case, to the precision qdq reports.
DATA_TYPE_WORDS = {
    "int8": "INT8", "uint8": "UINT8", "int4": "INT4", "fp4": "FP4", "fp8": "FP8", "e8m0": "E8M0",
    "fp16": "FP16", "half": "FP16", "bf16": "BF16", "bfloat16": "BF16",
    "fp32": "FP32", "float": "FP32", "float32": "FP32",
    "int32": "INT32", "int64": "INT64", "bool": "BOOL",
    "int16": "INT16", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "double": "FP64",
}
_WORD = re.compile(r"[A-Za-z0-9]+")
# Where a tensor's data type is written, best first: TensorRT 11's own key, then 11's format, then 10's field.
TYPE_KEYS = ("datatype", "format", "format/datatype")


def data_type(text: str) -> str | None:
    """The one precision a type or format string names ("Row major INT8 format (kLINEAR)" -> INT8), else None."""
    found = set()
    for word in _WORD.findall(text):
        if len(word) > 1 and word[0] == "k" and word[1:].isupper():  # enum spellings: kINT8, kHALF
            word = word[1:]
        if (precision := DATA_TYPE_WORDS.get(word.lower())) is not None:
            found.add(precision)
    return found.pop() if len(found) == 1 else None


def type_texts(entry: Mapping) -> list[str]:
    """The strings of an inspector tensor entry that can name its data type, in the order they are trusted."""
    by_key = {str(k).lower().replace(" ", ""): v for k, v in entry.items()}
    return [str(by_key[k]) for k in TYPE_KEYS if isinstance(by_key.get(k), str) and by_key[k].strip()]


def tensor_precision(entry: Mapping) -> str | None:
    """An inspector tensor's precision (TensorRT 11 keys first, then 10's "Format/Datatype"), None if unknown."""
    for text in type_texts(entry):
        if (precision := data_type(text)) is not None:
            return precision
    return None


def layer_precision(layer: Mapping) -> str:
    """A layer computes in the precision of its inputs (an INT8 convolution reads INT8), else of its outputs."""
    for key in ("Inputs", "Outputs"):
        found = [p for t in layer.get(key, []) if isinstance(t, Mapping) and (p := tensor_precision(t))]
        if "INT8" in found:
            return "INT8"
        if found:
            return found[0]
    return "unknown"


def unknown_type_texts(layer: Mapping) -> set[str]:
    """The type strings of a layer's tensors that name no TensorRT data type ("N/A due to dynamic shapes"...)."""
    texts = set()
    for key in ("Inputs", "Outputs"):
        for tensor in layer.get(key, []):
            if isinstance(tensor, Mapping) and tensor_precision(tensor) is None:
                texts.update(type_texts(tensor)[:1] or ["(no data type given)"])
    return texts


_FOREIGN = re.compile(r"\{ForeignNode\[(.*?)\]\}")
_METADATA = re.compile(r"\[ONNX Layer: (.*?)\]")
# TensorRT joins fused layers with " + ", merged parallel ones with " || ", pointwise fusions as PWN(a, b).
_SEPARATORS = re.compile(r"\s\+\s|\s*\|\|\s*|PWN\(|\)(?=\s*(?:,|\)|\+|\||$))|,\s*")


def foreign_node_range(body: str, order: Mapping[str, int], names: Sequence[str]) -> list[str]:
    """The ONNX nodes a Myelin ``{ForeignNode[first...last]}`` covers: first to last in the graph's order.

    Node names may contain "..." themselves: every split point is tried, the one whose both ends are nodes wins.
    """
    for match in re.finditer(r"\.\.\.", body):
        first, last = body[:match.start()], body[match.end():]
        if first in order and last in order:
            lo, hi = sorted((order[first], order[last]))
            return list(names[lo:hi + 1])
    return [part for part in (body, *body.split("...")) if part in order]


def layer_onnx_nodes(layer: Mapping, order: Mapping[str, int], names: Sequence[str]) -> tuple[set[str], bool]:
    """The ONNX node names an engine layer holds, and whether it is a Myelin ForeignNode (its inside not shown).

    Read from the layer name (``a + b``, ``a || b``, ``PWN(a, PWN(b))``, ``{ForeignNode[first...last]}``) and
    from its ``Metadata`` (``[ONNX Layer: name]`` entries, which TensorRT 10 writes for the ONNX parser's layers).
    """
    name = str(layer.get("Name", ""))
    nodes: set[str] = set(_METADATA.findall(str(layer.get("Metadata", ""))))
    foreign = False
    for match in _FOREIGN.finditer(name):
        foreign = True
        nodes.update(foreign_node_range(match.group(1), order, names))
    rest = _FOREIGN.sub(" + ", name)
    nodes.update(part.strip() for part in _SEPARATORS.split(rest) if part and part.strip())
    return nodes, foreign


@dataclass(frozen=True)
class LayerSummary:
    """What the inspector says about precisions: layers per precision, quantized nodes that did not run INT8."""

    by_precision: dict[str, int]
    not_int8: tuple[tuple[str, str], ...] = ()  # (layer, precision) for layers holding quantized ONNX nodes
    layers: int = 0
    in_myelin: tuple[tuple[str, int], ...] = ()  # (ForeignNode layer, quantized nodes it covers): inside not shown
    unknown_types: tuple[str, ...] = ()  # type strings that name no TensorRT data type
    layout: str = "unknown"  # "TensorRT 10" ("Bindings") or "TensorRT 11" ("I/O Tensors")
    names_only: bool = False  # the engine was built without ProfilingVerbosity.DETAILED

    def describe(self) -> str:
        if self.names_only:
            return ("the engine inspector lists layer names only: build with detailed profiling verbosity "
                    "(qdq build does) to see precisions")
        counts = ", ".join(f"{n} {p}" for p, n in sorted(self.by_precision.items(), key=lambda kv: -kv[1]))
        lines = [f"{self.layers} engine layers: {counts}"]
        lines += [f"  not INT8 ({precision}): {layer}" for layer, precision in self.not_int8]
        lines += [f"  Myelin layer (precision inside not reported) holding {n} quantized nodes: {layer}"
                  for layer, n in self.in_myelin]
        if self.unknown_types:
            lines.append("  data type not recognised, layers counted as unknown: "
                         + "; ".join(repr(t) for t in self.unknown_types))
        return "\n".join(lines)


def summarize_layers(info: Mapping, quantized_nodes: set[str] | None = None,
                     node_order: Sequence[str] = ()) -> LayerSummary:
    """Summarise the inspector's JSON for a report.

    ``quantized_nodes`` are ONNX node names with Q/DQ on their inputs; ``node_order`` is every ONNX node name in
    graph order (to expand Myelin ForeignNode ranges). A layer holding a quantized node but not running INT8 is
    listed; a Myelin layer holding some is listed apart, since the inspector does not show its inside.
    """
    raw = info.get("Layers", []) if isinstance(info, Mapping) else []
    layout = "TensorRT 11" if "I/O Tensors" in info else "TensorRT 10" if "Bindings" in info else "unknown"
    layers = [layer for layer in raw if isinstance(layer, Mapping)]
    if raw and not layers:
        return LayerSummary({}, layout=layout, names_only=True)
    order = {name: i for i, name in enumerate(node_order)}
    quantized = quantized_nodes or set()
    by_precision: Counter[str] = Counter()
    not_int8, in_myelin, unknown = [], [], set()
    for layer in layers:
        precision = layer_precision(layer)
        by_precision[precision] += 1
        if precision == "unknown":
            unknown |= unknown_type_texts(layer)
        nodes, foreign = layer_onnx_nodes(layer, order, node_order)
        if (held := nodes & quantized) and precision != "INT8":
            name = str(layer.get("Name", ""))
            if foreign:
                in_myelin.append((name, len(held)))
            else:
                not_int8.append((name, precision))
    return LayerSummary(dict(by_precision), tuple(not_int8), len(layers), tuple(in_myelin), tuple(sorted(unknown)),
                        layout)
