"""Corpus detectors and OCR: a YOLOv8-style detector, a DBNet-style text detector and a CRNN text recogniser,
written out by hand at small widths after their public architectures, random-seeded, exported by torch.

- ``yolov8``: ultralytics' YOLOv8 (Conv+BN+SiLU, C2f with Split, SPPF's chained MaxPools, nearest Resize
  upsampling, Concat, the decoupled head with its DFL: Softmax over 16 bins and a fixed 1x1 Conv, anchors and
  strides as constants, box decode and Sigmoid scores concatenated), exported as ultralytics does (TorchScript,
  opset 17).
- ``dbnet``: DBNet (ResNet-style backbone, FPN with Resize + Add, the four levels resized and concatenated, the
  probability head's ConvTranspose upsampling and Sigmoid), TorchScript at opset 11 as PaddleOCR/MMOCR deploy
  exports were.
- ``crnn``: CRNN (VGG-style convolutions to a height of 1, a bidirectional LSTM over the width, Linear and
  LogSoftmax: the CTC head), TorchScript at opset 13; the LSTM's omitted optional inputs are written as "".

Run: ``/work/venv-models/bin/python models/corpus/make_detectors.py [NAME ...]``. Seeded.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from corpus_io import CALIB_SEED, EVAL_SEED, SAMPLES, export, he_init, images, save_data, settle_batchnorm, write_record
from make_cnn import BasicBlock, cbr
from torch import nn
from torch.nn import functional as F  # noqa: N812


def conv(cin: int, cout: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return cbr(cin, cout, k, s, act=nn.SiLU)


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = conv(c, c, 3), conv(c, c, 3), shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1, self.cv2 = conv(c1, 2 * self.c), conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1, self.cv2, self.pool = conv(c1, c1 // 2), conv(c1 * 2, c2), nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YOLOv8(nn.Module):
    """The corpus widths by default; ``benchmarks/make_yolov8n.py`` builds ultralytics' YOLOv8n from the same code."""

    REG_MAX = 16

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64, 96), depths: tuple[int, ...] = (1, 1, 1, 1),
                 head: tuple[int, int] = (32, 32), classes: int = 8, size: int = 64) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.CLASSES = classes  # noqa: N815 (read as a constant, like REG_MAX)
        self.b1 = nn.Sequential(conv(3, w0, 3, 2), conv(w0, w1, 3, 2), C2f(w1, w1, depths[0]), conv(w1, w2, 3, 2),
                                C2f(w2, w2, depths[1]))
        self.b2 = nn.Sequential(conv(w2, w3, 3, 2), C2f(w3, w3, depths[2]))
        self.b3 = nn.Sequential(conv(w3, w4, 3, 2), C2f(w4, w4, depths[3]), SPPF(w4, w4))
        self.n4, self.n3 = C2f(w4 + w3, w3, shortcut=False), C2f(w3 + w2, w2, shortcut=False)
        self.d3, self.o4 = conv(w2, w2, 3, 2), C2f(w2 + w3, w3, shortcut=False)
        self.d4, self.o5 = conv(w3, w3, 3, 2), C2f(w3 + w4, w4, shortcut=False)
        box, cls = head
        self.box = nn.ModuleList(nn.Sequential(conv(c, box, 3), conv(box, box, 3), nn.Conv2d(box, 4 * self.REG_MAX, 1))
                                 for c in (w2, w3, w4))
        self.cls = nn.ModuleList(nn.Sequential(conv(c, cls, 3), conv(cls, cls, 3), nn.Conv2d(cls, classes, 1))
                                 for c in (w2, w3, w4))
        self.dfl = nn.Conv2d(self.REG_MAX, 1, 1, bias=False).requires_grad_(False)
        anchors, strides = [], []
        for stride in (8, 16, 32):
            cells = size // stride
            ys, xs = torch.meshgrid(torch.arange(cells) + 0.5, torch.arange(cells) + 0.5, indexing="ij")
            anchors.append(torch.stack((xs, ys), -1).view(-1, 2))
            strides.append(torch.full((cells * cells, 1), float(stride)))
        self.register_buffer("anchors", torch.cat(anchors).T.unsqueeze(0))
        self.register_buffer("strides", torch.cat(strides).T.unsqueeze(0))

    def forward(self, x):
        p3 = self.b1(x)
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        n4 = self.n4(torch.cat((F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4), 1))
        o3 = self.n3(torch.cat((F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3), 1))
        o4 = self.o4(torch.cat((self.d3(o3), n4), 1))
        o5 = self.o5(torch.cat((self.d4(o4), p5), 1))
        n = x.shape[0]
        levels = [torch.cat((b(f), c(f)), 1).view(n, 4 * self.REG_MAX + self.CLASSES, -1)
                  for f, b, c in zip((o3, o4, o5), self.box, self.cls, strict=True)]
        box, scores = torch.cat(levels, 2).split((4 * self.REG_MAX, self.CLASSES), 1)
        a = box.shape[2]
        dist = self.dfl(box.view(n, 4, self.REG_MAX, a).transpose(2, 1).softmax(1)).view(n, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((boxes, scores.sigmoid()), 1)


class DBNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.c2, self.c3 = BasicBlock(16, 16, 1), BasicBlock(16, 32, 2)
        self.c4, self.c5 = BasicBlock(32, 64, 2), BasicBlock(64, 96, 2)
        self.lateral = nn.ModuleList(nn.Conv2d(c, 64, 1, bias=False) for c in (16, 32, 64, 96))
        self.smooth = nn.ModuleList(nn.Conv2d(64, 16, 3, 1, 1, bias=False) for _ in range(4))
        self.head = nn.Sequential(cbr(64, 16, 3), nn.ConvTranspose2d(16, 16, 2, 2), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.ConvTranspose2d(16, 1, 2, 2))

    def forward(self, x):
        c2 = self.c2(self.stem(x))
        c3 = self.c3(c2)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        in2, in3, in4, in5 = (m(c) for m, c in zip(self.lateral, (c2, c3, c4, c5), strict=True))
        out4 = in4 + F.interpolate(in5, scale_factor=2.0, mode="nearest")
        out3 = in3 + F.interpolate(out4, scale_factor=2.0, mode="nearest")
        out2 = in2 + F.interpolate(out3, scale_factor=2.0, mode="nearest")
        p = [F.interpolate(s(o), scale_factor=float(f), mode="nearest") if f > 1 else s(o)
             for s, o, f in zip(self.smooth, (out2, out3, out4, in5), (1, 2, 4, 8), strict=True)]
        return torch.sigmoid(self.head(torch.cat(p[::-1], 1)))


class CRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            cbr(1, 32), nn.MaxPool2d(2, 2), cbr(32, 64), nn.MaxPool2d(2, 2), cbr(64, 96), cbr(96, 96),
            nn.MaxPool2d((2, 1), (2, 1)), cbr(96, 128), nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(128, 128, (2, 1)), nn.BatchNorm2d(128), nn.ReLU())
        self.rnn = nn.LSTM(128, 64, bidirectional=True)
        self.fc = nn.Linear(128, 37)

    def forward(self, x):
        features = self.cnn(x).squeeze(2).permute(2, 0, 1)  # [width, batch, channels]
        out, _ = self.rnn(features)
        return F.log_softmax(self.fc(out), dim=2)


def text_lines(seed: int, n: int) -> np.ndarray:
    """Grey text-line-like images [n, 1, 32, 64]: dark strokes (random short bars) on a light, uneven page."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, 32, 64), np.float32)
    for i in range(n):
        page = 0.8 + 0.1 * rng.standard_normal((32, 64)).astype(np.float32)
        for _ in range(14):
            x, y = rng.integers(2, 60), rng.integers(8, 20)
            page[y:y + rng.integers(3, 14), x:x + rng.integers(1, 4)] -= 0.6
        out[i, 0] = (page - 0.5) / 0.5
    return out


DETECTORS = {
    "yolov8": (YOLOv8, "detector", 17, "ultralytics YOLOv8n export (C2f with Split, SPPF, Resize upsampling, "
               "Concat, DFL head with Softmax, box decode)", ["images"], ["output0"]),
    "dbnet": (DBNet, "ocr", 11, "DBNet text detector (ResNet backbone, FPN with Resize + Add, ConvTranspose "
              "probability head, Sigmoid)", ["x"], ["maps"]),
    "crnn": (CRNN, "ocr", 13, "CRNN text recogniser (VGG-style Conv, bidirectional LSTM, Linear + LogSoftmax "
             "CTC head)", ["image"], ["log_probs"]),
}


def make(name: str) -> None:
    cls, family, opset, imitates, inputs, outputs = DETECTORS[name]
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    model = cls()
    he_init(model, seed)
    if name == "yolov8":  # the DFL's fixed weights: the expectation over the 16 distance bins
        model.dfl.weight.data[:] = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1)

    def data(s: int, n: int) -> np.ndarray:
        return text_lines(s, n) if name == "crnn" else images(s, n)
    settle_batchnorm(model, [(torch.from_numpy(data(seed + i, 16)),) for i in range(4)])
    out_axis = 1 if name == "crnn" else 0
    export(model, (torch.from_numpy(data(0, 2)),), name, opset=opset, dynamo=False, input_names=inputs,
           output_names=outputs, batch_axes={inputs[0]: 0, outputs[0]: out_axis})
    save_data(name, {inputs[0]: data(CALIB_SEED, SAMPLES)}, {inputs[0]: data(EVAL_SEED, SAMPLES)})
    write_record(name, family=family, imitates=imitates, exporter="torch.onnx TorchScript",
                 weights=f"random (seed {seed}, He init, BatchNorm statistics from 64 inputs)")


if __name__ == "__main__":
    for arg in sys.argv[1:] or DETECTORS:
        make(arg)
        print("wrote", arg)
