"""Measure each corpus model's SQNR per method and record the floors the corpus test holds it to.

The floor is the measured SQNR (the worst float output, on the model's eval data, graph arithmetic in ONNX
Runtime with optimisations off) less a margin for float rounding that differs between CPUs and library builds,
rounded down to 0.5 dB. Needs qdq (not torch). Run: ``python models/corpus/floors.py [NAME ...]``; it rewrites
``min_sqnr_db`` and ``why_floor`` in each NAME.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import qdq
from qdq.config import METHODS

HERE = Path(__file__).resolve().parent
MARGIN_DB = 2.0


def measure(name: str) -> dict[str, float]:
    """Worst float output's SQNR for the defaults and each method."""
    measured = {}
    for method in ("default", *METHODS):
        config = qdq.QuantizeConfig() if method == "default" else qdq.QuantizeConfig(method=method)
        result = qdq.quantize(HERE / f"{name}.onnx", HERE / f"{name}.calib.npz", config=config,
                              evaluation_data=HERE / f"{name}.eval.npz")
        finite = [o.sqnr_db for o in result.report.comparison.outputs]
        measured[method] = round(min(finite), 2)
    return measured


def main(names: list[str]) -> None:
    for name in names:
        path = HERE / f"{name}.json"
        record = json.loads(path.read_text())
        measured = measure(name)
        record["min_sqnr_db"] = {k: math.floor((v - MARGIN_DB) * 2) / 2 for k, v in measured.items()}
        record["why_floor"] = ("measured (worst float output, 8 eval samples): "
                               + ", ".join(f"{k} {v:.2f} dB" for k, v in measured.items())
                               + f"; floor = measured - {MARGIN_DB:g} dB (float rounding across CPUs), "
                               "rounded down to 0.5 dB")
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(name, measured)


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(p.stem for p in HERE.glob("*.json")))
