"""What ``qdq build`` would build, worked out without TensorRT: input profiles, the precision each ONNX node should
run in, and the equivalent trtexec command line for TensorRT 10 or 11.

``qdq build --dry-run`` prints this; ``qdq build`` prints the trtexec line and checks ``--shapes`` with it before
TensorRT is loaded.
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qdq.calibrate.data import input_specs
from qdq.errors import QdqError
from qdq.graph import every_graph, every_node

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
TRT_VERSIONS = (10, 11)


class ShapesError(QdqError):
    """``--shapes`` does not fit the model's inputs."""


def parse_shapes(specs: list[str]) -> Shapes:
    """``name:1x3x224x224`` (fixed) or ``name:1x3x224x224,8x3x224x224,32x3x224x224`` (min, opt, max)."""
    shapes: Shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            parts = [tuple(int(d) for d in part.split("x")) for part in dims.split(",")]
        except ValueError:
            parts = []
        if not sep or not name or len(parts) not in (1, 3) or any(not p or min(p) < 1 for p in parts):
            raise ShapesError(f"--shapes {spec!r}: expected name:1x3x224x224, or name:MIN,OPT,MAX with three such "
                              "shapes")
        shapes[name] = (parts[0], parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1], parts[2])
    return shapes


def installed_tensorrt_major() -> int | None:
    """The major version of the installed TensorRT wheel, read from its metadata (tensorrt is not imported)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"):
        try:
            return int(metadata.version(dist).split(".")[0])
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def dims_text(dims: tuple[int, ...]) -> str:
    return "x".join(map(str, dims))


def example_shapes(name: str, shape: tuple | None) -> str:
    """A ``--shapes`` value for an input, its dynamic dims set to 1, 8 and 32 (min, opt, max)."""
    if shape is None:
        return f"{name}:1x3x224x224"
    return f"{name}:" + ",".join("x".join(str(d) if isinstance(d, int) and d > 0 else str(n) for d in shape)
                                 for n in (1, 8, 32))


def maybe_shape_tensor(dtype: np.dtype, shape: tuple | None) -> bool:
    """An integer input of rank 0 or 1 may be a shape tensor (TensorRT reads its values, from --shapes)."""
    return dtype.kind in "iu" and shape is not None and len(shape) <= 1


def check_shapes(model: onnx.ModelProto, shapes: Shapes) -> list[str]:
    """Refuse ``--shapes`` for inputs the model does not have or whose dims are all fixed; return the dynamic ones.

    A static integer input of rank 0 or 1 may be a shape tensor, whose *values* ``--shapes`` gives: it is let
    through here and TensorRT says at build time whether it is one.
    """
    specs = {spec.name: spec for spec in input_specs(model)}
    dynamic = [n for n, s in specs.items() if s.shape is None or any(not isinstance(d, int) or d < 1 for d in s.shape)]
    inputs = ", ".join(f"{n} {s.describe()}" for n, s in specs.items())
    for name in shapes:
        if name not in specs:
            raise ShapesError(f"--shapes {name}: the model has no input {name!r}; its inputs: {inputs}")
        spec = specs[name]
        if name not in dynamic and not maybe_shape_tensor(spec.dtype, spec.shape):
            raise ShapesError(f"--shapes {name}: input {name!r} is static ({spec.describe()}), --shapes is only for "
                              f"inputs with dynamic dims ({', '.join(dynamic) or 'this model has none'})")
    return dynamic


def trtexec_command(model: Path, engine: Path, *, trt_version: int = 10, workspace_mb: int | None = None,
                    timing_cache: Path | None = None, shapes: Shapes | None = None,
                    layer_info: Path | None = None) -> str:
    """The trtexec command line that builds the same engine with TensorRT ``trt_version``.

    TensorRT 10 needs ``--stronglyTyped`` for the graph's Q/DQ and casts to decide precisions; in TensorRT 11
    every network is strongly typed and the flag is a deprecated no-op, so it is left out.
    """
    args = ["trtexec", f"--onnx={model}", f"--saveEngine={engine}"]
    if trt_version < 11:
        args.append("--stronglyTyped")
    if workspace_mb:
        args.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if shapes:
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(f"{n}:{dims_text(s[index])}" for n, s in shapes.items()))
    args += ["--profilingVerbosity=detailed", "--dumpLayerInfo"]
    if layer_info:
        args.append(f"--exportLayerInfo={layer_info}")
    return shlex.join(args)


def dequantized_tensors(model: onnx.ModelProto) -> set[str]:
    return {o for _, n in every_node(model.graph) if n.op_type == "DequantizeLinear" for o in n.output}


def quantized_node_names(model: onnx.ModelProto) -> set[str]:
    """Nodes reading at least one DequantizeLinear output, in subgraphs too: the layers that should run INT8."""
    dequantized = dequantized_tensors(model)
    return {n.name for _, n in every_node(model.graph)
            if n.op_type != "QuantizeLinear" and set(n.input) & dequantized}


# ONNX element types as TensorRT names its precisions.
ELEMENT_PRECISIONS = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.DOUBLE: "FP64",
}
SKIPPED_OPS = {"QuantizeLinear", "DequantizeLinear", "Constant"}


@dataclass(frozen=True)
class NodePrecision:
    node: str
    op: str
    precision: str  # INT8 for nodes reading Q/DQ, else the element type of their first output
    why: str


@dataclass(frozen=True)
class BuildPlan:
    """What a strongly typed build of the model should give, with the command that builds it."""

    profiles: tuple[tuple[str, str], ...]  # (input, "static 1x3x8x8" or "min 1x.., opt .., max ..")
    nodes: tuple[NodePrecision, ...]
    trtexec: str

    def describe(self, *, with_command: bool = True) -> str:
        lines = ["inputs (one optimization profile):"]
        lines += [f"  {name}: {profile}" for name, profile in self.profiles]
        counts = Counter(n.precision for n in self.nodes)
        lines.append(f"expected precision of {len(self.nodes)} ONNX nodes (from the Q/DQ and the graph's types): "
                     + ", ".join(f"{n} {p}" for p, n in counts.most_common()))
        lines += [f"  {n.node} ({n.op}): {n.precision} ({n.why})" for n in self.nodes]
        if with_command:
            lines.append(self.trtexec)
        return "\n".join(lines)


def node_precisions(model: onnx.ModelProto) -> tuple[NodePrecision, ...]:
    """Per ONNX node, the precision a strongly typed TensorRT build gives it: INT8 behind Q/DQ, else its type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help here; without it types come from the model as is
        inferred = model
    types = {}
    for _, graph in every_graph(inferred.graph):
        types.update({v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)
                      if v.type.tensor_type.elem_type})
        types.update({init.name: init.data_type for init in graph.initializer})
    quantized = quantized_node_names(model)
    nodes = []
    for where, node in every_node(model.graph):
        if node.op_type in SKIPPED_OPS:
            continue
        if node.name in quantized:
            nodes.append(NodePrecision(where + node.name, node.op_type, "INT8", "reads DequantizeLinear"))
            continue
        elem = types.get(node.output[0]) if node.output else None
        precision = ELEMENT_PRECISIONS.get(elem, "unknown") if elem else "unknown"
        nodes.append(NodePrecision(where + node.name, node.op_type, precision,
                                   "output type" if elem else "type not inferred"))
    return tuple(nodes)


def build_plan(model: onnx.ModelProto, model_path: Path, engine: Path, *, shapes: Shapes, trt_version: int,
               workspace_mb: int | None = None, timing_cache: Path | None = None) -> BuildPlan:
    """The dry run of ``qdq build``: profiles, per-node precision and the trtexec line, without TensorRT."""
    dynamic = check_shapes(model, shapes)
    if missing := [n for n in dynamic if n not in shapes]:
        spec = next(s for s in input_specs(model) if s.name == missing[0])
        raise ShapesError(f"inputs {missing} have dynamic dims: give their shapes, e.g. --shapes "
                          f"{example_shapes(spec.name, spec.shape)}")
    profiles = []
    for spec in input_specs(model):
        if spec.name in shapes:
            low, opt, high = (dims_text(s) for s in shapes[spec.name])
            what = "values" if spec.name not in dynamic else "shape"
            profiles.append((spec.name, f"{what} {low}" if low == opt == high else f"{what} min {low}, opt {opt}, "
                                                                                  f"max {high}"))
        else:
            profiles.append((spec.name, f"static {dims_text(tuple(spec.shape or ()))}"))
    command = trtexec_command(model_path, engine, trt_version=trt_version, workspace_mb=workspace_mb,
                              timing_cache=timing_cache, shapes=shapes)
    return BuildPlan(tuple(profiles), node_precisions(model), command)
