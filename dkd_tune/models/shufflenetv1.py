"""ShuffleNetV1 for CIFAR as in the CRD/mdistiller code base (registered as "ShuffleV1"; 3 groups).

A 1x1 stem to 24 channels, three stages of (4, 8, 4) grouped bottlenecks ending at 240, 480
and 960 channels; each stage opens with a stride-2 block whose output is concatenated with an
average-pooled shortcut. Parameter names follow the reference: conv1, bn1,
layerK.i.{conv1..3, bn1..3}, linear.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dkd_tune.models.classifier import ImageClassifier, global_average_pool


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups: (N, g*c, H, W) -> view (N, g, c) -> (N, c, g) -> flat."""
    n, channels, height, width = x.shape
    x = x.reshape(n, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(n, channels, height, width)


class ShuffleBottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_channels = out_channels // 4
        # The stem has only 24 channels: the first 1x1 convolution after it is not grouped.
        self.first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(
            mid_channels, mid_channels, 3, stride=stride, padding=1, groups=mid_channels, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            shortcut = F.avg_pool2d(x, 3, stride=2, padding=1)
            return F.relu(torch.cat([out, shortcut], 1))
        return F.relu(out + x)


class ShuffleNetV1(ImageClassifier):
    def __init__(
        self,
        stage_channels: tuple[int, int, int] = (240, 480, 960),
        blocks_per_stage: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        stages = []
        for channels, count in zip(stage_channels, blocks_per_stage, strict=True):
            blocks = []
            for position in range(count):
                # The stride-2 block concatenates its input, so it produces only the missing channels.
                if position == 0:
                    blocks.append(ShuffleBottleneck(in_channels, channels - in_channels, 2, groups))
                else:
                    blocks.append(ShuffleBottleneck(channels, channels, 1, groups))
            in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_average_pool(x)

    def get_classifier(self) -> nn.Linear:
        return self.linear


def shufflenet_v1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)
