"""MobileNetV2 for CIFAR at width 0.5 (CRD/mdistiller's `mobile_half`, registered as "MobileNetV2").

A stride-2 3x3 stem, seven stages of inverted residual blocks (expansion 6, channels halved
from the ImageNet design: 8, 12, 16, 32, 48, 80, 160), a 1x1 convolution to 1280 channels,
global pooling and `classifier.0`. Every block, even the expansion-1 one, keeps its 1x1
expansion convolution, as in the reference. Parameter names follow the reference:
conv1.{0,1}, blocks.S.i.conv.{0,1,3,4,6,7}, conv2.{0,1}, classifier.0.
"""

from __future__ import annotations

import torch
from torch import nn

from dkd_tune.models.classifier import ImageClassifier, global_average_pool, init_reference_weights

# (expansion, output channels at width 1, blocks, stride of the first block) per stage.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LAST_CHANNELS = 1280


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(ImageClassifier):
    def __init__(self, width: float = 0.5, num_classes: int = 100):
        super().__init__()
        in_channels = int(32 * width)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, 2)
        self.blocks = nn.ModuleList()
        for expansion, channels, count, stride in STAGES:
            out_channels = int(channels * width)
            stage = []
            for position in range(count):
                stage.append(
                    InvertedResidual(in_channels, out_channels, stride if position == 0 else 1, expansion)
                )
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*stage))
        last_channels = int(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        self.num_features = last_channels

        init_reference_weights(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return global_average_pool(self.conv2(x))

    def get_classifier(self) -> nn.Linear:
        return self.classifier[0]


def mobilenetv2_half(num_classes: int = 100) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(0.5, num_classes)
