"""Activation range methods compared on trained models: SQNR, top-1 agreement and calibration time.

Run by hand (a few minutes on 2 cores):

    python benchmarks/accuracy.py                  # every model found, every method; prints the README table
    python benchmarks/accuracy.py --models digits dwsep --methods max auto

Models: the digits CNN (models/digits) and the trained models in models/trained/NAME/ (calib.npz, eval.npz,
labels.npy), plus the corpus models in models/corpus/ (random weights unless their .json says trained; 8 samples;
top-1 agreement only for classifiers). SQNR is of the first output.
Every number is computed here, on the evaluation data, with qdq.runtime.quantized_session (ONNX Runtime with
graph optimisations off, so the Q/DQ graph's arithmetic, not ORT's int8 CPU kernels) against the float model run
the same way. Time: qdq.calibrate alone (best of --repeat runs), then its ratio to the default before auto
(entropy-guarded).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qdq  # noqa: E402
from qdq.calibrate.data import input_specs, open_data  # noqa: E402
from qdq.model_io import load_model  # noqa: E402
from qdq.quantize import prepare  # noqa: E402
from qdq.runtime import quantized_session  # noqa: E402

METHODS = ("max", "entropy-guarded", "entropy", "percentile", "mse", "auto")
BASELINE = "entropy-guarded"


def models() -> dict[str, dict]:
    found = {"digits": {"onnx": ROOT / "models/digits/digits.onnx", "calib": ROOT / "models/digits/calib.npz",
                        "eval": ROOT / "models/digits/eval.npz", "labels": ROOT / "models/digits/labels.npy",
                        "weights": "trained", "classifier": True}}
    for folder in sorted((ROOT / "models/trained").glob("*/")):
        if (folder / f"{folder.name}.onnx").exists():
            found[folder.name] = {"onnx": folder / f"{folder.name}.onnx", "calib": folder / "calib.npz",
                                  "eval": folder / "eval.npz", "labels": folder / "labels.npy", "weights": "trained",
                                  "classifier": True}
    for meta in sorted((ROOT / "models/corpus").glob("*.json")):
        info = json.loads(meta.read_text())
        name = info.get("name", meta.stem)
        base = meta.with_suffix("")
        if Path(f"{base}.onnx").exists():
            found[name] = {"onnx": Path(f"{base}.onnx"), "calib": Path(f"{base}.calib.npz"),
                           "eval": Path(f"{base}.eval.npz"), "labels": None, "weights": info.get("weights", "?"),
                           "classifier": info.get("family") == "classifier"}
    return found


def outputs(session, data) -> list[np.ndarray]:
    name = session.get_outputs()[0].name
    return [session.run([name], batch.feeds)[0] for batch in data]


def measure(entry: dict, method: str, repeat: int) -> dict:
    config = qdq.QuantizeConfig(method=method)
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        ranges = qdq.calibrate(entry["onnx"], entry["calib"], config=config)
        seconds.append(time.perf_counter() - started)
    result = qdq.quantize(entry["onnx"], ranges=ranges, config=config)
    prepared, _ = prepare(load_model(entry["onnx"]))
    data = open_data(entry["eval"], input_specs(prepared), config.batch_size)
    reference = np.concatenate([o.reshape(len(o), -1) for o in outputs(quantized_session(prepared, what="float"),
                                                                         data)])
    quantized = np.concatenate([o.reshape(len(o), -1) for o in outputs(quantized_session(result.model), data)])
    noise = np.sum((quantized.astype(np.float64) - reference) ** 2)
    sqnr = 10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30))
    agree = float(np.mean(quantized.argmax(axis=1) == reference.argmax(axis=1))) if entry["classifier"] else None
    row = {"method": method, "sqnr_db": float(sqnr), "top1_agreement": agree, "calib_s": min(seconds),
           "sources": sorted({result.ranges.source(n).split(",")[0] for n in result.ranges})}
    if entry["labels"] is not None:
        labels = np.load(entry["labels"])
        row["accuracy"] = float(np.mean(quantized.argmax(axis=1)[:len(labels)] == labels))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--wide", action="store_true", help="one row per model: SQNR per method, and times")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    table = {name: entry for name, entry in models().items() if not args.models or name in args.models}
    rows = []
    for name, entry in table.items():
        for method in args.methods:
            rows.append({"model": name, "weights": entry["weights"], **measure(entry, method, args.repeat)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.wide:
        print_wide(rows, args.methods)
        return
    base = {r["model"]: r["calib_s"] for r in rows if r["method"] == BASELINE}
    print("| model | method | SQNR dB | top-1 agreement | calibration s | × entropy-guarded |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['calib_s'] / base[r['model']]:.1f}" if r["model"] in base else "-"
        agree = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.2f}%"
        print(f"| {r['model']} | {r['method']} | {r['sqnr_db']:.2f} | {agree} | {r['calib_s']:.2f} | {ratio} |")


def print_wide(rows: list[dict], methods: list[str]) -> None:
    """One row per model: each method's SQNR, then each method's calibration time over the baseline's."""
    print("| model | " + " | ".join(methods) + " | time × " + BASELINE + ": " + ", ".join(methods) + " |")
    print("|---|" + "---|" * len(methods) + "---|")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["method"]: r for r in rows if r["model"] == model}
        best = max(r["sqnr_db"] for r in mine.values())
        cells = [f"**{mine[m]['sqnr_db']:.2f}**" if mine[m]["sqnr_db"] == best else f"{mine[m]['sqnr_db']:.2f}"
                 for m in methods]
        base = mine[BASELINE]["calib_s"] if BASELINE in mine else None
        times = ", ".join(f"{mine[m]['calib_s'] / base:.1f}" for m in methods) if base else "-"
        print(f"| {model} | " + " | ".join(cells) + f" | {times} |")


if __name__ == "__main__":
    main()
