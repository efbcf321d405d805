"""What the benchmarks run on: CIFAR-shaped random data, the classic PIL/DataLoader pipeline, a logit cache to read.

Random pixels and random weights cost the same per step as real ones, so timing needs no
dataset and no trained network. The teacher-logit cache is built with a stand-in teacher (a
pooled linear layer with the right number of outputs) through the real `TeacherLogitCache.build`:
a trial's per-step cost of the cache is one gather from the memory-mapped file, which does not
depend on what the logits are, while building it with resnet32x4 on a CPU takes minutes per
hundred images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dkd_tune.data import ImageDataset
from dkd_tune.data.dataset import CIFAR100_MEAN, CIFAR100_STD
from dkd_tune.teacher.logit_cache import TeacherLogitCache

NUM_CLASSES = 100
BATCH = 64
STANDIN_BUILD_BATCH = 1024


def random_image_dataset(
    count: int, *, num_classes: int = NUM_CLASSES, image_size: int = 32, seed: int = 0
) -> ImageDataset:
    """`count` random uint8 images (3 x size x size) with random labels, CIFAR-100's normalisation."""
    generator = torch.Generator().manual_seed(seed)
    return ImageDataset(
        images=torch.randint(
            0, 256, (count, 3, image_size, image_size), dtype=torch.uint8, generator=generator
        ),
        labels=torch.randint(0, num_classes, (count,), generator=generator),
        num_classes=num_classes,
        class_names=[str(index) for index in range(num_classes)],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        name="random",
    )


class PilImageDataset(Dataset):
    """What torchvision.datasets.CIFAR100 does per sample: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def classic_loader(
    dataset: ImageDataset, batch_size: int = BATCH, *, workers: int = 2, pin_memory: bool = False
) -> DataLoader:
    """The usual CIFAR pipeline: PIL images, RandomCrop(32, padding=4), flip, ToTensor, Normalize, `workers` workers."""
    from torchvision import transforms

    images_hwc = dataset.images.permute(0, 2, 3, 1).contiguous().numpy()
    transform = transforms.Compose(
        [
            transforms.RandomCrop(dataset.images.shape[-1], padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(dataset.mean, dataset.std),
        ]
    )
    return DataLoader(
        PilImageDataset(images_hwc, dataset.labels.numpy(), transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        drop_last=True,
    )


def endless(loader):
    """Batches forever, a new epoch (and shuffle) each pass."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class StandInTeacher(nn.Module):
    """Average-pooled pixels through one linear layer: `num_classes` logits per view, almost free to run."""

    def __init__(self, num_classes: int, channels: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.classifier = nn.Linear(channels * 16, num_classes)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.randn(self.classifier.weight.shape, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(nn.functional.adaptive_avg_pool2d(images, 4).flatten(1))


def standin_logit_cache(
    dataset: ImageDataset, directory: str | Path, device: torch.device | str = "cpu"
) -> TeacherLogitCache:
    """A complete cache (every image's 162 views) for `dataset`, built by the stand-in teacher, memory-mapped."""
    built = TeacherLogitCache.build(
        StandInTeacher(dataset.num_classes, dataset.images.shape[1]),
        dataset,
        directory,
        device=device,
        batch_size=STANDIN_BUILD_BATCH,
        progress=False,
        log=lambda _message: None,
    )
    return TeacherLogitCache.open(built.path)  # a fresh memory map, as a trial opens it


def random_teacher_checkpoint(
    path: Path, arch: str, num_classes: int, image_size: int, dataset: str = "random"
) -> Path:
    """A teacher checkpoint of seeded random weights: benchmarks time the teacher, not its training."""
    from dkd_tune.models import create_model
    from dkd_tune.models.checkpoints import save_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes)
    save_model(path, model, arch=arch, num_classes=num_classes, dataset=dataset, input_size=image_size)
    return path
