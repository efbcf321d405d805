"""VGG with batch norm for CIFAR as in the CRD/mdistiller code base: vgg8, vgg11, vgg13, vgg16, vgg19.

Five blocks of 3x3 conv + batch norm (+ ReLU), with 2x2 max pooling between the first four
(the last pooling only on 64x64 inputs, as the reference does for Tiny-ImageNet), then global
average pooling and one linear layer `classifier` on 512 features. Parameter names follow the
reference: blockB.{3j, 3j+1} for the j-th conv and batch norm in block B, classifier.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dkd_tune.models.classifier import ImageClassifier, global_average_pool, init_reference_weights

# Output channels of each convolution, block by block (the reference's configurations S, A, B, D, E).
CONFIGURATIONS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

# The reference pools before the last block only when the input is this tall (Tiny-ImageNet).
POOL_BEFORE_LAST_BLOCK_AT = 64


def _block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv, bn, relu, conv, bn, relu, ..., conv, bn: the trailing ReLU is applied by the caller."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(ImageClassifier):
    def __init__(self, configuration: tuple[tuple[int, ...], ...], num_classes: int = 100):
        super().__init__()
        in_channels = 3
        blocks = []
        for widths in configuration:
            blocks.append(_block(in_channels, widths))
            in_channels = widths[-1]
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.classifier = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels

        init_reference_weights(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pool_before_last = x.shape[-2] == POOL_BEFORE_LAST_BLOCK_AT
        for block in (self.block0, self.block1, self.block2):
            x = F.max_pool2d(F.relu(block(x)), 2)
        x = F.relu(self.block3(x))
        if pool_before_last:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return global_average_pool(x)

    def get_classifier(self) -> nn.Linear:
        return self.classifier


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(CONFIGURATIONS["vgg8"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(CONFIGURATIONS["vgg11"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(CONFIGURATIONS["vgg13"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(CONFIGURATIONS["vgg16"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(CONFIGURATIONS["vgg19"], num_classes)
