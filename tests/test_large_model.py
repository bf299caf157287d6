"""A model whose weights exceed 2 GB: loads and saves with external data, quantizes in bounded memory.

Marked ``large`` (about a minute and 5 GB of RAM): the default run skips it, CI runs it (`.ci/run`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.large

LAYERS, WIDTH = 33, 4096  # 33 float32 matrices of 4096 x 4096: 2.2 GB of weights

SCRIPT = textwrap.dedent(f"""
    import json, pathlib, sys
    import numpy as np, onnx
    from onnx import TensorProto, helper, numpy_helper
    import qdq

    folder = pathlib.Path(sys.argv[1])
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range({LAYERS}):
        w = (rng.standard_normal(({WIDTH}, {WIDTH}), dtype=np.float32) * np.float32(1 / np.sqrt({WIDTH})))
        inits.append(numpy_helper.from_array(w, f"w{{i}}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{{i}}"], [f"h{{i}}"], name=f"matmul{{i}}"))
        x = f"h{{i}}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", {WIDTH}])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", {WIDTH}])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "big.onnx"), save_as_external_data=True, location="big.onnx.data")
""")

# Run in a process of its own, so that its peak memory is the quantization's alone.
QUANTIZE = textwrap.dedent(f"""
    import json, pathlib, sys
    import numpy as np
    import qdq

    folder = pathlib.Path(sys.argv[1])
    weights = (folder / "big.onnx.data").stat().st_size

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    before = peak()
    rng = np.random.default_rng(1)
    data = {{"x": rng.standard_normal((16, {WIDTH}), dtype=np.float32)}}
    result = qdq.quantize(folder / "big.onnx", data, config=qdq.QuantizeConfig(method="max", batch_size=8))
    out = result.save(folder / "big.qdq.onnx")
    print(json.dumps({{"weights": weights, "peak": peak(), "before": before, "out": out.stat().st_size,
                      "out_data": (folder / "big.qdq.onnx.data").exists(), "activations": result.report.activations}}))
""")


def test_model_over_2gb_quantizes_in_bounded_memory(tmp_path):
    made = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", QUANTIZE, str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = report["peak"] / report["weights"]
    print(f"weights {report['weights'] / 1e9:.2f} GB, peak RSS {report['peak'] / 1e9:.2f} GB ({ratio:.2f}x)")
    assert report["weights"] > 2**31
    assert report["activations"] == LAYERS
    # int8 weights: 0.55 GB, one protobuf file, no external data needed any more.
    assert not report["out_data"] and report["out"] < report["weights"] / 3
    assert ratio < 2.5, f"peak memory {ratio:.2f}x the weights"
