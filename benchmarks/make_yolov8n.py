"""A YOLOv8n-sized detector for the calibration speed benchmark: ultralytics' YOLOv8n layer widths and depths
(backbone 16-32-64-128-256, C2f repeats 1-2-2-1, 80 classes) at 320x320, built from the corpus's YOLOv8 blocks
(``models/corpus/make_detectors.py``), random-seeded with settled BatchNorm, exported by TorchScript at opset 17
with a dynamic batch, as ultralytics exports. Speed, not accuracy, is measured on it, so random weights do.

Run (needs torch; writes benchmarks/.data/yolov8n.onnx, 12 MB, not committed):

    python benchmarks/make_yolov8n.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models" / "corpus"))

from corpus_io import he_init, settle_batchnorm  # noqa: E402
from make_detectors import SPPF, C2f, conv  # noqa: E402

SIZE, CLASSES, REG_MAX = 320, 80, 16
OUT = ROOT / "benchmarks" / ".data" / "yolov8n.onnx"


class YOLOv8n(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(conv(3, 16, 3, 2), conv(16, 32, 3, 2), C2f(32, 32), conv(32, 64, 3, 2),
                                C2f(64, 64, 2))
        self.b2 = nn.Sequential(conv(64, 128, 3, 2), C2f(128, 128, 2))
        self.b3 = nn.Sequential(conv(128, 256, 3, 2), C2f(256, 256), SPPF(256, 256))
        self.n4, self.n3 = C2f(384, 128, shortcut=False), C2f(192, 64, shortcut=False)
        self.d3, self.o4 = conv(64, 64, 3, 2), C2f(192, 128, shortcut=False)
        self.d4, self.o5 = conv(128, 128, 3, 2), C2f(384, 256, shortcut=False)
        self.box = nn.ModuleList(nn.Sequential(conv(c, 64, 3), conv(64, 64, 3), nn.Conv2d(64, 4 * REG_MAX, 1))
                                 for c in (64, 128, 256))
        self.cls = nn.ModuleList(nn.Sequential(conv(c, 80, 3), conv(80, 80, 3), nn.Conv2d(80, CLASSES, 1))
                                 for c in (64, 128, 256))
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)

    def forward(self, x):
        p3 = self.b1(x)
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        n4 = self.n4(torch.cat((F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4), 1))
        o3 = self.n3(torch.cat((F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3), 1))
        o4 = self.o4(torch.cat((self.d3(o3), n4), 1))
        o5 = self.o5(torch.cat((self.d4(o4), p5), 1))
        n = x.shape[0]
        levels = [torch.cat((b(f), c(f)), 1).view(n, 4 * REG_MAX + CLASSES, -1)
                  for f, b, c in zip((o3, o4, o5), self.box, self.cls, strict=True)]
        box, scores = torch.cat(levels, 2).split((4 * REG_MAX, CLASSES), 1)
        a = box.shape[2]
        dist = self.dfl(box.view(n, 4, REG_MAX, a).transpose(2, 1).softmax(1)).view(n, 4, a)
        return torch.cat((dist, scores.sigmoid()), 1)


def main() -> None:
    torch.manual_seed(8)
    model = YOLOv8n()
    he_init(model, 8)
    model.dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)
    settle_batchnorm(model, [(torch.rand(4, 3, SIZE, SIZE),) for _ in range(2)])
    model.eval()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.rand(1, 3, SIZE, SIZE),), str(OUT), opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    print("wrote", OUT)


if __name__ == "__main__":
    main()
