"""The TensorRT step on a real TensorRT and GPU: build, inspector summary, verify, timing-cache reuse.

Runs only where TensorRT 10 or 11, cuda-python and a CUDA device exist; everywhere else each test skips with
the reason. Run it with ``python -m pytest -q tests/trt`` (README: "Running the GPU tests").
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import DIGITS


def gpu_missing() -> str | None:
    """Why these tests cannot run here, or None."""
    for module, what in (("tensorrt", "TensorRT"), ("cuda", "cuda-python")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed (pip install 'qdq[trt]' on a machine with an NVIDIA GPU)"
    from qdq.trt import import_cudart

    cudart = import_cudart()
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count < 1:
        return f"no CUDA device ({getattr(error, 'name', error)})"
    return None


REASON = gpu_missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
SHAPES = "image:1x1x8x8,8x1x8x8,32x1x8x8"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import qdq
    from qdq import trt
    from qdq.model_io import load_model
    from qdq.trt_plan import quantized_node_names

    folder = tmp_path_factory.mktemp("gpu")
    model = folder / "digits.qdq.onnx"
    qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz").save(model)
    proto = load_model(model)
    result = trt.build_engine(model, folder / "digits.engine", shapes=trt.parse_shapes([SHAPES]),
                              timing_cache=folder / "digits.cache", quantized_nodes=quantized_node_names(proto),
                              node_order=[n.name for n in proto.graph.node])
    return folder, model, proto, result


def test_build_reports_int8_layers_in_this_versions_layout(built):
    import tensorrt

    _, _, _, result = built
    summary = result.summary
    assert summary.layout == ("TensorRT 11" if int(tensorrt.__version__.split(".")[0]) >= 11 else "TensorRT 10")
    assert summary.by_precision.get("INT8", 0) >= 5, summary.describe()
    assert summary.unknown_types == (), f"data-type strings not recognised: {summary.unknown_types}"
    assert summary.not_int8 == (), summary.describe()


def test_verify_matches_onnx_runtime(built):
    from qdq import trt

    _, _, proto, result = built
    comparison = trt.verify_engine(proto, result.engine, DIGITS / "eval.npz", batch_size=8)
    assert comparison.outputs[0].sqnr_db > 30, comparison.outputs[0]


def test_data_outside_the_profile_is_an_engine_error(built):
    from qdq import trt

    _, _, proto, result = built
    with pytest.raises(trt.EngineError, match="outside the engine's profile"):
        trt.verify_engine(proto, result.engine, DIGITS / "eval.npz", batch_size=64)


def test_timing_cache_is_reused_by_the_next_build(built):
    from qdq import trt

    folder, model, _, _ = built
    cache = folder / "digits.cache"
    size = cache.stat().st_size
    again = trt.build_engine(model, folder / "again.engine", shapes=trt.parse_shapes([SHAPES]), timing_cache=cache)
    assert again.warnings == (), "the cache this GPU wrote is accepted and merged"
    assert cache.stat().st_size >= size
