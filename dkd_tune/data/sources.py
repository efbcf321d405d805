"""Where a run's batches come from: a dataset held in memory (CIFAR-like) or image folders read by workers (ImageNet).

Both give a training loader and an evaluation loader yielding the same `Batch`, plus what a
checkpoint records about the data (name, classes, input size, normalisation). In-memory data is
augmented on the training device; folder data is decoded and augmented by DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dkd_tune.data.dataset import IMAGENET_MEAN, IMAGENET_STD, ImageDataset
from dkd_tune.data.device_loader import EvalLoader
from dkd_tune.data.imagenet import imagenet_loaders
from dkd_tune.data.train_loader import build_train_loader


@dataclass
class InMemoryData:
    """A train/test pair of decoded uint8 images; `augment` picks the training loader (see build_train_loader)."""

    train: ImageDataset
    test: ImageDataset
    augment: str = "standard"
    val: ImageDataset | None = None  # the validation split held out of train, if any

    @property
    def name(self) -> str:
        return self.train.name

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.train.mean), tuple(self.train.std)

    def loaders(
        self, batch_size: int, device: torch.device, *, seed: int, eval_batch_size: int, **layout: Any
    ):
        """(train, eval) loaders; `layout` holds rank, world_size, channels_last and dtype."""
        train = build_train_loader(self.train, self.augment, batch_size, device, seed=seed, **layout)
        return train, EvalLoader(self.test, eval_batch_size, device, **layout)

    def val_loader(self, device: torch.device, *, eval_batch_size: int, **layout: Any) -> EvalLoader | None:
        """The validation split's loader, or None without one; `layout` as for `loaders`."""
        if self.val is None:
            return None
        return EvalLoader(self.val, eval_batch_size, device, **layout)


@dataclass
class ImageFolderData:
    """ImageNet-style `root/{train,val}/<class>/<image>`: too big for memory, read by `workers` processes."""

    root: Path
    num_classes: int
    workers: int = 8
    input_size: int = 224
    name: str = "imagenet"

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return IMAGENET_MEAN, IMAGENET_STD

    def loaders(
        self, batch_size: int, device: torch.device, *, seed: int, eval_batch_size: int, **layout: Any
    ):
        """(train, val) loaders: random-resized crop + flip for training, resize + center crop for val."""
        del eval_batch_size  # both loaders share the batch size: the val pass is a small part of an epoch
        return imagenet_loaders(
            self.root,
            batch_size,
            workers=self.workers,
            seed=seed,
            image_size=self.input_size,
            device=device,
            **layout,
        )
