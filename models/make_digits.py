"""Train the sample model: a small residual CNN on scikit-learn's 8x8 digits, exported to ONNX by PyTorch.

Writes, next to this script in ``digits/``:
  digits.onnx   the float model (input ``image`` [batch, 1, 8, 8] float32, output ``logits`` [batch, 10])
  calib.npz     128 training images, keyed by the input name, for calibration
  eval.npz      the 450 held-out test images
  labels.npy    their labels (int64), for accuracy

Needs torch, onnxscript and scikit-learn (``pip install torch onnxscript scikit-learn``); qdq itself does not.
Run: ``python models/make_digits.py``. Seeded, so a rerun gives the same data split (and, on the same
PyTorch build, the same weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

OUT = Path(__file__).resolve().parent / "digits"
SEED = 0


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class Block(nn.Module):
    """Two 3x3 convolutions with an identity skip connection (ResNet's basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(channels, channels), conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b(torch.relu(self.a(x))))


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 32), nn.ReLU())
        self.stage1 = Block(32)
        self.down = nn.Sequential(conv_bn(32, 64, stride=2), nn.ReLU())
        self.stage2 = Block(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def main() -> None:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int64)
    order = rng.permutation(len(images))
    train, test = order[:-450], order[-450:]

    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x_train, y_train = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    for _epoch in range(40):
        model.train()
        for batch in torch.randperm(len(train)).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(images[test])).argmax(1).numpy() == labels[test]).mean()
    print(f"float test accuracy: {accuracy:.4f}")

    OUT.mkdir(exist_ok=True)
    torch.onnx.export(
        model,
        (torch.from_numpy(images[:1]),),
        str(OUT / "digits.onnx"),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        dynamo=True,
        external_data=False,
    )
    np.savez(OUT / "calib.npz", image=images[train[:128]])
    np.savez(OUT / "eval.npz", image=images[test])
    np.save(OUT / "labels.npy", labels[test])


if __name__ == "__main__":
    main()
