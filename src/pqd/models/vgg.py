"""VGG-16 with batch norm (Simonyan & Zisserman 2015), CIFAR variant: one linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from pqd.models.registry import register_model, scaled_channels

_CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg, num_classes: int, width: float, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = scaled_channels(v, width)
                layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def vgg16_bn(*, num_classes: int = 10, width: float = 1.0, in_chans: int = 3) -> nn.Module:
    """VGG-16-BN for 32x32 inputs: 14.7 M parameters at width 1.0."""
    return VGG(_CFG16, num_classes, width, in_chans)
