"""What every run starts from (a search trial, a teacher's training, `distill`): a seeded student and its loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dkd_tune.core.recipes import Recipe
from dkd_tune.engine.acceleration import Acceleration


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records about the network it holds, so it can be reloaded without guessing."""

    arch: str
    num_classes: int
    dataset: str = ""
    input_size: int = 32
    mean: tuple[float, ...] = ()  # the input normalisation it was trained with (used by the probe)
    std: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()  # a detector's category names, label 1 first (0 is the background)
    category_ids: tuple[int, ...] = ()  # ... their COCO category ids, so a teacher maps to other data by id
    detector: dict[str, Any] | None = None  # a detector's settings (`DetectorSettings.to_dict()`)


@dataclass
class PreparedRun:
    """A seeded student, its loaders on the training device and the speed settings they share."""

    model: nn.Module
    train_loader: Any
    test_loader: Any
    acceleration: Acceleration
    identity: RunIdentity
    val_loader: Any = None  # the validation split's loader, when the data hold one out


def prepare_run(
    arch: str,
    data: Any,
    recipe: Recipe,
    *,
    device: torch.device,
    compile: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    eval_batch_size: int = 512,
) -> PreparedRun:
    """What every run starts from (trial, teacher training, `distill`): one place, so they cannot drift.

    `data` is a `dkd_tune.data.InMemoryData` or `ImageFolderData`. The student's initial weights
    depend on `recipe.seed` alone; each rank of a DDP run gets its share of every batch
    (`recipe.batch_size` is the global batch).
    """
    from dkd_tune.models import create_model

    acceleration = Acceleration.for_device(device, compile=compile)
    train_loader, test_loader = data.loaders(
        recipe.batch_size // world_size,
        device,
        seed=recipe.seed,
        eval_batch_size=eval_batch_size,
        rank=rank,
        world_size=world_size,
        channels_last=acceleration.channels_last,
        dtype=acceleration.input_dtype,
    )
    val_loader = None
    if hasattr(data, "val_loader"):
        val_loader = data.val_loader(
            device,
            eval_batch_size=eval_batch_size,
            rank=rank,
            world_size=world_size,
            channels_last=acceleration.channels_last,
            dtype=acceleration.input_dtype,
        )
    torch.manual_seed(recipe.seed)
    model = create_model(arch, num_classes=data.num_classes)
    mean, std = data.normalisation
    identity = RunIdentity(
        arch=arch,
        num_classes=data.num_classes,
        dataset=data.name,
        input_size=data.input_size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )
    return PreparedRun(model, train_loader, test_loader, acceleration, identity, val_loader)
