"""Tiny-ImageNet's release folder (`tiny-imagenet-200/`) as an ImageDataset resized to the student's input size (probe, A.7)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.data.dataset import CIFAR100_MEAN, CIFAR100_STD, ImageDataset, resize_images

TINY_FOLDER = "tiny-imagenet-200"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def tiny_imagenet_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    return root if root.name == TINY_FOLDER else root / TINY_FOLDER


def load_tiny_imagenet(
    root: str | Path,
    split: str,
    image_size: int,
    *,
    mean: tuple[float, ...] = CIFAR100_MEAN,
    std: tuple[float, ...] = CIFAR100_STD,
) -> ImageDataset:
    """`split` "train" (train/<wnid>/images/*.JPEG) or "val" (val/images + val/val_annotations.txt), resized.

    Classes are the wnids of wnids.txt in sorted order (ImageFolder's order); names come from
    words.txt when present. The default normalisation is CIFAR-100's (the probed extractor's).
    """
    if split not in SPLITS:
        raise UserInputError(f"Tiny-ImageNet split {split!r} is not one of {', '.join(SPLITS)}")
    folder = tiny_imagenet_folder(root)
    how_to_get = f"download {TINY_URL} and unzip it into {folder.parent}"
    expected = f"{TINY_FOLDER}/{{wnids.txt,train/<wnid>/images/,val/images/,val/val_annotations.txt}}"
    if not folder.is_dir():
        raise UserInputError(f"{folder}: no such folder; expected {expected}; {how_to_get}")
    wnids = sorted(_lines(folder / "wnids.txt", expected, how_to_get))
    if not wnids:
        raise UserInputError(
            f"{folder / 'wnids.txt'}: lists no classes; expected one wnid per line; {how_to_get}"
        )
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    files = (
        _train_files(folder, wnids, expected, how_to_get)
        if split == "train"
        else _val_files(folder, class_index, expected, how_to_get)
    )
    images = torch.from_numpy(_read_all(files, how_to_get))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(
        images=resize_images(images, image_size),
        labels=labels,
        num_classes=len(wnids),
        class_names=_class_names(folder / "words.txt", wnids),
        mean=tuple(mean),
        std=tuple(std),
        name="tiny-imagenet",
    )


def _lines(path: Path, expected: str, how_to_get: str) -> list[str]:
    if not path.is_file():
        raise UserInputError(f"{path}: missing file; expected {expected}; {how_to_get}")
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(
            f"{path}: unreadable ({type(error).__name__}); expected {expected}; {how_to_get}"
        ) from None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _train_files(folder: Path, wnids: list[str], expected: str, how_to_get: str) -> list[tuple[Path, int]]:
    files = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise UserInputError(
                f"{images}: missing folder for class {wnid} of wnids.txt; expected {expected}; {how_to_get}"
            )
        found = _images_in(images)
        if not found:
            raise UserInputError(f"{images}: holds no .JPEG images; expected {expected}; {how_to_get}")
        files += [(path, label) for path in found]
    return files


def _val_files(
    folder: Path, class_index: dict[str, int], expected: str, how_to_get: str
) -> list[tuple[Path, int]]:
    annotations = folder / "val" / "val_annotations.txt"
    files = []
    for number, line in enumerate(_lines(annotations, expected, how_to_get), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise UserInputError(
                f"{annotations}:{number}: expected 'FILENAME<TAB>WNID[<TAB>box]', got {line[:60]!r}; {how_to_get}"
            )
        name, wnid = fields[0], fields[1]
        if wnid not in class_index:
            raise UserInputError(f"{annotations}:{number}: class {wnid!r} is not in wnids.txt; {how_to_get}")
        path = folder / "val" / "images" / name
        if not path.is_file():
            raise UserInputError(
                f"{path}: missing image listed in {annotations.name} line {number}; {how_to_get}"
            )
        files.append((path, class_index[wnid]))
    if not files:
        raise UserInputError(f"{annotations}: lists no images; expected {expected}; {how_to_get}")
    return files


def _read_all(files: list[tuple[Path, int]], how_to_get: str) -> np.ndarray:
    first = _read_rgb(files[0][0], how_to_get)
    images = np.empty((len(files), *first.shape), dtype=np.uint8)
    images[0] = first
    for i, (path, _) in enumerate(files[1:], start=1):
        pixels = _read_rgb(path, how_to_get)
        if pixels.shape != first.shape:
            raise UserInputError(
                f"{path}: image is {pixels.shape[2]}x{pixels.shape[1]}, expected {first.shape[2]}x{first.shape[1]} like {files[0][0].name}; {how_to_get}"
            )
        images[i] = pixels
    return images


def _read_rgb(path: Path, how_to_get: str) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_image

    try:
        # The release has a few greyscale JPEGs: decode everything as RGB.
        return decode_image(str(path), mode=ImageReadMode.RGB).numpy()
    except (OSError, RuntimeError, ValueError) as error:
        raise UserInputError(f"{path}: not a readable image ({type(error).__name__}); {how_to_get}") from None


def _class_names(words: Path, wnids: list[str]) -> list[str]:
    names: dict[str, str] = {}
    try:
        for line in words.read_text().splitlines():
            wnid, _, description = line.partition("\t")
            names[wnid.strip()] = description.split(",")[0].strip()
    except (OSError, UnicodeDecodeError):
        pass
    return [names.get(wnid) or wnid for wnid in wnids]
