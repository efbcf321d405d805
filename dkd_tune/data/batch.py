"""The batch every loader yields: normalised images, labels, dataset indices and (where bounded) view ids."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """One training or evaluation batch, all tensors on the training device.

    `images` are normalised (B, C, H, W) in the requested dtype and memory format; `indices` are
    the samples' dataset indices; `view_ids` name each sample's augmentation (see
    `dkd_tune.data.views`) and are None where views are unbounded (AutoAugment, ImageNet) or absent
    (evaluation).
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    view_ids: torch.Tensor | None
