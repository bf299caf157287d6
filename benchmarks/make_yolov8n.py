"""A YOLOv8n-sized detector for the calibration speed benchmark: ultralytics' YOLOv8n layer widths and depths
(backbone 16-32-64-128-256, C2f repeats 1-2-2-1, head 64/80 channels, 80 classes) at 320x320, built by the
corpus's YOLOv8 (``models/corpus/make_detectors.py``), random-seeded with settled BatchNorm, exported by
TorchScript at opset 17 with a dynamic batch, as ultralytics exports. Speed, not accuracy, is measured on it, so
random weights do.

Run (needs torch; writes benchmarks/.data/yolov8n.onnx, 13 MB, not committed):

    python benchmarks/make_yolov8n.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models" / "corpus"))

from corpus_io import he_init, settle_batchnorm  # noqa: E402
from make_detectors import YOLOv8  # noqa: E402

SIZE = 320
OUT = ROOT / "benchmarks" / ".data" / "yolov8n.onnx"


def main() -> None:
    torch.manual_seed(8)
    model = YOLOv8(widths=(16, 32, 64, 128, 256), depths=(1, 2, 2, 1), head=(64, 80), classes=80, size=SIZE)
    he_init(model, 8)
    model.dfl.weight.data[:] = torch.arange(YOLOv8.REG_MAX, dtype=torch.float32).view(1, YOLOv8.REG_MAX, 1, 1)
    settle_batchnorm(model, [(torch.rand(4, 3, SIZE, SIZE),) for _ in range(2)])
    model.eval()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.rand(1, 3, SIZE, SIZE),), str(OUT), opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    print("wrote", OUT)


if __name__ == "__main__":
    main()
