"""Sharded calibration: wall time of `qdq ranges` with 1 process, `--workers N`, and `--ray` (when installed), and
the bytes of statistics each shard sends back. Each run is a fresh `qdq ranges` process. Run by hand:

    python benchmarks/sharded_calibration.py              # ResNet-50, 256 samples, max and entropy
    python benchmarks/sharded_calibration.py --samples 64
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration import ROOT, prepare_files  # noqa: E402


def run(model: Path, data: Path, method: str, extra: list[str], out: Path) -> tuple[float, str, int | None]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qdq.cli", "ranges", str(model), "--calib", str(data), "-o",
                           str(out), "--method", method, "--batch-size", "8", *extra],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    per_shard = re.search(r"at most (\d+) per shard", done.stderr)
    return seconds, out.read_text(), int(per_shard.group(1)) if per_shard else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    model, data = prepare_files("resnet50", args.samples)
    configs = [("1 process", [])] + [(f"--workers {n}", ["--workers", str(n)]) for n in args.workers]
    if importlib.util.find_spec("ray") is not None:
        configs.append(("--ray (local, 2 CPUs)", ["--ray", "--workers", "2"]))
    print("| method | run | seconds | speedup | statistics per shard (bytes) | ranges identical |")
    print("|---|---|---|---|---|---|")
    for method in ("max", "entropy"):
        base = None
        for label, extra in configs:
            seconds, text, per_shard = run(model, data, method, extra, model.with_suffix(f".{method}.json"))
            base = base or (seconds, text)
            print(f"| {method} | {label} | {seconds:.1f} | {base[0] / seconds:.2f}× | "
                  f"{per_shard if per_shard is not None else '-'} | {text == base[1]} |", flush=True)


if __name__ == "__main__":
    main()
