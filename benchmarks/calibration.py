"""Calibration speed and memory: qdq's methods against plain ONNX Runtime inference and ONNX Runtime's quantizer.

Each measurement runs in a fresh subprocess (peak RSS is per process). Run by hand:

    chrt -r 1 python benchmarks/calibration.py       # the README tables (about 10 minutes on 2 cores)
    python benchmarks/calibration.py --quick         # 64 samples only

``chrt -r 1`` (real-time priority, as root) keeps other work on a shared machine from moving the ratios.

Models: a ResNet-50 (the ONNX wheel's topology, random weights, dynamic batch) at 224×224, a YOLOv8n-sized detector
at 320×320 (``benchmarks/make_yolov8n.py``, needs torch once) and a BERT-style encoder (6 layers, hidden 512, 8
heads, sequence 128), all fed in batches of 8 from an .npz file on disk.
Baseline: an ORT session with default optimisations running the float model over the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".data"
BATCH = 8
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "tests"))


def resnet50() -> onnx.ModelProto:
    from conftest import light_model

    model = light_model("resnet50", np.random.default_rng(0))
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    for init in model.graph.initializer:
        if init.name == "OC2_DUMMY_1":  # the Reshape before the classifier: [1, 2048] -> [-1, 2048]
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([-1, 2048], np.int64), init.name))
    return model


def encoder() -> onnx.ModelProto:
    from encoder import build_encoder

    return build_encoder(layers=6, hidden=512, heads=8, seq=128)


def prepare_files(name: str, samples: int) -> tuple[Path, Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    model_path, data_path = CACHE / f"{name}.onnx", CACHE / f"{name}-{samples}.npz"
    if not model_path.exists() and name == "yolov8n":
        raise SystemExit(f"{model_path} is missing: run `python benchmarks/make_yolov8n.py` (needs torch) first")
    if not model_path.exists():
        onnx.save(resnet50() if name == "resnet50" else encoder(), str(model_path))
    if not data_path.exists():
        rng = np.random.default_rng(1)
        if name == "resnet50":
            arrays = {"gpu_0/data_0": rng.normal(0, 1, (samples, 3, 224, 224)).astype(np.float32)}
        elif name == "yolov8n":
            arrays = {"images": rng.random((samples, 3, 320, 320), dtype=np.float32)}
        else:
            from encoder import encoder_inputs

            arrays = encoder_inputs(samples, 128, seed=1)
        np.savez(data_path, **arrays)
    return model_path, data_path


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(mode: str, model_path: Path, data_path: Path) -> dict:
    """One measurement in this process: wall time and peak RSS."""
    started = time.perf_counter()
    if mode == "ort-inference":
        import onnxruntime as ort

        from qdq.calibrate.data import input_specs, open_data

        model = onnx.load(str(model_path))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for batch in open_data(data_path, input_specs(model), BATCH):
            session.run(None, batch.feeds)
    elif mode.startswith("qdq-"):
        import qdq

        config = qdq.QuantizeConfig(method=mode.removeprefix("qdq-"), batch_size=BATCH)
        qdq.calibrate(model_path, data_path, config=config)
    elif mode.startswith("ort-quantizer-"):
        run_ort_quantizer(mode.removeprefix("ort-quantizer-"), model_path, data_path)
    else:
        raise SystemExit(f"unknown mode {mode}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def run_ort_quantizer(method: str, model_path: Path, data_path: Path) -> None:
    """ONNX Runtime's quantize_static, QDQ format, symmetric int8, per channel: the reference tool (benchmark only)."""
    import tempfile

    from onnxruntime.quantization import (  # noqa: TID251 (measured, not wrapped)
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from qdq.calibrate.data import input_specs, open_data

    specs = input_specs(onnx.load(str(model_path)))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(open_data(data_path, specs, BATCH))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else batch.feeds

    methods = {"entropy": CalibrationMethod.Entropy, "max": CalibrationMethod.MinMax,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(str(model_path), str(Path(tmp) / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=methods[method],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


def measure(mode: str, name: str, samples: int) -> dict:
    model_path, data_path = prepare_files(name, samples)
    proc = subprocess.run([sys.executable, __file__, "--one", mode, str(model_path), str(data_path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=3, metavar=("MODE", "MODEL", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="64 samples only")
    parser.add_argument("--models", nargs="+", default=["resnet50", "yolov8n", "encoder"])
    parser.add_argument("--samples", nargs="+", type=int, default=None)
    parser.add_argument("--no-ort-quantizer", action="store_true")
    args = parser.parse_args()
    if args.one:
        mode, model_path, data_path = args.one
        print(json.dumps(run_one(mode, Path(model_path), Path(data_path))))
        return

    methods = ["max", "entropy", "percentile", "mse"]
    sizes = args.samples or ([64] if args.quick else [64, 512])
    results = []
    for name in args.models:
        for samples in sizes:
            modes = ["ort-inference"] + [f"qdq-{m}" for m in methods]
            if samples == 64 and not args.no_ort_quantizer:
                modes += ["ort-quantizer-max", "ort-quantizer-entropy"]
            for mode in modes:
                result = measure(mode, name, samples)
                results.append({"model": name, "samples": samples, "mode": mode, **result})
                print(json.dumps(results[-1]), flush=True)
    (CACHE / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: list[dict]) -> None:
    base = {(r["model"], r["samples"]): r["seconds"]
            for r in results if r["mode"] == "ort-inference" and "seconds" in r}
    print("\n| model | samples | run | wall s | × inference | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['samples']} | {r['mode']} | failed: {r['error'][:60]} | | |")
            continue
        ratio = r["seconds"] / base[(r["model"], r["samples"])]
        print(f"| {r['model']} | {r['samples']} | {r['mode']} | {r['seconds']:.1f} | {ratio:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
