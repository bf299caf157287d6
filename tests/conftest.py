"""Shared fixtures: tiny graphs in ONNX text, seeded data, ONNX Runtime as the numerical oracle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from qdq.graph import import_graph
from qdq.passes.opset import UpgradeOpset

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def parse(text: str, rng: np.random.Generator | None = None, *, weight_scale: float = 0.3) -> onnx.ModelProto:
    """A model from ONNX text; initializers declared with ``= {...}`` placeholders get seeded random values."""
    model = onnx.parser.parse_model(text)
    if rng is not None:
        model = with_random_weights(model, rng, scale=weight_scale)
    onnx.checker.check_model(model, full_check=True)
    return model


def with_random_weights(model: onnx.ModelProto, rng: np.random.Generator, *, scale: float | None = None
                        ) -> onnx.ModelProto:
    """Replace every float initializer by seeded random values.

    ``scale=None`` uses He initialisation for weights of rank >= 2 (fan-in from all axes but the first) and
    uniform [0.5, 1.5] for 1-D tensors (BatchNorm statistics must be positive; biases may be anything), so deep
    networks keep their activations in a sane range.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or not init.dims:
            continue  # scalars are attributes in disguise (Dropout's ratio...), not weights
        shape = tuple(init.dims)
        if scale is not None:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[1:])) or 1
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        else:
            values = rng.uniform(0.5, 1.5, shape)
        init.ClearField("float_data")
        init.raw_data = values.astype(np.float32).tobytes()
    return out


def light_model(name: str, rng: np.random.Generator) -> onnx.ModelProto:
    """An ONNX-wheel test model with its ConstantOfShape placeholder weights replaced by seeded random ones.

    The placeholders are materialised directly (not by constant folding, which takes seconds on VGG's 400 MB
    of weights), then the opset is raised to 13 as qdq's preparation would.
    """
    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    shapes = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            # A placeholder of the right shape; with_random_weights fills it (raw_data set directly: fast).
            model.graph.initializer.add(name=node.output[0], data_type=onnx.TensorProto.FLOAT,
                                        dims=[int(d) for d in shapes[node.input[0]]])
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    real_inputs = [i for i in model.graph.input if i.name not in shapes]  # IR 3 listed initializers as inputs
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    model.ir_version = 7  # initializers need not be graph inputs from IR 4 on
    model = UpgradeOpset().run(model).model
    return with_random_weights(model, rng)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
            ) -> list[np.ndarray]:
    """The oracle: ONNX Runtime on CPU with graph optimisations off."""
    return oracle(model, outputs).run(outputs, feeds)


def oracle(model: onnx.ModelProto, outputs: list[str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with graph optimisations off, exposing ``outputs`` when given."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if outputs is not None:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        del model.graph.output[:]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in outputs)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def nodes_by_op(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    raise KeyError(name)


def gs_graph(model: onnx.ModelProto):
    return import_graph(model)


def read_only(path: Path) -> tuple[bytes, float]:
    """A file's bytes and mtime, to check that qdq never modifies its input."""
    return path.read_bytes(), os.stat(path).st_mtime


def quantize_with_onnxruntime(model: onnx.ModelProto, folder: Path, rng: np.random.Generator, **options
                              ) -> onnx.ModelProto:
    """The model quantized by ONNX Runtime's quantize_static (QDQ format, its defaults): a model from another tool
    for the tests of check and inspect. Test-only use; qdq never wraps it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static  # noqa: TID251

    name = model.graph.input[0].name
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: rng.normal(size=shape).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    onnx.save(model, str(folder / "float.onnx"))
    quantize_static(str(folder / "float.onnx"), str(folder / "ort.qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    **options)
    return onnx.load(str(folder / "ort.qdq.onnx"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``qdq ARGV`` in this process: exit code, stdout, stderr."""
    from qdq.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
