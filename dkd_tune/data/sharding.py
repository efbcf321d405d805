"""The sample order of an epoch and each rank's share of it, with DistributedSampler's semantics."""

from __future__ import annotations

import torch

from dkd_tune.data.seeding import derived_generator


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def epoch_order(
    num_samples: int, *, seed: int, epoch: int, shuffle: bool, world_size: int
) -> tuple[torch.Tensor, torch.Generator]:
    """The epoch's order of dataset indices, padded by wrap-around to a multiple of `world_size`.

    Returns the order and the epoch's CPU generator (already advanced past the permutation), so
    further per-position draws (views, per-sample seeds) also depend only on (seed, epoch).
    """
    generator = derived_generator(seed, "epoch", epoch)
    order = torch.randperm(num_samples, generator=generator) if shuffle else torch.arange(num_samples)
    total = -(-num_samples // world_size) * world_size
    if total > num_samples:
        repeats = -(-(total - num_samples) // num_samples)
        order = torch.cat([order, order.repeat(repeats)[: total - num_samples]])
    return order, generator


def rank_share(values: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Every `world_size`-th entry starting at `rank` (the rank's share of a padded epoch order)."""
    return values[rank::world_size].contiguous()


def batch_count(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)
