"""Wide ResNets for CIFAR as in the CRD/mdistiller code base: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

WRN-d-k: (d-4)/6 pre-activation blocks per stage, stage widths (16k, 32k, 64k) after a 16-channel
stem, then batch norm, ReLU, global pooling and `fc`. Parameter names follow the reference:
conv1, blockS.layer.i.{bn1, conv1, bn2, conv2, convShortcut}, bn1, fc.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dkd_tune.models.classifier import ImageClassifier, global_average_pool, init_reference_weights


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.convShortcut = None  # the reference's name, kept so its checkpoints load
        if in_channels != out_channels or stride != 1:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        # A projecting block takes its shortcut from the activated input, an identity block from the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return shortcut + out


class Stage(nn.Module):
    """A stage; its one attribute `layer` exists because the reference nests blocks under that name."""

    def __init__(self, count: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                PreActBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
                for i in range(count)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(ImageClassifier):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has 6n+4 layers, not {depth}")
        count = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block1 = Stage(count, 16, widths[0], 1)
        self.block2 = Stage(count, widths[0], widths[1], 2)
        self.block3 = Stage(count, widths[1], widths[2], 2)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)
        self.num_features = widths[2]

        init_reference_weights(self, zero_linear_bias=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return global_average_pool(F.relu(self.bn1(x)))

    def get_classifier(self) -> nn.Linear:
        return self.fc


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
