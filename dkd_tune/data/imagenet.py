"""ImageNet as ImageFolder train/val through DataLoader workers, with the standard crop/flip and resize/center-crop."""

from __future__ import annotations

from pathlib import Path

import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from dkd_tune.data.worker_loader import WorkerAugmentLoader

IMAGENET_URL = "https://image-net.org/download-images.php"
RESIZE_RATIO = 256 / 224  # evaluation: resize the short side to 256 for a 224 crop


def imagenet_loaders(
    root: str | Path,
    batch_size: int,
    *,
    workers: int,
    seed: int,
    image_size: int = 224,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[WorkerAugmentLoader, WorkerAugmentLoader]:
    """(train, val) loaders over `root/train/<class>/*` and `root/val/<class>/*` (ImageFolder layout).

    Train: RandomResizedCrop(image_size) + horizontal flip; val: resize to image_size*256/224 and
    center-crop image_size. Workers decode (torchvision.io) and crop uint8 tensors (antialiased
    resizes, as PIL's); the device normalises with ImageNet's statistics.
    """
    from torchvision import transforms

    root = Path(root).expanduser()
    train_set = _image_folder(root, "train")
    val = imagenet_eval_loader(
        root, "val", batch_size, workers=workers, seed=seed, image_size=image_size, rank=rank,
        world_size=world_size, device=device, channels_last=channels_last, dtype=dtype,
    )  # fmt: skip
    if train_set.classes != val.dataset.classes:
        raise UserInputError(
            f"{root / 'val'}: class folders differ from train/ ({len(val.dataset.classes)} vs "
            f"{len(train_set.classes)}); expected the same class folders in train/ and val/"
        )
    train_transform = transforms.Compose(
        [transforms.RandomResizedCrop(image_size, antialias=True), transforms.RandomHorizontalFlip()]
    )
    train = WorkerAugmentLoader(
        train_set, batch_size, device, seed=seed, transform=train_transform, shuffle=True, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, workers=workers, rank=rank, world_size=world_size, channels_last=channels_last, dtype=dtype,
    )  # fmt: skip
    return train, val


def imagenet_eval_loader(
    root: str | Path,
    split: str,
    batch_size: int,
    *,
    workers: int,
    seed: int = 0,
    image_size: int = 224,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> WorkerAugmentLoader:
    """Unaugmented, in-order batches of `root/split` (resize to image_size*256/224, center crop):
    the validation loader, and the pass over train/ that measures a teacher's logit gap."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(round(image_size * RESIZE_RATIO), antialias=True),
            transforms.CenterCrop(image_size),
        ]
    )
    return WorkerAugmentLoader(
        _image_folder(Path(root).expanduser(), split), batch_size, device, seed=seed, transform=transform,
        shuffle=False, pad_shards=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=workers, rank=rank,
        world_size=world_size, channels_last=channels_last, dtype=dtype,
    )  # fmt: skip


def _image_folder(root: Path, split: str):
    from torchvision.datasets import ImageFolder

    folder = root / split
    expected = (
        f"{root}/{{train,val}}/<class>/<image> (ImageFolder layout; val reorganised into class folders)"
    )
    if not folder.is_dir():
        raise UserInputError(
            f"{folder}: no such folder; expected {expected}; get ImageNet from {IMAGENET_URL}"
        )
    try:
        return ImageFolder(str(folder), loader=_load_rgb)
    except (FileNotFoundError, OSError) as error:
        raise UserInputError(f"{folder}: {error}; expected {expected}") from None


def _load_rgb(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (OSError, RuntimeError, ValueError) as error:
        raise UserInputError(
            f"{path}: not a readable image ({type(error).__name__}); replace or remove the file"
        ) from None
