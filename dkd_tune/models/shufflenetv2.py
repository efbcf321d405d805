"""ShuffleNetV2 (1x) for CIFAR as in the CRD/mdistiller code base (registered as "ShuffleV2").

A 1x1 stem to 24 channels, three stages (116, 232, 464 channels; 3, 7, 3 basic units after a
stride-2 down-sampling unit), a 1x1 convolution to 1024 channels, global pooling and `linear`.
Parameter names follow the reference: conv1, bn1, layerK.0.{conv1..5, bn1..5} (down-sampling
unit), layerK.i.{conv1..3, bn1..3} (basic units), conv2, bn2, linear.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dkd_tune.models.classifier import ImageClassifier, global_average_pool
from dkd_tune.models.shufflenetv1 import channel_shuffle


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)


def _pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class BasicUnit(nn.Module):
    """Half the channels pass through untouched; the other half go through 1x1, depthwise 3x3, 1x1."""

    def __init__(self, channels: int):
        super().__init__()
        self.split = channels // 2
        branch = channels - self.split
        self.conv1 = _pointwise(branch, branch)
        self.bn1 = nn.BatchNorm2d(branch)
        self.conv2 = _depthwise(branch, 1)
        self.bn2 = nn.BatchNorm2d(branch)
        self.conv3 = _pointwise(branch, branch)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class DownUnit(nn.Module):
    """Two stride-2 branches on the whole input, each giving half of the output channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.conv1 = _depthwise(in_channels, 2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = _pointwise(in_channels, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _pointwise(in_channels, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.conv4 = _depthwise(half, 2)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = _pointwise(half, half)
        self.bn5 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(ImageClassifier):
    def __init__(
        self,
        stage_channels: tuple[int, int, int] = (116, 232, 464),
        units_per_stage: tuple[int, int, int] = (3, 7, 3),
        last_channels: int = 1024,
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        stages = []
        for channels, count in zip(stage_channels, units_per_stage, strict=True):
            stages.append(
                nn.Sequential(DownUnit(in_channels, channels), *(BasicUnit(channels) for _ in range(count)))
            )
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _pointwise(in_channels, last_channels)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.linear = nn.Linear(last_channels, num_classes)
        self.num_features = last_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_average_pool(F.relu(self.bn2(self.conv2(x))))

    def get_classifier(self) -> nn.Linear:
        return self.linear


def shufflenet_v2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
