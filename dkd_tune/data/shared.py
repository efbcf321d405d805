"""What a search hands its trials: decoded arrays shared through Ray's object store, image folders, or a COCO folder."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from dkd_tune.data.coco import CocoData
from dkd_tune.data.dataset import ImageDataset
from dkd_tune.data.sources import ImageFolderData


@dataclass
class SharedDataset:
    """A decoded train/test pair as numpy arrays: zero-copy through Ray's object store."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    label_noise_rate: float = 0.0
    val_images: np.ndarray | None = None  # the validation split, when the data spec holds one out
    val_labels: np.ndarray | None = None
    class_groups: tuple[int, ...] | None = None  # each class's superclass, where the data has them

    @classmethod
    def from_datasets(
        cls, train: ImageDataset, test: ImageDataset, validation: ImageDataset | None = None
    ) -> SharedDataset:
        return cls(
            train_images=train.images.numpy(),
            train_labels=train.labels.numpy(),
            test_images=test.images.numpy(),
            test_labels=test.labels.numpy(),
            num_classes=train.num_classes,
            class_names=list(train.class_names),
            mean=tuple(train.mean),
            std=tuple(train.std),
            name=train.name,
            label_noise_rate=float(getattr(train, "label_noise_rate", 0.0)),
            val_images=None if validation is None else validation.images.numpy(),
            val_labels=None if validation is None else validation.labels.numpy(),
            class_groups=train.class_groups(),
        )

    def validation(self) -> ImageDataset | None:
        if self.val_images is None:
            return None
        return self._dataset(self.val_images, self.val_labels)

    def datasets(self) -> tuple[ImageDataset, ImageDataset]:
        return self._dataset(self.train_images, self.train_labels), self._dataset(
            self.test_images, self.test_labels
        )

    def _dataset(self, images: np.ndarray, labels: np.ndarray) -> ImageDataset:
        with warnings.catch_warnings():
            # Object-store arrays are read-only; loaders only read them (padding makes a copy).
            warnings.simplefilter("ignore", UserWarning)
            return ImageDataset(
                images=torch.from_numpy(images),
                labels=torch.from_numpy(labels),
                num_classes=self.num_classes,
                class_names=self.class_names,
                mean=self.mean,
                std=self.std,
                name=self.name,
            )


# What a search hands its trials: decoded images in memory, ImageNet's folders, or COCO.
TrialData = SharedDataset | ImageFolderData | CocoData
