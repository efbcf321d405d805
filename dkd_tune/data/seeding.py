"""Independent, reproducible random streams derived from a user's seed and a purpose (epoch, noise, ...)."""

from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed that depends on `seed` and every part of `purpose`; nearby inputs give unrelated seeds."""
    text = ":".join(str(part) for part in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def derived_generator(seed: int, *purpose: object) -> torch.Generator:
    """A CPU torch.Generator seeded with `derived_seed(seed, *purpose)`."""
    return torch.Generator().manual_seed(derived_seed(seed, *purpose))
