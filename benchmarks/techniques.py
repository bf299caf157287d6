"""Accuracy techniques on trained models: each alone, the ``--optimize`` levels, and ONNX Runtime's quantizer.

Run by hand (a few minutes on 2 cores):

    python benchmarks/techniques.py                  # every model, markdown table on stdout
    python benchmarks/techniques.py dwsep transformer  # some of them

Models: ``models/digits`` (residual CNN) and ``models/trained/*`` (depthwise-separable CNN, row transformer,
unrolled LSTM), each calibrated on its 128 ``calib.npz`` images and measured on the 450 ``eval.npz`` images.
SQNR and top-1 agreement are of the logits against the float model; every quantized model, ORT's included, is
run by ``qdq.runtime.quantized_session`` (the Q/DQ graph's arithmetic, ORT optimisations off). Time is the
``quantize`` call alone (no evaluation; median of 3), on a shared machine: compare ratios, not seconds.

ONNX Runtime's quantizer (``quantize_static``, QDQ format, symmetric int8 activations and weights, weights per
channel) is run with each of its calibration methods (MinMax, Entropy, Percentile) and its best is reported.
This is the only place ``onnxruntime.quantization`` is imported: qdq never wraps a competitor.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qdq import quantize  # noqa: E402
from qdq.calibrate.data import input_specs, open_data  # noqa: E402
from qdq.compare import compare_models  # noqa: E402
from qdq.config import QuantizeConfig  # noqa: E402

MODELS = {
    "digits": ROOT / "models" / "digits" / "digits.onnx",
    "dwsep": ROOT / "models" / "trained" / "dwsep" / "dwsep.onnx",
    "transformer": ROOT / "models" / "trained" / "transformer" / "transformer.onnx",
    "lstm": ROOT / "models" / "trained" / "lstm" / "lstm.onnx",
}
REPEATS = 3  # time is the median of this many runs (the machine is shared)
PREVIOUS = {"method": "entropy-guarded", "optimize": 0}  # the default before issue 13 (ranges and weights)
ROWS: list[tuple[str, dict]] = [
    ("nearest, max", {"method": "max", "optimize": 0}),
    ("previous default (entropy-guarded)", PREVIOUS),
    ("+ equalize", {**PREVIOUS, "techniques": ("equalize",)}),
    ("+ smoothquant", {**PREVIOUS, "techniques": ("smoothquant",)}),
    ("+ adaround", {**PREVIOUS, "techniques": ("adaround",)}),
    ("+ bias-correction", {**PREVIOUS, "techniques": ("bias-correction",)}),
    ("previous default + --optimize 1", {**PREVIOUS, "optimize": 1}),
    ("previous default + --optimize 2", {**PREVIOUS, "optimize": 2}),
    ("new default method, --optimize 0", {"optimize": 0}),
    ("new default method, --optimize 2", {"optimize": 2}),
    ("new default (no flags)", {}),
]


def measure(path: Path, options: dict) -> dict:
    calib = path.parent / "calib.npz"
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = quantize(path, calib, config=QuantizeConfig(**options))
        times.append(time.perf_counter() - started)
    return {**evaluate(path, result.model), "seconds": float(np.median(times))}


def evaluate(path: Path, quantized: onnx.ModelProto) -> dict:
    from qdq.quantize import prepare

    folder = path.parent
    prepared, _ = prepare(onnx.load(str(path)))
    data = open_data(folder / "eval.npz", input_specs(prepared))
    comparison = compare_models(prepared, quantized, data, np.load(folder / "labels.npy"))
    out = comparison.outputs[0]
    return {"sqnr": out.sqnr_db, "top1": out.top1_agreement, "accuracy": comparison.quant_accuracy,
            "float_accuracy": comparison.float_accuracy}


def ort_best(path: Path) -> dict:
    """ONNX Runtime's static QDQ quantizer with each calibration method; the best SQNR."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    images = np.load(path.parent / "calib.npz")["image"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": images[i:i + 16]} for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    best: dict = {}
    for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ort.onnx"
            started = time.perf_counter()
            quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
            seconds = time.perf_counter() - started
            measured = {**evaluate(path, onnx.load(str(out))), "seconds": seconds, "method": method.name}
        if not best or measured["sqnr"] > best["sqnr"]:
            best = measured
    return best


def main(names: list[str]) -> None:
    import logging

    logging.getLogger("qdq").setLevel(logging.WARNING)
    print("| model | configuration | SQNR dB | top-1 agree | accuracy | time s |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        path = MODELS[name]
        for label, options in ROWS:
            m = measure(path, options)
            print(f"| {name} | {label} | {m['sqnr']:.2f} | {m['top1']:.4f} | {m['accuracy']:.4f} | "
                  f"{m['seconds']:.2f} |", flush=True)
        o = ort_best(path)
        print(f"| {name} | ORT quantize_static (best: {o['method']}) | {o['sqnr']:.2f} | {o['top1']:.4f} | "
              f"{o['accuracy']:.4f} | {o['seconds']:.2f} |", flush=True)
        print(f"| {name} | float | | | {o['float_accuracy']:.4f} | |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
