"""Grouped 1x1 convolutions computed as dense ones with a block-diagonal weight: the same parameters and checkpoints.

A grouped 1x1 convolution is a matrix product with a block-diagonal matrix. GPUs run dense 1x1
convolutions as large GEMMs, while grouped ones go to slower grouped kernels (cuDNN's weight
gradient for them especially), so for ShuffleNet-style students the dense form with zeros off the
diagonal blocks can be faster despite doing `groups` times the arithmetic. Whether it is faster is
measured, not assumed (benchmarks/gpu_profile.py); the mathematics is the same (tested in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BlockDiagonalPointwise(nn.Module):
    """A grouped 1x1 convolution (no bias, stride 1) run as a dense one; holds the grouped weight itself."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.groups = conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = conv.weight  # the same Parameter: optimiser state and checkpoint keys are unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.view(self.groups, self.out_channels // self.groups, -1).unbind(0)
        dense = torch.block_diag(*blocks)  # (out, in), zeros off the groups' blocks
        return F.conv2d(x, dense[:, :, None, None])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, groups={self.groups} (run dense)"


def is_grouped_pointwise(module: nn.Module) -> bool:
    """A 1x1, stride-1, unpadded, bias-free convolution with 1 < groups < channels (not depthwise)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding == (0, 0)
        and module.dilation == (1, 1)
        and module.bias is None
        and 1 < module.groups < module.in_channels
    )


def densify_grouped_pointwise(model: nn.Module) -> int:
    """Replace, in place, every grouped 1x1 convolution of `model` by its dense form; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_grouped_pointwise(child):
                setattr(parent, name, BlockDiagonalPointwise(child))
                replaced += 1
    return replaced
