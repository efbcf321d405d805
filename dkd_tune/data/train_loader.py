"""Picks the training loader a run's `augment` setting needs: device-resident or CPU workers."""

from __future__ import annotations

import torch

from dkd_tune.data.dataset import ImageDataset
from dkd_tune.data.device_loader import DeviceAugmentLoader
from dkd_tune.data.spec import AUGMENTATIONS
from dkd_tune.data.worker_loader import WorkerAugmentLoader

CIFAR_PADDING = 4


def build_train_loader(
    dataset: ImageDataset,
    augment: str,
    batch_size: int,
    device: torch.device | str,
    *,
    seed: int,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    drop_last: bool = False,
) -> DeviceAugmentLoader | WorkerAugmentLoader:
    """ "standard": device crop(padding 4)+flip; "none": device, shuffled, unaugmented (one view);
    "autoaugment": crop+flip+AutoAugment CIFAR policy in `workers` CPU processes (view_ids None)."""
    common = dict(
        seed=seed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
        dtype=dtype,
        drop_last=drop_last,
    )
    if augment == "standard":
        return DeviceAugmentLoader(dataset, batch_size, device, padding=CIFAR_PADDING, flip=True, **common)
    if augment == "none":
        return DeviceAugmentLoader(dataset, batch_size, device, padding=0, flip=False, **common)
    if augment == "autoaugment":
        return WorkerAugmentLoader(dataset, batch_size, device, workers=workers, **common)
    raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
