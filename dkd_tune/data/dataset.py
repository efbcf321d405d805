"""The in-memory image dataset every reader returns: one uint8 tensor of images, labels and normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The CIFAR-100 training-set statistics used by mdistiller/CRD, so their teachers see identical inputs.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageDataset:
    """A labelled image set held as one contiguous uint8 (N, C, H, W) CPU tensor.

    `mean`/`std` are per-channel, in [0, 1] pixel units: `normalize` maps a pixel p to (p/255 - mean)/std.
    With label noise, `labels` are the noisy training labels, `clean_labels` the original ones and
    `label_noise_rate` the realised fraction that differ.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    label_noise_rate: float = 0.0
    clean_labels: torch.Tensor | None = None
    coarse_labels: torch.Tensor | None = None
    coarse_class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError("mean and std need one value per channel")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_groups(self) -> tuple[int, ...] | None:
        """Each class's superclass (CIFAR-100's coarse label), or None when the data has none or a class
        has images in two superclasses (then there is no one superclass to keep a permutation inside)."""
        if self.coarse_labels is None:
            return None
        groups = []
        for label in range(self.num_classes):
            coarse = self.coarse_labels[self.labels == label].unique()
            if len(coarse) != 1:
                return None
            groups.append(int(coarse[0]))
        return tuple(groups)


def channel_statistics(
    images: torch.Tensor, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) set in [0, 1] units, accumulated in float64 chunks."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def resize_images(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased bilinear (as PIL's resize), in chunks."""
    if images.shape[2] == size and images.shape[3] == size:
        return images.contiguous()
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float32)
        resized = torch.nn.functional.interpolate(
            block, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out
