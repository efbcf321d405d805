"""Device-resident loaders: the whole set on the training device as uint8, augmented there in batched ops.

Per training batch the hot path is: a look-up of the views' pixel offsets, one `torch.take` (crop +
flip from the zero-padded uint8 set, padded once per loader), a uint8 -> float convert and a
scale/shift. Every random draw of an epoch
(permutation and views) comes from a CPU generator seeded by (seed, epoch) and reaches the device
in one copy per epoch, so CPU and CUDA runs see identical batches and resuming needs only the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dkd_tune.data.batch import Batch
from dkd_tune.data.dataset import ImageDataset
from dkd_tune.data.sharding import batch_count, check_rank, epoch_order, rank_share
from dkd_tune.data.views import ViewTables, normalization_constants, normalize_with, num_views, pad_images


class DeviceAugmentLoader:
    """Random crop with `padding`-pixel zero padding + horizontal flip + normalisation, on `device`.

    Each of the (2*padding+1)**2 crop offsets and both flips are equally likely, independently per
    sample, i.e. the distribution of torchvision's RandomCrop(size, padding) + RandomHorizontalFlip().
    `padding=0, flip=False` gives unaugmented, shuffled training batches (num_views == 1).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        device: torch.device | str,
        *,
        seed: int,
        padding: int = 4,
        flip: bool = True,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if batch_size < 1 or padding < 0:
            raise ValueError(f"need batch_size >= 1 and padding >= 0, got {batch_size} and {padding}")
        check_rank(rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.padding = padding
        self.flip = flip
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.dtype = dtype
        self.num_views = num_views(padding, flip)
        self.epoch = 0
        self._padded = pad_images(dataset.images.to(self.device), padding)
        self._labels = dataset.labels.to(self.device)
        self._tables = ViewTables(*dataset.images.shape[1:], padding, flip, self.device)
        self._scale, self._shift = normalization_constants(dataset.mean, dataset.std, self.device)
        self._samples_per_rank = -(-len(dataset) // world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and views the next iteration yields (resuming needs only this)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return batch_count(self._samples_per_rank, self.batch_size, self.drop_last)

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dataset indices, view ids) of this rank's samples in `epoch`, on the CPU, in yield order."""
        order, generator = epoch_order(
            len(self.dataset), seed=self.seed, epoch=epoch, shuffle=self.shuffle, world_size=self.world_size
        )
        views = torch.randint(self.num_views, order.shape, generator=generator)
        return rank_share(order, self.rank, self.world_size), rank_share(views, self.rank, self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        # Each iteration advances the epoch, so a loop that never calls set_epoch still reshuffles.
        epoch, self.epoch = self.epoch, self.epoch + 1
        indices, views = self.epoch_plan(epoch)
        plan = torch.stack([indices, views]).to(self.device, non_blocking=True)
        for batch in range(len(self)):
            chunk = plan[:, batch * self.batch_size : (batch + 1) * self.batch_size]
            batch_indices, batch_views = chunk[0], chunk[1]
            pixels = self._tables.gather(self._padded, batch_indices, batch_views)
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            images = normalize_with(pixels, self._scale, self._shift, self.dtype)
            yield Batch(images, self._labels[batch_indices], batch_indices, batch_views)


class EvalLoader:
    """Unaugmented batches in dataset order, from a uint8 copy of the set on `device`.

    With several ranks each rank gets every `world_size`-th sample without wrap-around padding,
    so across ranks every sample is evaluated exactly once and summed metrics are exact.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        device: torch.device | str,
        *,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"need batch_size >= 1, got {batch_size}")
        check_rank(rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.dtype = dtype
        self.rank = rank
        self.world_size = world_size
        self._indices = torch.arange(rank, len(dataset), world_size, device=self.device)
        self._images = dataset.images[rank::world_size].to(self.device).contiguous()
        self._labels = dataset.labels[rank::world_size].to(self.device)
        self._scale, self._shift = normalization_constants(dataset.mean, dataset.std, self.device)

    def __len__(self) -> int:
        return batch_count(len(self._indices), self.batch_size, drop_last=False)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self._indices), self.batch_size):
            pixels = self._images[start : start + self.batch_size]
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            images = normalize_with(pixels, self._scale, self._shift, self.dtype)
            end = start + self.batch_size
            yield Batch(images, self._labels[start:end], self._indices[start:end], None)
