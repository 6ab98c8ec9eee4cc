"""ImageNet-style backbones for 224x224 inputs, layer for layer as torchvision defines them (same
layers, shapes and parameter counts: tests/models/test_registry.py checks the counts), without
torchvision: latency studies at 224x224 need the architectures, not torchvision's weights or
operators. ``width`` scales every channel count (rounded as each architecture rounds).

- ``imagenet_resnet18`` / ``imagenet_resnet50``: He et al. 2016, 7x7 stride-2 stem + max-pool;
  ResNet-50 with the stride on the 3x3 convolution (torchvision's "v1.5").
- ``imagenet_mobilenet_v2``: Sandler et al. 2018, inverted residuals with depthwise 3x3 convs, ReLU6.
"""

from __future__ import annotations

import torch
from torch import nn

from pqd.models.registry import register_model, scaled_channels


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.relu3(self.bn3(self.conv3(out)) + self.downsample(x))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ImageNetResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: tuple[int, ...], num_classes: int, width: float):
        super().__init__()
        planes = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], planes[0]
        for i, (n, p) in enumerate(zip(blocks, planes, strict=True)):
            stage: list[nn.Module] = []
            for j in range(n):
                stage.append(block(cin, p, 2 if (j == 0 and i > 0) else 1))
                cin = p * block.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never below 90% of ``v``."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _cbr6(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [_cbr6(cin, hidden, 1)] if expand != 1 else []
        layers += [_cbr6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False)]
        layers.append(nn.BatchNorm2d(cout))
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion t, channels c, repeats n, stride s) of MobileNetV2's bottleneck stages
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width: float, dropout: float = 0.2):
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [_cbr6(3, cin, 3, 2)]
        for t, c, n, s in MOBILENET_V2_SETTINGS:
            cout = _divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_cbr6(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model
def imagenet_resnet18(*, num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    """torchvision's ResNet-18 (11.7 M parameters at 1000 classes), for 224x224 inputs."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes, width)


@register_model
def imagenet_resnet50(*, num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    """torchvision's ResNet-50 v1.5 (25.6 M parameters at 1000 classes), for 224x224 inputs."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes, width)


@register_model
def imagenet_mobilenet_v2(*, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision's MobileNetV2 (3.5 M parameters at 1000 classes), for 224x224 inputs."""
    return MobileNetV2(num_classes, width, dropout)
