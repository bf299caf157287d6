"""Small stand-ins for ``tensorrt`` and cuda-python's ``cuda.bindings.runtime``, for tests without a GPU.

They implement only the API qdq.trt calls, with the signatures and return conventions of the real bindings
(TensorRT's ``python/src/infer/pyCore.cpp``: booleans from ``set_input_shape``/``set_tensor_address``/
``set_timing_cache``/``combine``/``execute_async_v3``, ``None`` from ``deserialize_cuda_engine``/``get_timing_cache``/
``build_serialized_network`` on failure; cuda-python: every call returns ``(cudaError_t, *values)``). Each can be
told to fail the way the real one does, through ``FakeState.fail``:

- ``"deserialize"``: ``deserialize_cuda_engine`` returns None
- ``"set_input_shape"``: the context refuses every shape (as for a shape outside the profile)
- ``"cudaMalloc"``, ``"cudaMemcpy"``, ``"cudaStreamCreate"``: the call returns an error code
- ``"get_timing_cache"``: ``get_timing_cache`` returns None
- ``"execute"``: ``execute_async_v3`` returns False
- ``"build"``: ``build_serialized_network`` returns None
A timing cache whose bytes start with ``OTHER-GPU`` is one TensorRT rejects (``set_timing_cache`` False,
``combine`` False without ``ignore_mismatch``).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FOREIGN_CACHE = b"OTHER-GPU"


@dataclass
class IO:
    """An engine I/O tensor: inputs have a profile (min, opt, max); outputs a shape computed from the inputs."""

    name: str
    mode: str  # "input" or "output"
    dtype: type = np.float32
    profile: tuple[tuple[int, ...], ...] = ()
    output_shape: Callable[[dict[str, tuple[int, ...]]], tuple[int, ...]] | None = None
    shape_io: bool = False
    network_shape: tuple[int, ...] = ()


@dataclass
class FakeState:
    """What the fakes were asked to do and what they saw."""

    io: list[IO]
    compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda feeds: {}
    inspector_json: dict = field(default_factory=lambda: {"Layers": [], "Bindings": []})
    version: str = "10.16.1.11"
    fail: set[str] = field(default_factory=set)
    deserialized: int = 0
    memory: dict[int, bytearray] = field(default_factory=dict)
    streams: set[int] = field(default_factory=set)
    stream_handles: list[int] = field(default_factory=list)
    network_flags: list[int] = field(default_factory=list)
    profile_calls: list[tuple] = field(default_factory=list)
    inspector_contexts: list[object] = field(default_factory=list)
    parse_ok: bool = True


def make_tensorrt(state: FakeState) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = state.version

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    class DataType(enum.Enum):
        FLOAT = np.float32
        HALF = np.float16
        INT32 = np.int32
        INT64 = np.int64

    dtypes = {np.float32: DataType.FLOAT, np.float16: DataType.HALF, np.int32: DataType.INT32,
              np.int64: DataType.INT64}

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    trt.Logger, trt.NetworkDefinitionCreationFlag, trt.DataType, trt.TensorIOMode = (
        Logger, NetworkDefinitionCreationFlag, DataType, TensorIOMode)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.ProfilingVerbosity = types.SimpleNamespace(LAYER_NAMES_ONLY=0, NONE=1, DETAILED=2)
    trt.LayerInformationFormat = types.SimpleNamespace(ONELINE=0, JSON=1)
    trt.nptype = lambda data_type: data_type.value

    class Tensor:  # ITensor of a network input
        def __init__(self, io: IO) -> None:
            self.name, self.shape, self.is_shape_tensor = io.name, io.network_shape, io.shape_io

    class Network:
        def __init__(self) -> None:
            self.inputs = [Tensor(io) for io in state.io if io.mode == "input"]
            self.num_inputs = len(self.inputs)

        def get_input(self, index: int) -> Tensor:
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.num_errors = 0 if state.parse_ok else 1

        def parse_from_file(self, model: str) -> bool:
            return state.parse_ok

        def get_error(self, index: int) -> object:
            return types.SimpleNamespace(node_name=lambda: "Conv_0", node_operator=lambda: "Conv", node=lambda: 0,
                                         desc=lambda: "Unsupported datatype")

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data) or b"CACHE:"

        def combine(self, input_cache: TimingCache, ignore_mismatch: bool) -> bool:
            if input_cache.data.startswith(FOREIGN_CACHE) and not ignore_mismatch:
                return False
            self.data += b"+" + input_cache.data
            return True

        def serialize(self) -> memoryview:
            return memoryview(self.data + b"|built")

    class Profile:
        def set_shape(self, input: str, min: tuple, opt: tuple, max: tuple) -> None:
            state.profile_calls.append(("set_shape", input, min, opt, max))

        def set_shape_input(self, input: str, min: tuple, opt: tuple, max: tuple) -> None:
            state.profile_calls.append(("set_shape_input", input, min, opt, max))

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY

        def set_memory_pool_limit(self, pool: int, pool_size: int) -> None:
            self.workspace = pool_size

        def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCache:
            return TimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.data.startswith(FOREIGN_CACHE) and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return None if "get_timing_cache" in state.fail else self.cache

        def add_optimization_profile(self, profile: Profile) -> int:
            return 0

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            state.network_flags.append(flags)
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> memoryview | None:
            if "build" in state.fail:
                return None
            assert config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
            return memoryview(b"fake engine")

    class Inspector:
        def __init__(self) -> None:
            self.execution_context = None

        def get_engine_information(self, format: object) -> str:
            state.inspector_contexts.append(self.execution_context)
            return json.dumps(state.inspector_json)

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            io = next(io for io in state.io if io.name == name)
            low, _, high = io.profile
            ok = "set_input_shape" not in state.fail and len(shape) == len(low) and all(
                lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True))
            if ok:
                self.shapes[name] = tuple(shape)
            return ok

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            io = next(io for io in state.io if io.name == name)
            if io.mode == "input":
                return self.shapes.get(name, io.network_shape)
            return io.output_shape(self.shapes) if self.shapes else tuple(-1 for _ in io.network_shape)

        def set_tensor_address(self, name: str, memory: int) -> bool:
            assert isinstance(memory, int), "set_tensor_address takes an int address"
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            assert type(stream_handle) is int, "execute_async_v3 takes the stream's native handle (an int)"
            state.stream_handles.append(stream_handle)
            if "execute" in state.fail:
                return False
            feeds = {}
            for io in state.io:
                if io.mode != "input":
                    continue
                shape = self.shapes.get(io.name, io.network_shape)
                size = int(np.prod(shape)) * np.dtype(io.dtype).itemsize
                address = self.addresses[io.name]
                raw = ctypes.string_at(address, size) if io.shape_io else bytes(state.memory[address][:size])
                feeds[io.name] = np.frombuffer(raw, dtype=io.dtype).reshape(shape)
            for name, value in state.compute(feeds).items():
                data = np.ascontiguousarray(value, dtype=next(io.dtype for io in state.io if io.name == name))
                state.memory[self.addresses[name]][:data.nbytes] = data.tobytes()
            return True

    class Engine:
        def __init__(self) -> None:
            self.num_io_tensors = len(state.io)

        def get_tensor_name(self, index: int) -> str:
            return state.io[index].name

        def _io(self, name: str) -> IO:
            return next(io for io in state.io if io.name == name)

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if self._io(name).mode == "input" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return dtypes[self._io(name).dtype]

        def is_shape_inference_io(self, name: str) -> bool:
            return self._io(name).shape_io

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            return list(self._io(name).profile)

        def create_execution_context(self) -> Context:
            return Context()

        def create_engine_inspector(self) -> Inspector:
            return Inspector()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> Engine | None:
            state.deserialized += 1
            return None if "deserialize" in state.fail else Engine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    # For tests that make each call raise in turn (not part of TensorRT's API).
    trt._fake_classes = (Builder, OnnxParser, Runtime, Network, Tensor, Config, Profile, TimingCache, Engine, Context,
                         Inspector)
    return trt


def make_cudart(state: FakeState) -> types.ModuleType:
    cudart = types.ModuleType("cuda.bindings.runtime")

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStream_t:
        def __init__(self, handle: int) -> None:
            self.handle = handle

        def __int__(self) -> int:
            raise AssertionError("int(cudaStream_t) is deprecated since cuda-bindings 12.9.1: use the native handle")

    addresses = itertools.count(0x7F0000000000, 0x1000)

    def status(call: str, error: cudaError_t) -> cudaError_t:
        return error if call in state.fail else cudaError_t.cudaSuccess

    def cudaMalloc(size: int) -> tuple:
        if "cudaMalloc" in state.fail:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        address = next(addresses)
        state.memory[address] = bytearray(size)
        return cudaError_t.cudaSuccess, address

    def cudaFree(devPtr: int) -> tuple:
        return (cudaError_t.cudaSuccess,) if state.memory.pop(devPtr, None) is not None else (
            cudaError_t.cudaErrorInvalidValue,)

    def cudaMemcpy(dst: int, src: int, count: int, kind: cudaMemcpyKind) -> tuple:
        if "cudaMemcpy" in state.fail:
            return (cudaError_t.cudaErrorInvalidValue,)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            state.memory[dst][:count] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(state.memory[src][:count]), count)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamCreate() -> tuple:
        if "cudaStreamCreate" in state.fail:
            return cudaError_t.cudaErrorInvalidValue, None
        handle = next(addresses)
        state.streams.add(handle)
        return cudaError_t.cudaSuccess, cudaStream_t(handle)

    def cudaStreamSynchronize(stream: cudaStream_t) -> tuple:
        return (status("cudaStreamSynchronize", cudaError_t.cudaErrorInvalidValue),)

    def cudaStreamDestroy(stream: cudaStream_t) -> tuple:
        state.streams.discard(stream.handle)
        return (cudaError_t.cudaSuccess,)

    for value in (cudaError_t, cudaMemcpyKind, cudaStream_t, cudaMalloc, cudaFree, cudaMemcpy, cudaStreamCreate,
                  cudaStreamSynchronize, cudaStreamDestroy):
        setattr(cudart, value.__name__, value)
    return cudart


def install(monkeypatch, state: FakeState) -> FakeState:
    """Make ``import tensorrt`` and ``from cuda.bindings import runtime`` find the fakes for one test."""
    cudart = make_cudart(state)
    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda obj: obj.handle
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, bindings.utils = cudart, utils
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    modules = {"tensorrt": make_tensorrt(state), "cuda": cuda, "cuda.bindings": bindings,
               "cuda.bindings.runtime": cudart, "cuda.bindings.utils": utils}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return state


def image_classifier(**options) -> FakeState:
    """An engine like the digits model's: image [N,1,8,8] (profile 1..32) -> logits [N,10]."""
    io = [IO("image", "input", profile=((1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8)), network_shape=(-1, 1, 8, 8)),
          IO("logits", "output", output_shape=lambda shapes: (shapes["image"][0], 10), network_shape=(-1, 10))]
    return FakeState(io=io, **options)


def read_fixture(path: Path) -> dict:
    return json.loads(path.read_text())
