"""Train three more small models on scikit-learn's 8x8 digits for measuring quantization accuracy.

Random weights hide what weight rounding and activation clipping cost, so these are trained (a few minutes on
a CPU in total). Each model NAME is written next to this script in ``NAME/``, laid out as ``models/digits``:
  NAME.onnx     the float model (input ``image`` [batch, 1, 8, 8] float32, output ``logits`` [batch, 10])
  calib.npz     128 training images, keyed by the input name, for calibration
  eval.npz      the 450 held-out test images
  labels.npy    their labels (int64), for accuracy

The models:
  dwsep        MobileNet-style depthwise-separable CNN: BatchNorm after every conv, ReLU6 blocks and plain
               ReLU blocks, an inverted-residual block with a linear (identity) bottleneck.
  transformer  the image's 8 rows as a sequence of 8 tokens: pre-LayerNorm encoder blocks with softmax
               attention (written out as MatMul/Softmax, as BERT exports are) and a GELU MLP.
  lstm         an LSTM over the 8 rows, unrolled into Gemm/MatMul + Sigmoid/Tanh (as exporters that unroll
               recurrences write it), so its gate matrices are quantizable layers.

The data split is the one ``models/make_digits.py`` uses (same seed, same permutation, same 128 calibration
images), so every sample model is calibrated and evaluated on the same images.

Needs torch, onnxscript and scikit-learn; qdq does not. Run: ``python models/trained/make_trained.py [NAME...]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

OUT = Path(__file__).resolve().parent
SEED = 0


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images in [0, 1] as [N, 1, 8, 8], labels, and the train/test indices of models/make_digits.py."""
    rng = np.random.default_rng(SEED)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = rng.permutation(len(images))
    return images, labels, order[:-450], order[-450:]


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class DepthwiseSeparable(nn.Module):
    """MobileNetV1/V2-style: ReLU6 in the stem and first blocks, plain ReLU later, one linear bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16, 3), nn.ReLU6(),
            *conv_bn(16, 16, 3, groups=16), nn.ReLU6(),          # depthwise
            *conv_bn(16, 32, 1), nn.ReLU6(),                     # pointwise
            *conv_bn(32, 32, 3, stride=2, groups=32), nn.ReLU(),
            *conv_bn(32, 64, 1), nn.ReLU(),
            *conv_bn(64, 64, 3, groups=64), nn.ReLU(),
            *conv_bn(64, 32, 1),                                 # linear bottleneck: identity into the next conv
            *conv_bn(32, 96, 1), nn.ReLU6(),
            *conv_bn(96, 96, 3, groups=96), nn.ReLU6(),
            *conv_bn(96, 64, 1), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.split(self.query(h)), self.split(self.key(h)), self.split(self.value(h))
        attention = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(mixed)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class RowTransformer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(torch.randn(1, 8, dim) * 0.1)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(-1, 8, 8)) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


class RowLSTM(nn.Module):
    """One LSTM layer over the rows, unrolled; the gates are one input and one recurrent matrix."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.hidden = hidden
        self.input_gates = nn.Linear(8, 4 * hidden)
        self.recurrent_gates = nn.Linear(hidden, 4 * hidden, bias=False)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, 8, 8)
        h = rows.new_zeros(rows.shape[0], self.hidden)
        c = rows.new_zeros(rows.shape[0], self.hidden)
        for t in range(8):
            i, f, g, o = (self.input_gates(rows[:, t]) + self.recurrent_gates(h)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(h)


MODELS = {"dwsep": (DepthwiseSeparable, 60, 3e-3), "transformer": (RowTransformer, 80, 2e-3),
          "lstm": (RowLSTM, 80, 3e-3)}


def train(name: str) -> None:
    make, epochs, lr = MODELS[name]
    torch.manual_seed(SEED)
    images, labels, train_idx, test_idx = digits_split()
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    x_train, y_train = torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])
    started = time.perf_counter()
    for _epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(train_idx)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(images[test_idx])).argmax(1).numpy() == labels[test_idx]).mean()
    print(f"{name}: float test accuracy {accuracy:.4f} after {time.perf_counter() - started:.0f} s")

    out = OUT / name
    out.mkdir(exist_ok=True)
    torch.onnx.export(model, (torch.from_numpy(images[:1]),), str(out / f"{name}.onnx"), input_names=["image"],
                      output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                      dynamo=True, external_data=False)
    np.savez(out / "calib.npz", image=images[train_idx[:128]])
    np.savez(out / "eval.npz", image=images[test_idx])
    np.save(out / "labels.npy", labels[test_idx])


if __name__ == "__main__":
    for model_name in sys.argv[1:] or list(MODELS):
        train(model_name)
