"""The CPU-worker training path: per-sample transforms (AutoAugment, ImageNet crops) in DataLoader workers.

Used where augmentation cannot be a few batched tensor ops. Workers return uint8 tensors; the main
process moves them to the device and normalises there. Each sample's transform runs under its own
seed, drawn from (seed, epoch), so a run is deterministic for a seed whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dkd_tune.core.errors import UserInputError
from dkd_tune.data.batch import Batch
from dkd_tune.data.dataset import ImageDataset
from dkd_tune.data.sharding import batch_count, check_rank, epoch_order, rank_share
from dkd_tune.data.views import normalization_constants, normalize_with

Transform = Callable[[Any], torch.Tensor]


def cifar_autoaugment_transform(image_size: int | tuple[int, int], padding: int = 4) -> Transform:
    """Paper A.4: random crop with zero padding and horizontal flip, then AutoAugment's CIFAR policy (uint8 in/out)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomCrop(image_size, padding=padding),
            transforms.RandomHorizontalFlip(),
            transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10),
        ]
    )


class TensorImages(Dataset):
    """An ImageDataset's (uint8 CHW tensor, label) pairs, for the worker loader."""

    def __init__(self, dataset: ImageDataset):
        self.images = dataset.images
        self.labels = dataset.labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class _SeededTransformed(Dataset):
    """Applies `transform` to source[index] with torch's RNG seeded per sample (position in the epoch)."""

    def __init__(self, source: Dataset, transform: Transform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor | str, int, int]:
        index, sample_seed = item
        try:
            image, label = self.source[index]
        except UserInputError as error:
            # Handed to the main process as data: an exception would come back wrapped in a worker traceback.
            return str(error), -1, index
        # torchvision's transforms draw from the default CPU generator. Seeding only that generator
        # (not torch.manual_seed, which also seeds every accelerator: ~100 us) and restoring its
        # state afterwards costs ~2 us and leaves the caller's random stream untouched.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(sample_seed)
        try:
            pixels = self.transform(image)
        finally:
            generator.set_state(state)
        if pixels.dtype != torch.uint8:
            raise TypeError(f"the worker transform must return uint8 tensors, got {pixels.dtype}")
        return pixels, int(label), index


def _collate(
    samples: list[tuple[torch.Tensor | str, int, int]],
) -> tuple[torch.Tensor | str, torch.Tensor, torch.Tensor]:
    errors = [s[0] for s in samples if isinstance(s[0], str)]
    if errors:
        return errors[0], torch.empty(0), torch.empty(0)
    images = torch.stack([s[0] for s in samples])  # type: ignore[misc]
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    indices = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return images, labels, indices


class _EpochBatches:
    """Batch sampler: lists of (dataset index, sample seed) of one rank's share of `epoch`.

    Holds no reference to the loader: a loader <-> DataLoader cycle would leave the persistent
    workers to the garbage collector, whose teardown waits out their join timeouts.
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, seed, shuffle, drop_last, pad_shards, rank, world_size
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad_shards = pad_shards
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def __len__(self) -> int:
        if self.pad_shards:
            samples = -(-self.num_samples // self.world_size)
        else:
            samples = len(range(self.rank, self.num_samples, self.world_size))
        return batch_count(samples, self.batch_size, self.drop_last)

    def plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        world = self.world_size if self.pad_shards else 1
        order, generator = epoch_order(
            self.num_samples, seed=self.seed, epoch=epoch, shuffle=self.shuffle, world_size=world
        )
        seeds = torch.randint(0, 2**62, order.shape, generator=generator)
        return rank_share(order, self.rank, self.world_size), rank_share(seeds, self.rank, self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices, seeds = self.plan(self.epoch)
        pairs = list(zip(indices.tolist(), seeds.tolist(), strict=True))
        for batch in range(len(self)):
            yield pairs[batch * self.batch_size : (batch + 1) * self.batch_size]


class WorkerAugmentLoader:
    """Per-sample augmentation in `workers` DataLoader processes; yields `Batch` with view_ids=None.

    `dataset` is an ImageDataset (default transform: crop + flip + AutoAugment CIFAR policy; its
    mean/std) or any map-style dataset of (image, label) with `transform` returning uint8 CHW tensors
    and `mean`/`std` given (ImageNet). `pad_shards=True` gives DistributedSampler semantics (equal
    shares, padded by wrap-around); False gives every sample exactly once across ranks (evaluation).
    """

    num_views = None

    def __init__(
        self,
        dataset: ImageDataset | Dataset,
        batch_size: int,
        device: torch.device | str,
        *,
        seed: int,
        transform: Transform | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        workers: int = 2,
        shuffle: bool = True,
        drop_last: bool = False,
        pad_shards: bool = True,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if batch_size < 1 or workers < 0:
            raise ValueError(f"need batch_size >= 1 and workers >= 0, got {batch_size} and {workers}")
        check_rank(rank, world_size)
        if isinstance(dataset, ImageDataset):
            source: Dataset = TensorImages(dataset)
            transform = transform or cifar_autoaugment_transform(tuple(dataset.images.shape[2:]))
            mean, std = mean or dataset.mean, std or dataset.std
        else:
            source = dataset
            if transform is None or mean is None or std is None:
                raise ValueError("a dataset that is not an ImageDataset needs transform, mean and std")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.dtype = dtype
        self.epoch = 0
        self._scale, self._shift = normalization_constants(mean, std, self.device)
        self._batches = _EpochBatches(
            len(source),  # type: ignore[arg-type]
            batch_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            pad_shards=pad_shards,
            rank=rank,
            world_size=world_size,
        )
        self._loader = DataLoader(
            _SeededTransformed(source, transform),
            batch_sampler=self._batches,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentations the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._batches)

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dataset indices, per-sample transform seeds) of this rank's samples in `epoch`, in yield order."""
        return self._batches.plan(epoch)

    def __iter__(self) -> Iterator[Batch]:
        # Each iteration advances the epoch, so a loop that never calls set_epoch still reshuffles.
        self._batches.epoch, self.epoch = self.epoch, self.epoch + 1
        non_blocking = self.device.type == "cuda"
        for pixels, labels, indices in self._loader:
            if isinstance(pixels, str):
                raise UserInputError(pixels)
            pixels = pixels.to(self.device, non_blocking=non_blocking)
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            images = normalize_with(pixels, self._scale, self._shift, self.dtype)
            yield Batch(
                images,
                labels.to(self.device, non_blocking=non_blocking),
                indices.to(self.device, non_blocking=non_blocking),
                None,
            )
