"""TensorRT: engine build, per-layer precision report, engine execution. The only module that imports tensorrt.

Written against TensorRT's Python bindings (10.x and 11.x) and cuda-python's runtime bindings. Both TensorRT
versions build a strongly typed network here (TensorRT 10 through the STRONGLY_TYPED creation flag, TensorRT 11,
where every network is strongly typed, without it): each tensor runs in the precision the graph gives it, INT8
between Q/DQ. Every failure ends as an :class:`EngineError` (exit 1), or a MissingDependencyError (exit 3) when
TensorRT, cuda-python or a usable GPU is missing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdq.errors import MissingDependencyError, QdqError
from qdq.model_io import check_writable, write_atomic
from qdq.trt_inspect import LayerSummary, layer_precision, summarize_layers, tensor_precision
from qdq.trt_plan import Shapes, dims_text, example_shapes, parse_shapes, trtexec_command

__all__ = ["EngineError", "EngineRunner", "LayerSummary", "Shapes", "build_engine", "layer_precision",
           "parse_shapes", "run_engine", "summarize_layers", "tensor_precision", "trtexec_command",
           "verify_engine"]

log = logging.getLogger(__name__)

INSTALL_HINT = ("install TensorRT 10 or 11 with its Python bindings on a machine with an NVIDIA GPU and driver: "
                "pip install 'qdq[trt]' (see NVIDIA's TensorRT installation guide)")


class EngineError(QdqError):
    """TensorRT could not parse the model or build, load or run the engine."""


@contextmanager
def engine_step(what: str) -> Iterator[None]:
    """Turn whatever TensorRT's or CUDA's bindings raise (RuntimeError, TypeError...) into one EngineError line."""
    try:
        yield
    except QdqError:
        raise
    except Exception as exc:
        raise EngineError(f"{what}: {type(exc).__name__}: {exc}") from exc


def import_tensorrt() -> Any:
    """``tensorrt``, imported on first use; a MissingDependencyError (exit 3) that says what to install if absent."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    if tensorrt_major(tensorrt) < 10:
        raise MissingDependencyError(f"TensorRT {getattr(tensorrt, '__version__', '?')} is too old: {INSTALL_HINT}")
    return tensorrt


def tensorrt_major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        return 10  # no version to read: the 10.x API, which 11 keeps


def import_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise MissingDependencyError(f"cuda-python is not installed (pip install cuda-python); "
                                         f"{INSTALL_HINT}") from exc
    return cudart


def native_handle(obj: Any) -> int:
    """The address a CUDA object wraps, as TensorRT's ``stream_handle`` wants it.

    cuda-python 12.9.1 deprecated ``int(obj)`` for this in favour of ``cuda.bindings.utils.get_cuda_native_handle``.
    """
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)  # cuda-python before 12.9.1, where int() is the documented way
    return int(get_cuda_native_handle(obj))


def cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """Check a cuda-python result tuple ``(error, *values)``; EngineError naming the call and the CUDA error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"CUDA {what} failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class BuildResult:
    engine: Path
    summary: LayerSummary
    trtexec: str
    warnings: tuple[str, ...] = field(default_factory=tuple)


def build_engine(model: str | os.PathLike[str], engine: str | os.PathLike[str], *, workspace_mb: int | None = None,
                 timing_cache: str | os.PathLike[str] | None = None, shapes: Shapes | None = None,
                 quantized_nodes: set[str] | None = None, node_order: Sequence[str] = ()) -> BuildResult:
    """Build a TensorRT engine from an explicitly quantized ONNX model and summarise its layers' precisions.

    ``quantized_nodes`` (ONNX nodes reading Q/DQ) and ``node_order`` (every node name in graph order) let the
    summary list layers that should have run INT8 and did not.
    """
    model, engine = Path(model), check_writable(engine, not_same_as=model)
    cache_path = Path(timing_cache) if timing_cache else None
    trt = import_tensorrt()
    major = tensorrt_major(trt)
    command = trtexec_command(model, engine, trt_version=major, workspace_mb=workspace_mb, timing_cache=cache_path,
                              shapes=shapes)
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as exc:  # no GPU or driver: the builder cannot be made
        raise MissingDependencyError(f"TensorRT found no usable GPU ({exc}); {INSTALL_HINT}") from exc
    if builder is None:
        raise MissingDependencyError(f"TensorRT found no usable GPU; {INSTALL_HINT}")
    warnings: list[str] = []
    with engine_step(f"{model}: TensorRT build"):
        # TensorRT 11 networks are all strongly typed (the flag survives only deprecated); 10 needs the flag.
        flags = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model)):
            errors = [parser.get_error(i) for i in range(parser.num_errors)]
            raise EngineError(f"{model}: TensorRT's ONNX parser failed: "
                              + "; ".join(describe_parser_error(e) for e in errors[:5]))
        config = builder.create_builder_config()
        if workspace_mb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        warnings += load_timing_cache(config, cache_path)
        add_profile(builder, network, config, shapes or {})
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"{model}: TensorRT could not build an engine (its log above says why)")
        data = bytes(serialized)
        write_atomic(engine, data)
        if cache_path:
            warnings += save_timing_cache(config, cache_path)
        info = inspect_engine(trt, logger, data, engine, shapes or {})
    return BuildResult(engine, summarize_layers(info, quantized_nodes, node_order), command, tuple(warnings))


def describe_parser_error(error: Any) -> str:
    node = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    where = f"node {node} ({op})" if node else f"node #{error.node()}"
    return f"{where}: {error.desc()}"


def add_profile(builder: Any, network: Any, config: Any, shapes: Shapes) -> None:
    """One optimization profile: shapes for inputs with dynamic dims, values for shape-tensor inputs.

    ``--shapes`` naming an input the network does not have, or a static one that is not a shape tensor, is
    refused with the input names (TensorRT would ignore it silently).
    """
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in inputs if t.is_shape_tensor or any(d < 0 for d in t.shape)]
    names = ", ".join(f"{t.name} {list(t.shape)}" for t in inputs)
    for name in shapes:
        if name not in {t.name for t in inputs}:
            raise EngineError(f"--shapes {name}: the network has no input {name!r}; its inputs: {names}")
        if name not in dynamic:
            raise EngineError(f"--shapes {name}: input {name!r} is static, --shapes is only for inputs with "
                              f"dynamic dims or shape tensors ({', '.join(dynamic) or 'this network has none'})")
    if not dynamic:
        return
    if missing := [n for n in dynamic if n not in shapes]:
        first = next(t for t in inputs if t.name == missing[0])
        raise EngineError(f"inputs {missing} have dynamic dims or are shape tensors: give their shapes (values for "
                          f"a shape tensor), e.g. --shapes {example_shapes(first.name, tuple(first.shape))}")
    profile = builder.create_optimization_profile()
    for tensor in inputs:
        if tensor.name not in dynamic:
            continue
        if tensor.is_shape_tensor:  # TensorRT needs the values such an input can take, not its shape
            profile.set_shape_input(tensor.name, *shapes[tensor.name])
        else:
            profile.set_shape(tensor.name, *shapes[tensor.name])
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"TensorRT rejected the optimization profile {shapes}")


def load_timing_cache(config: Any, path: Path | None) -> list[str]:
    """Give the builder the timing cache at ``path`` (or a fresh one); a cache TensorRT rejects is not fatal.

    A cache from another GPU or TensorRT version makes ``set_timing_cache`` return False: that is said and the
    build goes on with a fresh cache.
    """
    data = b""
    if path and path.exists():
        try:
            data = path.read_bytes()
        except OSError as exc:
            data = b""
            log.warning("%s: cannot read the timing cache (%s): building with a fresh one", path, exc)
    try:
        cache = config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError):  # bytes TensorRT cannot read at all: as rejected, below
        cache = None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return []
    message = (f"{path}: TensorRT rejected this timing cache (made on another GPU or TensorRT version?): "
               "building with a fresh one")
    log.warning("%s", message)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        message += "; a fresh cache was refused too, building without one"
    return [message]


def save_timing_cache(config: Any, path: Path) -> list[str]:
    """Merge the build's timing cache with the file on disk and write it atomically (what Polygraphy does).

    Polygraphy reads the file, combines it into the builder's cache and writes the result. Entries from another
    GPU or TensorRT version are not merged in (``ignore_mismatch=False``): such a file is replaced, said.
    """
    cache = config.get_timing_cache()
    if cache is None:
        message = f"{path}: TensorRT returned no timing cache after the build; the file is left as it was"
        log.warning("%s", message)
        return [message]
    warnings = []
    if path.exists():
        try:
            previous = config.create_timing_cache(path.read_bytes())
        except (OSError, RuntimeError, TypeError):
            previous = None
        if previous is None or not cache.combine(previous, ignore_mismatch=False):
            warnings.append(f"{path}: the old timing cache could not be merged (another GPU or TensorRT version?): "
                            "replaced by this build's")
            log.warning("%s", warnings[-1])
    serialized = cache.serialize()
    if serialized is None:
        return [*warnings, f"{path}: TensorRT could not serialize the timing cache; the file is left as it was"]
    write_atomic(path, bytes(serialized))
    return warnings


def inspect_engine(trt: Any, logger: Any, data: bytes, engine_path: Path, shapes: Shapes) -> dict:
    """The engine inspector's JSON. An execution context with the profile's opt shapes is attached when it can be,
    so TensorRT reports full formats rather than "N/A due to dynamic shapes"."""
    engine = deserialize(trt, logger, data, engine_path)
    inspector = engine.create_engine_inspector()
    if inspector is None:
        raise EngineError(f"{engine_path}: TensorRT could not create an engine inspector")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    shape_tensors = [n for n in names if engine.is_shape_inference_io(n)]
    if context is not None and not shape_tensors and all(
            context.set_input_shape(name, dims[1]) for name, dims in shapes.items()):
        inspector.execution_context = context
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"{engine_path}: the engine inspector's output is not JSON ({exc})") from exc


def deserialize(trt: Any, logger: Any, data: bytes, engine_path: str | os.PathLike[str]) -> Any:
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"{engine_path}: TensorRT cannot load this engine (built by another TensorRT version or "
                          "for another GPU?)")
    return engine


class EngineRunner:
    """An engine deserialized once, with its execution context, run on host arrays batch after batch."""

    def __init__(self, engine_path: str | os.PathLike[str]) -> None:
        self.path = Path(engine_path)
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        with engine_step(f"{self.path}: loading the engine"):
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise EngineError(f"{self.path}: cannot read the engine ({exc.strerror or exc})") from exc
            self.engine = deserialize(self.trt, self.trt.Logger(self.trt.Logger.WARNING), data, self.path)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise EngineError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
            self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once: inputs copied to the device, outputs back to the host. All device memory is freed after."""
        with engine_step(f"{self.path}: running the engine"):
            return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart, engine, context = self.trt, self.cudart, self.engine, self.context
        if missing := [n for n in self.inputs if n not in feeds]:
            raise EngineError(f"{self.path}: no data for engine inputs {missing}")
        hosts = {}
        for name in self.inputs:
            hosts[name] = np.ascontiguousarray(feeds[name], dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
            if engine.is_shape_inference_io(name):  # a shape tensor: TensorRT reads its values from host memory
                if not context.set_tensor_address(name, hosts[name].ctypes.data):
                    raise EngineError(f"{self.path}: TensorRT refused the values of shape input {name!r}")
            elif not context.set_input_shape(name, hosts[name].shape):
                low, _, high = (tuple(d) for d in engine.get_tensor_profile_shape(name, 0))
                raise EngineError(f"{self.path}: input {name!r} of shape {dims_text(hosts[name].shape)} is outside "
                                  f"the engine's profile (min {dims_text(low)}, max {dims_text(high)}): rebuild "
                                  "with --shapes covering it, or use --batch-size")
        outputs = {}
        for name in self.names:
            if name in self.inputs:
                continue
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.path}: output {name!r} has unresolved dims {shape} after the inputs were set")
            outputs[name] = np.empty(shape, dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        stream, pointers = None, []
        try:
            stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            for name, host in [*hosts.items(), *outputs.items()]:
                if name in hosts and engine.is_shape_inference_io(name):
                    continue
                pointer = cuda_call(cudart, cudart.cudaMalloc(max(host.nbytes, 1)), f"cudaMalloc for {name!r}")
                pointers.append(pointer)
                if name in hosts:
                    cuda_call(cudart, cudart.cudaMemcpy(pointer, host.ctypes.data, host.nbytes,
                                                        cudart.cudaMemcpyKind.cudaMemcpyHostToDevice),
                              f"cudaMemcpy of input {name!r} to the device")
                if not context.set_tensor_address(name, pointer):
                    raise EngineError(f"{self.path}: TensorRT refused the device address of {name!r}")
                if name in outputs:
                    outputs[name] = (host, pointer)
            if not context.execute_async_v3(native_handle(stream)):
                raise EngineError(f"{self.path}: TensorRT failed to run the engine (its log above says why)")
            cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            for name, (host, pointer) in outputs.items():
                cuda_call(cudart, cudart.cudaMemcpy(host.ctypes.data, pointer, host.nbytes,
                                                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost),
                          f"cudaMemcpy of output {name!r} to the host")
            return {name: host for name, (host, _) in outputs.items()}
        finally:
            self._release(stream, pointers)

    def _release(self, stream: Any, pointers: list[int]) -> None:
        """Free what one run allocated; a failure here is logged, never hides the error that got us here."""
        for pointer in pointers:
            self._quietly("cudaFree", pointer)
        if stream is not None:
            self._quietly("cudaStreamDestroy", stream)

    def _quietly(self, call: str, argument: Any) -> None:
        try:
            result = getattr(self.cudart, call)(argument)
            error = result[0] if isinstance(result, tuple) else result
            failed = error != self.cudart.cudaError_t.cudaSuccess
        except Exception as exc:  # still release the rest; the run's own error, if any, is the one to report
            error, failed = f"{type(exc).__name__}: {exc}", True
        if failed:
            log.warning("%s: CUDA %s failed: %s", self.path, call, getattr(error, "name", error))


def run_engine(engine_path: str | os.PathLike[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load an engine and run it once on host arrays (for many runs, keep an :class:`EngineRunner`)."""
    return EngineRunner(engine_path).run(feeds)


def verify_engine(model: Any, engine: Path, data: Any, *, batch_size: int | None = None) -> Any:
    """Run the engine and ONNX Runtime on the same data; per-output SQNR, max error and top-1 agreement.

    The engine is deserialized once for the whole run.
    """
    from qdq.calibrate.data import input_specs, open_data
    from qdq.compare import Comparison, OutputAccumulator
    from qdq.runtime import quantized_session

    runner = EngineRunner(engine)
    session = quantized_session(model)
    names = [o.name for o in session.get_outputs()]
    accumulators = {name: OutputAccumulator() for name in names}
    samples = 0
    for batch in open_data(data, input_specs(model), batch_size):
        reference = dict(zip(names, session.run(names, batch.feeds), strict=True))
        engine_outputs = runner.run(batch.feeds)
        if missing := [n for n in names if n not in engine_outputs]:
            raise EngineError(f"{engine}: the engine has no outputs {missing} (was it built from this model?)")
        for name in names:
            if engine_outputs[name].shape != reference[name].shape:
                raise EngineError(f"{engine}: output {name!r} has shape {engine_outputs[name].shape} from TensorRT "
                                  f"but {reference[name].shape} from ONNX Runtime (was it built from this model?)")
            accumulators[name].update(reference[name], engine_outputs[name])
        samples += batch.samples
    return Comparison(tuple(accumulators[n].metrics(n) for n in names), samples)
