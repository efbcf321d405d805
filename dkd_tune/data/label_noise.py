"""Symmetric label noise (paper A.4): each training label is replaced, with probability r, by another class."""

from __future__ import annotations

import torch

from dkd_tune.data.seeding import derived_generator


def symmetric_label_noise(
    labels: torch.Tensor, rate: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, float]:
    """Return (noisy labels, realised rate), deterministic for `seed`.

    As in Co-teaching's symmetric noise (the paper's reference), every label independently moves
    with probability `rate` to a class drawn uniformly from the other `num_classes - 1`, so a moved
    label never equals the clean one and the realised rate is close to, not exactly, `rate`.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate must be in [0, 1), got {rate}")
    labels = labels.to(torch.int64)
    if rate == 0.0 or labels.numel() == 0:
        return labels.clone(), 0.0
    if num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    generator = derived_generator(seed, "symmetric-label-noise")
    moved = torch.rand(labels.shape, generator=generator) < rate
    # Adding 1..C-1 modulo C reaches every other class exactly once: uniform over the wrong classes.
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    noisy = torch.where(moved, (labels + shift) % num_classes, labels)
    return noisy, float(moved.double().mean())
