"""The negative control's teacher: each image's non-target logits permuted, so only what NCKD transfers is destroyed."""

from __future__ import annotations

from typing import Any

import torch


class PermutedNonTarget:
    """A teacher whose non-target logits are shuffled: the negative control of the beta validation.

    Each training image gets its own random order of the non-target classes, the same in every
    epoch and every augmented view, so the student sees consistent but meaningless non-target
    knowledge. The target logit and the largest non-target logit keep their values, so the
    teacher's accuracy and its logit gap z_t - max z_i are those of the real teacher: only what
    NCKD transfers changes.
    """

    def __init__(self, source: Any, seed: int = 0):
        self.source = source
        self.seed = seed

    def logits_for(self, batch: Any) -> torch.Tensor:
        return permute_non_target(self.source.logits_for(batch), batch.labels, batch.indices, self.seed)


def permute_non_target(
    logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """`logits` with each row's non-target entries moved to positions drawn from (index, seed) alone."""
    rows, classes = logits.shape
    device = logits.device
    labels = labels.to(device).long()
    last = torch.full((rows, 1), 1 << 40, dtype=torch.int64, device=device)
    class_ids = torch.arange(classes, device=device, dtype=torch.int64)
    # Where the values go: the classes in an order hashed from (image, class); the target sorted last.
    keys = _hash32(indices.to(device).long()[:, None] * classes + class_ids[None, :], seed)
    destinations = keys.scatter(1, labels[:, None], last).argsort(dim=1)
    # Where they come from: the non-target classes in their own order, the target last.
    ordered = class_ids.expand(rows, classes).scatter(1, labels[:, None], last).argsort(dim=1)
    return torch.empty_like(logits).scatter_(1, destinations, logits.gather(1, ordered))


def _hash32(values: torch.Tensor, seed: int) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser applied twice, in int64 arithmetic that never overflows."""
    mask = 0xFFFFFFFF
    h = (values ^ (seed * 0x9E3779B9)) & mask
    for _ in range(2):
        h = h ^ (h >> 16)
        h = _mul32(h, 0x85EBCA6B)
        h = h ^ (h >> 13)
        h = _mul32(h, 0xC2B2AE35)
        h = h ^ (h >> 16)
    return h


def _mul32(h: torch.Tensor, factor: int) -> torch.Tensor:
    """(h * factor) mod 2**32 for 32-bit h, split in 16-bit halves so no product passes 2**63."""
    low, high = factor & 0xFFFF, factor >> 16
    return (h * low + (((h * high) & 0xFFFF) << 16)) & 0xFFFFFFFF
