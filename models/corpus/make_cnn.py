"""Corpus classifiers: torchvision-style CNNs written out by hand at small widths, random-seeded, exported by both
torch exporters at several opsets.

Each architecture keeps the export pattern of its torchvision namesake (the ops and how they connect), not its
size: ResNet (BasicBlock, residual Add), MobileNetV2 (inverted residual, ReLU6 as Clip), MobileNetV3 (HardSwish,
HardSigmoid, squeeze-excite), EfficientNet (SiLU, depthwise, squeeze-excite), ConvNeXt (depthwise 7x7,
LayerNorm, GELU, layer scale), RegNet (grouped convolutions, squeeze-excite), ShuffleNetV2 (channel split and
shuffle), DenseNet (dense Concat). Inputs are 3x64x64 images with a dynamic batch axis.

Run: ``/work/venv-models/bin/python models/corpus/make_cnn.py [NAME ...]``. Seeded.
"""

from __future__ import annotations

import sys

import torch
from corpus_io import CALIB_SEED, EVAL_SEED, SAMPLES, export, he_init, images, save_data, settle_batchnorm, write_record
from torch import nn
from torch.nn import functional as F  # noqa: N812


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
        ) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.a, self.b = cbr(cin, cout, 3, stride), cbr(cout, cout, 3, 1, act=None)
        self.down = cbr(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.b(self.a(x)) + self.down(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
                                    BasicBlock(64, 64, 1))
        self.fc = nn.Linear(64, 100)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int, act=nn.ReLU, gate=nn.Sigmoid) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 and EfficientNet's MBConv: expand 1x1, depthwise, (squeeze-excite), project 1x1."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act, se: nn.Module | None = None,
                 k: int = 3) -> None:
        super().__init__()
        mid = cin * expand
        self.use_skip = stride == 1 and cin == cout
        self.body = nn.Sequential(cbr(cin, mid, 1, act=act), cbr(mid, mid, k, stride, groups=mid, act=act),
                                  se or nn.Identity(), cbr(mid, cout, 1, act=None))

    def forward(self, x):
        return x + self.body(x) if self.use_skip else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        a = nn.ReLU6
        self.features = nn.Sequential(cbr(3, 16, 3, 2, act=a), InvertedResidual(16, 16, 1, 1, a),
                                      InvertedResidual(16, 24, 2, 4, a), InvertedResidual(24, 24, 1, 4, a),
                                      InvertedResidual(24, 32, 2, 4, a), InvertedResidual(32, 32, 1, 4, a),
                                      cbr(32, 128, 1, act=a))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 100))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU

        def se(c):
            return SqueezeExcite(c, max(8, c // 4), gate=nn.Hardsigmoid)
        self.features = nn.Sequential(
            cbr(3, 16, 3, 2, act=hs), InvertedResidual(16, 16, 2, 1, re, se(16)),
            InvertedResidual(16, 24, 2, 4, re), InvertedResidual(24, 24, 1, 3, re),
            InvertedResidual(24, 40, 2, 3, hs, se(72), k=5), InvertedResidual(40, 40, 1, 3, hs, se(120), k=5),
            cbr(40, 160, 1, act=hs))
        self.classifier = nn.Sequential(nn.Linear(160, 256), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(256, 100))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        s = nn.SiLU

        def se(c, cin):
            return SqueezeExcite(c, max(4, cin // 4), act=s)
        self.features = nn.Sequential(
            cbr(3, 16, 3, 2, act=s), InvertedResidual(16, 16, 1, 1, s, se(16, 16)),
            InvertedResidual(16, 24, 2, 6, s, se(96, 16)), InvertedResidual(24, 24, 1, 6, s, se(144, 24)),
            InvertedResidual(24, 40, 2, 6, s, se(144, 24), k=5), InvertedResidual(40, 40, 1, 6, s, se(240, 40), k=5),
            cbr(40, 192, 1, act=s))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(192, 100))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm over channels: permute to channels-last and back."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pw2(F.gelu(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, 4), LayerNorm2d(32, eps=1e-6))
        self.stage1 = nn.Sequential(CNBlock(32), CNBlock(32))
        self.down = nn.Sequential(LayerNorm2d(32, eps=1e-6), nn.Conv2d(32, 64, 2, 2))
        self.stage2 = nn.Sequential(CNBlock(64), CNBlock(64))
        self.head_norm, self.head = nn.LayerNorm(64, eps=1e-6), nn.Linear(64, 100)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.head_norm(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class RegNetBlock(nn.Module):
    """RegNetY's bottleneck: 1x1, grouped 3x3 (group width 8), squeeze-excite, 1x1, residual."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(cin, cout, 1), cbr(cout, cout, 3, stride, groups=cout // 8),
                                  SqueezeExcite(cout, cin // 4), cbr(cout, cout, 1, act=None))
        self.down = cbr(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.down(x))


class RegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.trunk = nn.Sequential(RegNetBlock(16, 24, 2), RegNetBlock(24, 56, 2), RegNetBlock(56, 56, 1),
                                   RegNetBlock(56, 152, 2))
        self.fc = nn.Linear(152, 100)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.trunk(self.stem(x)), 1), 1))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(cbr(cin, cin, 3, stride, groups=cin, act=None), cbr(cin, half, 1))
        self.branch2 = nn.Sequential(cbr(cin if stride > 1 else half, half, 1),
                                     cbr(half, half, 3, stride, groups=half, act=None), cbr(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1), ShuffleUnit(48, 96, 2),
                                    ShuffleUnit(96, 96, 1))
        self.conv5, self.fc = cbr(96, 256, 1), nn.Linear(256, 100)

    def forward(self, x):
        return self.fc(self.conv5(self.stages(self.stem(x))).mean([2, 3]))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, 1, 1,
                                                                                   bias=False))

    def forward(self, features):
        return self.body(torch.cat(features, 1))


class DenseBlock(nn.Module):
    def __init__(self, cin: int, layers: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = 16
        self.stem = nn.Sequential(cbr(3, 32, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.block1 = DenseBlock(32, 3, g)
        self.trans = nn.Sequential(nn.BatchNorm2d(80), nn.ReLU(), nn.Conv2d(80, 40, 1, bias=False),
                                   nn.AvgPool2d(2, 2))
        self.block2 = DenseBlock(40, 3, g)
        self.norm, self.fc = nn.BatchNorm2d(88), nn.Linear(88, 100)

    def forward(self, x):
        x = F.relu(self.norm(self.block2(self.trans(self.block1(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# name: (module, torch exporter is dynamo, opset, what it imitates)
CLASSIFIERS = {
    "resnet": (ResNet, False, 13, "torchvision ResNet-18 (BasicBlock, residual Add, MaxPool, Gemm head)"),
    "mobilenet_v2": (MobileNetV2, False, 11, "torchvision MobileNetV2 (inverted residual, ReLU6 as Clip)"),
    "mobilenet_v3": (MobileNetV3, True, 18,
                     "torchvision MobileNetV3-Large (HardSwish, HardSigmoid, squeeze-excite, 5x5 depthwise)"),
    "efficientnet": (EfficientNet, False, 17, "torchvision EfficientNet-B0 (MBConv, SiLU, depthwise, squeeze-excite)"),
    "convnext": (ConvNeXt, True, 27,
                 "torchvision ConvNeXt-T (patchify stem, depthwise 7x7, LayerNorm, GELU, layer scale)"),
    "regnet": (RegNet, True, 18, "torchvision RegNetY-400MF (grouped 3x3, squeeze-excite, residual)"),
    "shufflenet": (ShuffleNetV2, False, 11, "torchvision ShuffleNetV2 (channel split, Concat, channel shuffle)"),
    "densenet": (DenseNet, False, 13, "torchvision DenseNet-121 (pre-activation BN-ReLU-Conv, dense Concat)"),
}


def make(name: str) -> None:
    cls, dynamo, opset, imitates = CLASSIFIERS[name]
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    model = cls()
    he_init(model, seed)
    settle_batchnorm(model, [(torch.from_numpy(images(seed + i, 16)),) for i in range(4)])
    export(model, (torch.from_numpy(images(0, 2)),), name, opset=opset, dynamo=dynamo, input_names=["image"],
           output_names=["logits"], batch_axes={"image": 0, "logits": 0})
    save_data(name, {"image": images(CALIB_SEED, SAMPLES)}, {"image": images(EVAL_SEED, SAMPLES)})
    write_record(name, family="classifier", imitates=imitates,
                 exporter="torch.onnx dynamo" if dynamo else "torch.onnx TorchScript",
                 weights=f"random (seed {seed}, He init, BatchNorm statistics from 64 images)")


if __name__ == "__main__":
    for arg in sys.argv[1:] or CLASSIFIERS:
        make(arg)
        print("wrote", arg)
