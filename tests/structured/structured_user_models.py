"""Small user models for the structured tests (beyond tests/robustness/pqd_user_models.py)."""

from __future__ import annotations

import torch
from torch import nn


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class SENet(nn.Module):
    """Inverted residual blocks (expand 1x1, depthwise 3x3, SE, project 1x1) with residual adds."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks = []
        for _ in range(2):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(16, 48, 1, bias=False),
                    nn.BatchNorm2d(48),
                    nn.ReLU(),
                    nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False),
                    nn.BatchNorm2d(48),
                    nn.ReLU(),
                    SE(48),
                    nn.Conv2d(48, 16, 1, bias=False),
                    nn.BatchNorm2d(16),
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.fc(self.head(x).mean((2, 3)))


class Plain(nn.Module):
    """Few wide convs at full resolution: latency dominated by compute, cheap to convert."""

    def __init__(self, num_classes: int = 10, c: int = 64):
        super().__init__()
        layers, cin = [], 3
        for _ in range(3):
            layers += [nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style: depthwise conv, pointwise MLP and a per-channel layer-scale ``gamma`` (a bare parameter)."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw1, self.pw2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        return x + self.gamma.view(1, -1, 1, 1) * self.pw2(torch.relu(self.pw1(self.bn(self.dw(x)))))


class LayerScaleNet(nn.Module):
    """A stem, two layer-scale blocks and a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(LayerScaleBlock(16), LayerScaleBlock(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def layer_scale(num_classes: int = 10) -> nn.Module:
    return LayerScaleNet(num_classes)
