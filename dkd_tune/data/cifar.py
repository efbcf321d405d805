"""CIFAR-100's python release on disk (`cifar-100-python/{train,test,meta}`): a validating reader and a writer.

The same format carries the generated synthetic dataset, so one reader serves both.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write
from dkd_tune.data.dataset import ImageDataset, channel_statistics

CIFAR_FOLDER = "cifar-100-python"
CIFAR_FILES = ("train", "test", "meta")
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
SPLIT_KEYS = ("data", "fine_labels", "coarse_labels", "filenames")
META_KEYS = ("fine_label_names", "coarse_label_names")

# What a CIFAR pickle may construct: numpy arrays, dtypes and scalars (every numpy version's names),
# and the codec Python 3 uses for bytes in protocol-2 pickles. Anything else is refused unread.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class CifarSplit(NamedTuple):
    """One split in memory: uint8 (N, 3, H, W) images, fine and coarse labels, file names."""

    images: np.ndarray
    fine_labels: np.ndarray
    coarse_labels: np.ndarray
    filenames: list[str]


def cifar100_folder(root: str | Path) -> Path:
    """The folder holding train/test/meta: `root/cifar-100-python`, or `root` itself if it holds them."""
    root = Path(root).expanduser()
    if root.name == CIFAR_FOLDER or ((root / "meta").is_file() and not (root / CIFAR_FOLDER).exists()):
        return root
    return root / CIFAR_FOLDER


def read_cifar100(
    root: str | Path,
    *,
    name: str,
    how_to_get: str,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Read and validate `root/cifar-100-python/{train,test,meta}` into (train, test) datasets.

    `how_to_get` ends every error message (e.g. "set download: true ..."). Without `mean`/`std`
    the training set's own per-channel statistics are used.
    """
    folder = cifar100_folder(root)
    expected = f"{CIFAR_FOLDER}/{{train,test,meta}} (the python version of CIFAR-100)"
    if not folder.is_dir():
        raise UserInputError(
            f"{folder}: no such folder; expected {expected} under {Path(root).expanduser()}; {how_to_get}"
        )
    for file in CIFAR_FILES:
        if not (folder / file).is_file():
            raise UserInputError(f"{folder / file}: missing file; expected {expected}; {how_to_get}")
    meta = _read_dict(folder / "meta", META_KEYS, how_to_get)
    fine_names = _names(meta, "fine_label_names", folder / "meta", how_to_get)
    coarse_names = _names(meta, "coarse_label_names", folder / "meta", how_to_get)
    train = _read_split(folder / "train", len(fine_names), len(coarse_names), how_to_get)
    test = _read_split(folder / "test", len(fine_names), len(coarse_names), how_to_get)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserInputError(
            f"{folder / 'test'}: images are {test.images.shape[2]}x{test.images.shape[3]} but the training "
            f"images are {train.images.shape[2]}x{train.images.shape[3]}; expected one size; {how_to_get}"
        )
    train_set = _as_dataset(train, fine_names, coarse_names, name, mean, std)
    test_set = _as_dataset(test, fine_names, coarse_names, name, train_set.mean, train_set.std)
    return train_set, test_set


def write_cifar100(
    root: str | Path,
    train: CifarSplit,
    test: CifarSplit,
    fine_label_names: Sequence[str],
    coarse_label_names: Sequence[str],
) -> Path:
    """Write `root/cifar-100-python/{train,test,meta}` as the official release lays them out.

    Keys and names are `str`, as the release reads under `pickle.load(f, encoding="latin1")`, the
    way torchvision and most CIFAR code read it (the release is a Python 2 pickle; written from
    Python 3, bytes keys would read back as bytes there).
    """
    folder = Path(root).expanduser() / CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for file, split in (("train", train), ("test", test)):
        content = {
            "filenames": list(split.filenames),
            "batch_label": f"{file} batch 1 of 1",
            "fine_labels": [int(v) for v in split.fine_labels],
            "coarse_labels": [int(v) for v in split.coarse_labels],
            "data": np.ascontiguousarray(split.images, dtype=np.uint8).reshape(len(split.images), -1),
        }
        _write_pickle(folder / file, content)
    meta = {
        "fine_label_names": list(fine_label_names),
        "coarse_label_names": list(coarse_label_names),
    }
    _write_pickle(folder / "meta", meta)
    return folder


def _write_pickle(path: Path, content: dict) -> None:
    atomic_write(path, lambda file: pickle.dump(content, file, protocol=2))  # the release's protocol


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to construct {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, how_to_get: str) -> Any:
    # The CIFAR release is a pickle, so reading it requires pickle; users point us at their own files,
    # so only numpy arrays and plain containers may be constructed (see _ALLOWED_GLOBALS).
    try:
        with open(path, "rb") as file:
            return _NumpyOnlyUnpickler(file, encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise UserInputError(
            f"{path}: not a CIFAR-100 pickle ({error}); expected the python version of CIFAR-100; {how_to_get}"
        ) from None
    except (
        OSError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        OverflowError,  # random bytes that read as a length past the platform's limit
        RecursionError,
    ) as error:
        reason = type(error).__name__ if isinstance(error, EOFError) else f"{type(error).__name__}: {error}"
        raise UserInputError(
            f"{path}: unreadable or truncated ({reason}); expected the python version of CIFAR-100; {how_to_get}"
        ) from None


def _read_dict(path: Path, keys: Sequence[str], how_to_get: str) -> dict[str, Any]:
    content = _unpickle(path, how_to_get)
    if not isinstance(content, dict):
        raise UserInputError(
            f"{path}: holds a {type(content).__name__}, expected a dict with keys {', '.join(keys)}; {how_to_get}"
        )
    decoded = {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in content.items()}
    missing = [key for key in keys if key not in decoded]
    if missing:
        raise UserInputError(
            f"{path}: missing key {missing[0]!r}; expected keys {', '.join(keys)}; {how_to_get}"
        )
    return decoded


def _names(meta: dict[str, Any], key: str, path: Path, how_to_get: str) -> list[str]:
    names = meta[key]
    if (
        not isinstance(names, (list, tuple))
        or not names
        or not all(isinstance(n, (bytes, str)) for n in names)
    ):
        raise UserInputError(f"{path}: {key} must be a non-empty list of names; {how_to_get}")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _read_split(path: Path, num_fine: int, num_coarse: int, how_to_get: str) -> CifarSplit:
    content = _read_dict(path, SPLIT_KEYS, how_to_get)
    data = content["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        described = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise UserInputError(
            f"{path}: 'data' is a {described}; expected a uint8 array (N, 3*H*W); {how_to_get}"
        )
    count, row = data.shape
    side = math.isqrt(row // 3)
    if count == 0 or row != 3 * side * side:
        raise UserInputError(
            f"{path}: 'data' has shape {data.shape}; expected (N, 3*S*S) with N > 0 (CIFAR: (N, 3072)); {how_to_get}"
        )
    fine = _labels(content["fine_labels"], "fine_labels", count, num_fine, path, how_to_get)
    coarse = _labels(content["coarse_labels"], "coarse_labels", count, num_coarse, path, how_to_get)
    filenames = content["filenames"]
    if not isinstance(filenames, (list, tuple)) or len(filenames) != count:
        raise UserInputError(
            f"{path}: 'filenames' must be a list of {count} names, one per image; {how_to_get}"
        )
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in filenames]
    images = data.reshape(count, 3, side, side)
    return CifarSplit(images, fine, coarse, names)


def _labels(value: Any, key: str, count: int, num_classes: int, path: Path, how_to_get: str) -> np.ndarray:
    try:
        labels = np.asarray(value)
    except (ValueError, TypeError):
        labels = np.asarray([])
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise UserInputError(f"{path}: '{key}' must be {count} integers, one per image; {how_to_get}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise UserInputError(
            f"{path}: '{key}' holds label {bad}, outside [0, {num_classes}) given by the meta file's names; {how_to_get}"
        )
    return labels.astype(np.int64)


def _as_dataset(
    split: CifarSplit,
    fine_names: list[str],
    coarse_names: list[str],
    name: str,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> ImageDataset:
    images = torch.from_numpy(np.ascontiguousarray(split.images))
    if mean is None or std is None:
        mean, std = channel_statistics(images)
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(split.fine_labels),
        num_classes=len(fine_names),
        class_names=list(fine_names),
        mean=tuple(mean),
        std=tuple(std),
        name=name,
        coarse_labels=torch.from_numpy(split.coarse_labels),
        coarse_class_names=list(coarse_names),
    )
