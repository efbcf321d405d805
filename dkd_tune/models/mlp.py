"""Multi-layer perceptrons on pooled pixels: students far cheaper than any convolutional network, for CPU benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from dkd_tune.models.classifier import ImageClassifier

POOLED_SIZE = 16  # images are average-pooled to 16x16 first, so one model takes any input size


class MLP(ImageClassifier):
    """Average-pool to 16x16, flatten, `depth` hidden ReLU layers of `width` units, a linear head.

    A fully connected network sees where things are but shares nothing across positions, so on
    images it needs more data than a convolutional one: the weak, fast student of the CPU auto-beta
    benchmark (`search_spaces/validate_synthetic.yaml`), where a step costs a fraction of a millisecond.
    """

    def __init__(self, num_classes: int = 100, width: int = 256, depth: int = 1, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(POOLED_SIZE), nn.Flatten()]
        features = in_channels * POOLED_SIZE * POOLED_SIZE
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            features = width
        self.features = nn.Sequential(*layers)
        self.num_features = features
        self.fc = nn.Linear(features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc


def mlp_32(num_classes: int = 100) -> MLP:
    return MLP(num_classes, width=32, depth=1)


def mlp_256(num_classes: int = 100) -> MLP:
    return MLP(num_classes, width=256, depth=1)


def mlp_512x2(num_classes: int = 100) -> MLP:
    return MLP(num_classes, width=512, depth=2)
