"""A plain convolutional student of about 25k parameters: the CPU benchmark's CNN, cheap enough for a beta grid on 2 cores."""

from __future__ import annotations

import torch
from torch import nn

from dkd_tune.models.classifier import ImageClassifier, global_average_pool, init_reference_weights


def _conv_bn_relu(in_channels: int, channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(ImageClassifier):
    """Five 3x3 convolutions in three stages (width w, 2w, 4w; the last two stages start with stride 2),
    global pooling and a linear head `fc`.

    The student of the all-CNN auto-beta family (`search_spaces/validate_cnn.yaml`): a convolutional
    network like its teachers (so the non-target knowledge of a CNN teacher is something it can mimic,
    unlike a pooled-pixel MLP), far smaller than any of them, and a step of a few milliseconds.
    """

    def __init__(self, num_classes: int = 100, width: int = 8):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            _conv_bn_relu(3, w1, 1),
            _conv_bn_relu(w1, w2, 2),
            _conv_bn_relu(w2, w2, 1),
            _conv_bn_relu(w2, w3, 2),
            _conv_bn_relu(w3, w3, 1),
        )
        self.fc = nn.Linear(w3, num_classes)
        self.num_features = w3
        init_reference_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return global_average_pool(self.features(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc


def cnn_8(num_classes: int = 100) -> SmallCNN:
    return SmallCNN(num_classes, width=8)
