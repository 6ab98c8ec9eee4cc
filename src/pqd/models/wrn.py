"""Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation blocks, CIFAR variant."""

from __future__ import annotations

import torch
from torch import nn

from pqd.models.registry import register_model, scaled_channels


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(self.relu2(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, width: float, dropout: float, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        chans = [scaled_channels(c, width) for c in (16, 16 * widen, 32 * widen, 64 * widen)]
        self.conv1 = nn.Conv2d(in_chans, chans[0], 3, 1, 1, bias=False)
        blocks, cin = [], chans[0]
        for i, cout in enumerate(chans[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, cout, 2 if (j == 0 and i > 0) else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def wrn_28_10(*, num_classes: int = 10, width: float = 1.0, dropout: float = 0.0, in_chans: int = 3) -> nn.Module:
    """WRN-28-10: 36.5 M parameters at width 1.0."""
    return WideResNet(28, 10, num_classes, width, dropout, in_chans)
