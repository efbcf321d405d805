"""STL-10's binary release (`stl10_binary/`) as an ImageDataset resized to the student's input size (probe, A.7)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.data.dataset import CIFAR100_MEAN, CIFAR100_STD, ImageDataset, resize_images

STL10_FOLDER = "stl10_binary"
STL10_URL = "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_SIDE = 96
STL10_CLASSES = 10
SPLIT_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}


def stl10_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    return root if root.name == STL10_FOLDER else root / STL10_FOLDER


def load_stl10(
    root: str | Path,
    split: str,
    image_size: int,
    *,
    download: bool = False,
    mean: tuple[float, ...] = CIFAR100_MEAN,
    std: tuple[float, ...] = CIFAR100_STD,
) -> ImageDataset:
    """The labelled `split` ("train": 5,000 images, "test": 8,000) resized to `image_size`.

    `root` holds `stl10_binary/` (or is it). The default normalisation is CIFAR-100's, because the
    probed feature extractor was trained on CIFAR-100-normalised inputs.
    """
    if split not in SPLIT_FILES:
        raise UserInputError(f"STL-10 split {split!r} is not one of {', '.join(SPLIT_FILES)}")
    folder = stl10_folder(root)
    how_to_get = f"download {STL10_URL} and extract it into {folder.parent}, or pass download=True"
    if download and not (folder / SPLIT_FILES[split][0]).is_file():
        _download(folder.parent, how_to_get)
    expected = f"{STL10_FOLDER}/{{{','.join(SPLIT_FILES[split])}}} (the binary release of STL-10)"
    if not folder.is_dir():
        raise UserInputError(f"{folder}: no such folder; expected {expected}; {how_to_get}")
    images_path, labels_path = (folder / name for name in SPLIT_FILES[split])
    for path in (images_path, labels_path):
        if not path.is_file():
            raise UserInputError(f"{path}: missing file; expected {expected}; {how_to_get}")
    pixels = _read_bytes(images_path, how_to_get)
    image_bytes = 3 * STL10_SIDE * STL10_SIDE
    if pixels.size == 0 or pixels.size % image_bytes:
        raise UserInputError(
            f"{images_path}: {pixels.size} bytes is not a whole number of 3x96x96 images ({image_bytes} bytes each); {how_to_get}"
        )
    labels = _read_bytes(labels_path, how_to_get).astype(np.int64) - 1  # the release numbers classes from 1
    count = pixels.size // image_bytes
    if labels.shape != (count,):
        raise UserInputError(
            f"{labels_path}: {labels.size} labels for {count} images in {images_path.name}; {how_to_get}"
        )
    if labels.min() < 0 or labels.max() >= STL10_CLASSES:
        raise UserInputError(
            f"{labels_path}: labels must be 1..{STL10_CLASSES}, found {int(labels.min()) + 1}..{int(labels.max()) + 1}; {how_to_get}"
        )
    # Each image is stored channel by channel, each channel column-major: transpose to row-major.
    images = torch.from_numpy(pixels.reshape(count, 3, STL10_SIDE, STL10_SIDE).transpose(0, 1, 3, 2).copy())
    return ImageDataset(
        images=resize_images(images, image_size),
        labels=torch.from_numpy(labels),
        num_classes=STL10_CLASSES,
        class_names=_class_names(folder / "class_names.txt"),
        mean=tuple(mean),
        std=tuple(std),
        name="stl10",
    )


def _read_bytes(path: Path, how_to_get: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UserInputError(f"{path}: unreadable ({error.strerror or error}); {how_to_get}") from None


def _class_names(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        names = []
    return names if len(names) == STL10_CLASSES else [f"class_{i}" for i in range(1, STL10_CLASSES + 1)]


def _download(root: Path, how_to_get: str) -> None:
    from torchvision.datasets import STL10

    try:
        root.mkdir(parents=True, exist_ok=True)
        STL10(str(root), split="train", download=True)
    except (OSError, RuntimeError) as error:
        raise UserInputError(
            f"{root / STL10_FOLDER}: could not download STL-10 ({type(error).__name__}: {error}); {how_to_get}"
        ) from None
