"""The README's corpus table: every model in models/corpus with its size, what qdq quantizes, SQNR per method,
OpenVINO's 8-bit layers, and the time and peak memory of ``qdq quantize`` with the defaults.

SQNR: the worst float output against the float model on the model's eval data (8 samples), as ``qdq compare``
computes it (the Q/DQ graph's arithmetic in ONNX Runtime with optimisations off). OpenVINO: executed layers that
hold a planned-INT8 Conv/ConvTranspose/Gemm/MatMul and run in u8/i8, over those planned (tests/openvino_consumer.py).
Time and memory: ``qdq quantize MODEL --calib CALIB -o OUT`` in a fresh process each (wall time of the whole
process including imports; peak resident memory, VmHWM).

Run by hand from the repository root: ``python benchmarks/corpus.py [NAME ...]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

import qdq
from qdq.config import METHODS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "models" / "corpus"
sys.path.insert(0, str(ROOT / "tests"))
from openvino_consumer import WEIGHTED, weighted_layers_not_in_8bit  # noqa: E402

# Peak memory is the process's VmHWM: unlike getrusage's maxrss, Linux resets it at exec, so the parent's size
# (copied by fork) does not count.
CHILD = """
import json, sys, time
started = time.perf_counter()
from qdq.cli import main
code = main(sys.argv[1:] + ["-q"])
seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "seconds": seconds, "peak_mb": peak / 1024}))
"""


def first_feeds(model: onnx.ModelProto, path: Path) -> dict[str, np.ndarray]:
    """One run's feeds: the first stacked whole input, or the first sample of a batch-first array."""
    data = dict(np.load(path))
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}
    return {k: v[0] if v.ndim == ranks[k] + 1 else v[:1] for k, v in data.items()}


def fresh_process_quantize(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, "quantize", str(CORPUS / f"{name}.onnx"), "--calib",
                              str(CORPUS / f"{name}.calib.npz"), "-o", str(Path(tmp) / "out.onnx")],
                             capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(name: str) -> dict:
    source = onnx.load(str(CORPUS / f"{name}.onnx"))
    record = json.loads((CORPUS / f"{name}.json").read_text())
    sqnr = {}
    for method in METHODS:
        result = qdq.quantize(CORPUS / f"{name}.onnx", CORPUS / f"{name}.calib.npz",
                              config=qdq.QuantizeConfig(method=method), evaluation_data=CORPUS / f"{name}.eval.npz")
        sqnr[method] = min(o.sqnr_db for o in result.report.comparison.outputs)
        if method == qdq.QuantizeConfig().method:
            default = result
    planned = [d.node for d in default.plan.quantized_nodes() if d.op in WEIGHTED]
    missed = weighted_layers_not_in_8bit(default.model, planned, first_feeds(source, CORPUS / f"{name}.eval.npz"))
    run = fresh_process_quantize(name)
    return {"name": name, "family": record["family"], "exporter": record["exporter"], "opset": record["opset"],
            "nodes": len(source.graph.node), "quantized": default.report.quantized_nodes, "sqnr": sqnr,
            "openvino": f"{len(planned) - len(missed)}/{len(planned)}", "seconds": run["seconds"],
            "peak_mb": run["peak_mb"]}


def main(names: list[str]) -> None:
    header = ("| model | family | exporter, opset | nodes | quantized ops | "
              + " | ".join(f"SQNR {m}" for m in METHODS) + " | OpenVINO 8-bit / planned INT8 | time | peak memory |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in names:
        r = row(name)
        print(f"| {r['name']} | {r['family']} | {r['exporter']}, {r['opset']} | {r['nodes']} | {r['quantized']} | "
              + " | ".join(f"{r['sqnr'][m]:.1f}" for m in METHODS)
              + f" | {r['openvino']} | {r['seconds']:.1f} s | {r['peak_mb']:.0f} MB |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(p.stem for p in CORPUS.glob("*.json")))
