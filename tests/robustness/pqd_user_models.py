"""User architectures beyond pqd's built-in three, given to pqd by import path
``pqd_user_models:<factory>`` (this folder is put on ``sys.path`` by the tests).

Each factory takes ``num_classes`` like a registry model. They are small on purpose:
the robustness tests run whole pipelines on them in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


class MobileNetish(nn.Module):
    """Depthwise-separable convs (MobileNet-v1 style) with ReLU6."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, 16, stride=2, act=nn.ReLU6)
        blocks = []
        for cin, cout, stride in ((16, 24, 1), (24, 32, 2), (32, 32, 1)):
            blocks += [_cbr(cin, cin, stride=stride, groups=cin, act=nn.ReLU6), _cbr(cin, cout, k=1, act=nn.ReLU6)]
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.conv = _cbr(cin, growth)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], 1)  # concatenation skip


class DenseNetish(nn.Module):
    """DenseNet-style blocks: every layer's input is the concatenation of all earlier outputs."""

    def __init__(self, num_classes: int = 10, growth: int = 8):
        super().__init__()
        self.stem = _cbr(3, 16, stride=2)
        layers, c = [], 16
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.dense = nn.Sequential(*layers)
        self.transition = nn.Sequential(nn.Conv2d(c, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(), nn.AvgPool2d(2))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.transition(self.dense(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class Functional(nn.Module):
    """Activations written as functions and methods: F.relu, F.hardswish, x.relu(), plus a residual add."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + F.hardswish(self.b2(self.c2(x))))
        x = self.b3(self.c3(x)).relu()
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Gate(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace this."""

    def forward(self, x):
        if x.mean() > 0:
            return x * 2
        return x


class Untraceable(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 16, stride=2), _cbr(16, 32, stride=2))
        self.gate = Gate()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.gate(self.features(x)).mean((2, 3)))


class FloatLayers(nn.Module):
    """Layers the x86 FX quantizer leaves in float: nn.GELU and F.silu (LayerNorm is quantized)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 16, stride=2), _cbr(16, 32, stride=2))
        self.norm = nn.LayerNorm(32)
        self.act = nn.GELU()
        self.hidden = nn.Linear(32, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.act(self.norm(self.features(x).mean((2, 3))))
        return self.fc(F.silu(self.hidden(x)))


def mobilenet(num_classes: int = 10) -> nn.Module:
    return MobileNetish(num_classes)


def densenet(num_classes: int = 10) -> nn.Module:
    return DenseNetish(num_classes)


def functional(num_classes: int = 10) -> nn.Module:
    return Functional(num_classes)


def untraceable(num_classes: int = 10) -> nn.Module:
    return Untraceable(num_classes)


def float_layers(num_classes: int = 10) -> nn.Module:
    return FloatLayers(num_classes)


def not_a_module(num_classes: int = 10):
    return "a string"


def broken(num_classes: int = 10) -> nn.Module:
    raise RuntimeError("the user's factory failed")


def fixed_1000_classes(num_classes: int = 10) -> nn.Module:
    """Ignores ``num_classes`` (an ImageNet head): cross-entropy would fail deep inside training."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000))
