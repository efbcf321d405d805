"""ResNet18 and ResNet50 for CIFAR (the CRD/mdistiller `resnetv2`): ImageNet's four stages behind a 3x3 stem.

Unlike torchvision's ImageNet ResNet, the stem is one stride-1 3x3 convolution without max
pooling, so a 32x32 image keeps full resolution in the first stage. Parameter names follow the
reference (conv1, bn1, layerK.i.{conv1..3, bn1..3, shortcut.0, shortcut.1}, linear).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dkd_tune.models.classifier import ImageClassifier, global_average_pool, init_reference_weights


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """The shortcut: identity (an empty Sequential, no parameters) unless the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = _projection(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetLarge(ImageClassifier):
    def __init__(
        self, block: type[BasicBlock | Bottleneck], blocks_per_stage: tuple[int, ...], num_classes: int = 100
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        stages = []
        for index, (channels, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage, strict=True)):
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(in_channels, channels, stride))
                in_channels = channels * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels

        init_reference_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return global_average_pool(x)

    def get_classifier(self) -> nn.Linear:
        return self.linear


def resnet18(num_classes: int = 100) -> CifarResNetLarge:
    return CifarResNetLarge(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 100) -> CifarResNetLarge:
    return CifarResNetLarge(Bottleneck, (3, 4, 6, 3), num_classes)
