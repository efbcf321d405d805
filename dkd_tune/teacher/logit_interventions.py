"""Interventions on a teacher's logits for the beta validation's experiments: the target raised, every logit
scaled, the non-target logits permuted (across all classes, or only within each superclass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NON_TARGET_CHOICES = ("as_is", "permuted", "permuted_within_superclass")
_LAST = 1 << 40  # a sort key above every hashed key (< 2**32): the target sorts last in its block
_GROUP_STRIDE = 1 << 41  # superclass-major sort keys: a group's block never mixes with the next


@dataclass(frozen=True)
class LogitIntervention:
    """What is done to each training image's teacher logits before DKD sees them (identity by default).

    Applied in this order: the non-target logits permuted, every logit multiplied by `scale`, the
    target logit raised by `target_shift`. Each moves one thing and keeps another:

    - `target_shift` moves the gap z_t - z_max by exactly that much and leaves the non-target
      distribution that NCKD transfers untouched (only TCKD's binary target moves);
    - `scale` multiplies the gap and sharpens (> 1) or softens (< 1) every distribution at once;
    - `non_target: permuted` keeps the target logit and the set of non-target values (hence the gap
      and the accuracy) and destroys which class each value belongs to; `permuted_within_superclass`
      moves values only among the classes of one superclass, so the coarse similarity survives.

    A permutation depends on the image's index and `seed` alone: the same in every epoch and view.
    """

    target_shift: float = 0.0
    scale: float = 1.0
    non_target: str = "as_is"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.non_target not in NON_TARGET_CHOICES:
            raise ValueError(f"non_target must be one of {NON_TARGET_CHOICES}, got {self.non_target!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale!r}")

    @property
    def is_identity(self) -> bool:
        return self.target_shift == 0 and self.scale == 1 and self.non_target == "as_is"

    @property
    def needs_class_groups(self) -> bool:
        return self.non_target == "permuted_within_superclass"

    def apply(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        class_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The intervened logits of a batch (labels are the training labels; indices the dataset indices)."""
        if self.non_target == "permuted":
            logits = permute_non_target(logits, labels, indices, self.seed)
        elif self.non_target == "permuted_within_superclass":
            if class_groups is None:
                raise ValueError("permuted_within_superclass needs each class's superclass (class_groups)")
            logits = permute_non_target(logits, labels, indices, self.seed, class_groups=class_groups)
        if self.scale != 1:
            logits = logits * self.scale
        if self.target_shift:
            shift = torch.zeros_like(logits).scatter_(
                1, labels.to(logits.device).long()[:, None], self.target_shift
            )
            logits = logits + shift
        return logits

    def describe(self) -> str:
        parts = []
        if self.non_target != "as_is":
            parts.append(f"non-target logits {self.non_target.replace('_', ' ')}")
        if self.scale != 1:
            parts.append(f"logits x{self.scale:g}")
        if self.target_shift:
            parts.append(f"target logit {self.target_shift:+g}")
        return ", ".join(parts) or "as is"

    def to_dict(self) -> dict[str, Any]:
        return {"target_shift": self.target_shift, "scale": self.scale, "non_target": self.non_target}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LogitIntervention:
        return cls(
            target_shift=float(values.get("target_shift", 0.0)),
            scale=float(values.get("scale", 1.0)),
            non_target=str(values.get("non_target", "as_is")),
        )


NO_INTERVENTION = LogitIntervention()


class IntervenedTeacher:
    """A teacher-logit source (cache or live teacher) whose logits pass through a `LogitIntervention`."""

    def __init__(
        self, source: Any, intervention: LogitIntervention, class_groups: torch.Tensor | None = None
    ):
        self.source = source
        self.intervention = intervention
        self.class_groups = class_groups

    def logits_for(self, batch: Any) -> torch.Tensor:
        logits = self.source.logits_for(batch)
        groups = None if self.class_groups is None else self.class_groups.to(logits.device)
        return self.intervention.apply(logits, batch.labels, batch.indices, groups)


def permute_non_target(
    logits: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    seed: int = 0,
    *,
    class_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """`logits` with each row's non-target entries moved to positions drawn from (index, seed) alone.

    With `class_groups` (each class's superclass) a value only moves among the non-target classes of
    its own superclass: both orders below sort superclass-major, so position k of one and of the
    other always hold classes of the same superclass, and the target sits last in its block in both.
    """
    rows, classes = logits.shape
    device = logits.device
    labels = labels.to(device).long()
    last = torch.full((rows, 1), _LAST, dtype=torch.int64, device=device)
    class_ids = torch.arange(classes, device=device, dtype=torch.int64)
    block = (
        torch.zeros(classes, dtype=torch.int64, device=device)
        if class_groups is None
        else class_groups.to(device).long() * _GROUP_STRIDE
    )
    # Where the values go: the classes in an order hashed from (image, class); the target last.
    keys = _hash32(indices.to(device).long()[:, None] * classes + class_ids[None, :], seed)
    destinations = (keys.scatter(1, labels[:, None], last) + block).argsort(dim=1)
    # Where they come from: the non-target classes in their own order, the target last.
    ordered = (class_ids.expand(rows, classes).scatter(1, labels[:, None], last) + block).argsort(dim=1)
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
