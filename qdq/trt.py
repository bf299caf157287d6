"""TensorRT: engine build, per-layer precision report, engine execution. The only module that imports tensorrt.

Written against TensorRT's documented Python API (10 and 11). TensorRT 11 builds strongly typed networks only:
each tensor runs in the precision the graph gives it (INT8 between Q/DQ, float elsewhere). TensorRT 10 also
has strongly typed networks; where the flag is missing, the INT8 and FP16 builder flags are the fallback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdq.errors import MissingDependencyError, QdqError
from qdq.model_io import check_writable, write_atomic

INSTALL_HINT = ("install TensorRT 10 or 11 with its Python bindings on a machine with an NVIDIA GPU and driver: "
                "pip install 'qdq[trt]' (see NVIDIA's TensorRT installation guide)")


class EngineError(QdqError):
    """TensorRT could not parse the model or build, load or run the engine."""


Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def import_tensorrt() -> Any:
    """``tensorrt``, imported on first use; a MissingDependencyError (exit 3) that says what to install if absent."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    return tensorrt


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
            raise QdqError(f"--shapes {spec!r}: expected name:1x3x224x224, or name:MIN,OPT,MAX with three such shapes")
        shapes[name] = (parts[0], parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1], parts[2])
    return shapes


def trtexec_command(model: Path, engine: Path, *, workspace_mb: int | None = None, timing_cache: Path | None = None,
                    shapes: Shapes | None = None, layer_info: Path | None = None) -> str:
    """The trtexec command line that builds the same engine (for users who build with trtexec)."""
    args = ["trtexec", f"--onnx={model}", f"--saveEngine={engine}", "--stronglyTyped"]
    if workspace_mb:
        args.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if shapes:
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(f"{n}:{'x'.join(map(str, s[index]))}" for n, s in shapes.items()))
    args += ["--profilingVerbosity=detailed", "--dumpLayerInfo"]
    if layer_info:
        args.append(f"--exportLayerInfo={layer_info}")
    return shlex.join(args)


@dataclass(frozen=True)
class LayerSummary:
    """What the engine inspector says about precisions: layers per precision, and expected-INT8 layers that are not."""

    by_precision: dict[str, int]
    not_int8: tuple[tuple[str, str], ...] = ()  # (layer, precision) for layers holding quantized ONNX nodes
    layers: int = 0

    def describe(self) -> str:
        counts = ", ".join(f"{n} {p}" for p, n in sorted(self.by_precision.items(), key=lambda kv: -kv[1]))
        lines = [f"{self.layers} engine layers: {counts}"]
        for layer, precision in self.not_int8:
            lines.append(f"  not INT8 ({precision}): {layer}")
        return "\n".join(lines)


PRECISIONS = (("Int8", "INT8"), ("FP8", "FP8"), ("Half", "FP16"), ("FP16", "FP16"), ("BF16", "BF16"),
              ("Float", "FP32"), ("FP32", "FP32"), ("Int32", "INT32"), ("Int64", "INT64"), ("Bool", "BOOL"))


def tensor_precision(entry: dict) -> str | None:
    """The precision in an inspector tensor's "Format/Datatype" ("Int8 NC/32HW32", "Row major linear FP32"...)."""
    text = str(entry.get("Format/Datatype", ""))
    for marker, precision in PRECISIONS:
        if re.search(rf"\b{marker}\b", text):
            return precision
    return None


def layer_precision(layer: dict) -> str:
    """A layer computes in the precision of its inputs (an INT8 convolution reads Int8), else of its outputs."""
    for key in ("Inputs", "Outputs"):
        found = [p for t in layer.get(key, []) if isinstance(t, dict) and (p := tensor_precision(t))]
        if "INT8" in found:
            return "INT8"
        if found:
            return found[0]
    return "unknown"


def summarize_layers(info: dict, quantized_nodes: set[str] | None = None) -> LayerSummary:
    """Summarise the inspector's JSON (``ProfilingVerbosity.DETAILED``) for a report.

    ``quantized_nodes`` are ONNX node names that have Q/DQ on their inputs; an engine layer whose name holds one
    of them (TensorRT names fused layers ``a + b + c``) but does not run INT8 is listed.
    """
    layers = [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]
    by_precision: Counter[str] = Counter()
    not_int8 = []
    for layer in layers:
        precision = layer_precision(layer)
        by_precision[precision] += 1
        name = str(layer.get("Name", ""))
        parts = {p.strip() for p in re.split(r"\s\+\s|\|\|", name)}
        if quantized_nodes and precision != "INT8" and parts & quantized_nodes:
            not_int8.append((name, precision))
    return LayerSummary(dict(by_precision), tuple(not_int8), len(layers))


@dataclass(frozen=True)
class BuildResult:
    engine: Path
    summary: LayerSummary
    trtexec: str
    warnings: tuple[str, ...] = field(default_factory=tuple)


def build_engine(model: str | os.PathLike[str], engine: str | os.PathLike[str], *, workspace_mb: int | None = None,
                 timing_cache: str | os.PathLike[str] | None = None, shapes: Shapes | None = None,
                 quantized_nodes: set[str] | None = None) -> BuildResult:
    """Build a TensorRT engine from an explicitly quantized ONNX model and summarise its layers' precisions."""
    model, engine = Path(model), check_writable(engine, not_same_as=model)
    cache_path = Path(timing_cache) if timing_cache else None
    command = trtexec_command(model, engine, workspace_mb=workspace_mb, timing_cache=cache_path, shapes=shapes)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as exc:  # no GPU or driver: the builder cannot be made
        raise MissingDependencyError(f"TensorRT found no usable GPU ({exc}); {INSTALL_HINT}") from exc
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise EngineError(f"{model}: TensorRT's ONNX parser failed: " + "; ".join(describe_parser_error(e)
                                                                                for e in errors[:5]))
    config = builder.create_builder_config()
    if not strongly_typed:  # TensorRT 10 without strong typing: let the Q/DQ graph pick INT8, the rest FP16
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    add_profile(trt, builder, network, config, shapes or {})
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{model}: TensorRT could not build an engine (its log above says why)")
    write_atomic(engine, bytes(serialized))
    if cache_path:
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    runtime = trt.Runtime(logger)
    built = runtime.deserialize_cuda_engine(serialized)
    inspector = built.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return BuildResult(engine, summarize_layers(info, quantized_nodes), command)


def describe_parser_error(error: Any) -> str:
    node = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    where = f"node {node} ({op})" if node else f"node #{error.node()}"
    return f"{where}: {error.desc()}"


def add_profile(trt: Any, builder: Any, network: Any, config: Any, shapes: Shapes) -> None:
    """One optimization profile covering every input with dynamic dims (their shapes must be given)."""
    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            dynamic.append(tensor.name)
    if not dynamic:
        return
    if missing := [n for n in dynamic if n not in shapes]:
        raise EngineError(f"inputs {missing} have dynamic dims: give their shapes, "
                          f"e.g. --shapes {missing[0]}:1x3x224x224")
    profile = builder.create_optimization_profile()
    for name in dynamic:
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)


def run_engine(engine_path: str | os.PathLike[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a built engine once on host arrays and return its outputs (device memory through cuda-python)."""
    trt = import_tensorrt()
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise MissingDependencyError(f"cuda-python is not installed (pip install cuda-python); "
                                         f"{INSTALL_HINT}") from exc
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EngineError(f"{engine_path}: TensorRT cannot load this engine (built by another TensorRT or GPU?)")
    context = engine.create_execution_context()
    buffers, outputs = [], {}
    try:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                context.set_input_shape(name, feeds[name].shape)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            host = np.ascontiguousarray(feeds[name], dtype=dtype) if is_input else np.empty(
                tuple(context.get_tensor_shape(name)), dtype=dtype)
            _, pointer = cudart.cudaMalloc(max(host.nbytes, 1))
            buffers.append(pointer)
            if is_input:
                cudart.cudaMemcpy(pointer, host.ctypes.data, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
            else:
                outputs[name] = (host, pointer)
            context.set_tensor_address(name, pointer)
        _, stream = cudart.cudaStreamCreate()
        if not context.execute_async_v3(stream):
            raise EngineError(f"{engine_path}: TensorRT failed to run the engine")
        cudart.cudaStreamSynchronize(stream)
        for host, pointer in outputs.values():
            cudart.cudaMemcpy(host.ctypes.data, pointer, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        cudart.cudaStreamDestroy(stream)
    finally:
        for pointer in buffers:
            cudart.cudaFree(pointer)
    return {name: host for name, (host, _) in outputs.items()}


def verify_engine(model: Any, engine: Path, data: Any, *, batch_size: int | None = None) -> Any:
    """Run the engine and ONNX Runtime on the same data; per-output SQNR, max error and top-1 agreement."""
    from qdq.calibrate.data import input_specs, open_data
    from qdq.compare import Comparison, OutputAccumulator
    from qdq.runtime import quantized_session

    session = quantized_session(model)
    names = [o.name for o in session.get_outputs()]
    accumulators = {name: OutputAccumulator() for name in names}
    samples = 0
    for batch in open_data(data, input_specs(model), batch_size):
        reference = dict(zip(names, session.run(names, batch.feeds), strict=True))
        engine_outputs = run_engine(engine, batch.feeds)
        for name in names:
            accumulators[name].update(reference[name], engine_outputs[name])
        samples += batch.samples
    return Comparison(tuple(accumulators[n].metrics(n) for n in names), samples)
