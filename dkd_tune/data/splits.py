"""Turns a DataSpec into a run's datasets: read (or download, or generate), hold out a validation split, add label noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.data.cifar import CIFAR100_URL, CIFAR_FILES, CIFAR_FOLDER, cifar100_folder, read_cifar100
from dkd_tune.data.coco import CocoData, load_coco
from dkd_tune.data.dataset import ImageDataset
from dkd_tune.data.kinds import DATASET_KINDS
from dkd_tune.data.label_noise import symmetric_label_noise
from dkd_tune.data.seeding import derived_seed
from dkd_tune.data.spec import DataSpec
from dkd_tune.data.synthetic import make_synthetic, synthetic_params
from dkd_tune.data.synthetic_coco import make_synthetic_coco

SYNTHETIC_DEFAULT_CLASSES = 100  # make_synthetic's default


def load_train_test(spec: DataSpec) -> tuple[ImageDataset, ImageDataset]:
    """The (train, test) datasets of a cifar100 or synthetic spec; the validation split, if any, is left out of train."""
    train, _, test = load_splits(spec)
    return train, test


def load_splits(spec: DataSpec) -> tuple[ImageDataset, ImageDataset | None, ImageDataset]:
    """(train, validation or None, test) of a cifar100 or synthetic spec; label noise, if any, on train only.

    The validation split is `spec.validation` images per class drawn from the training split with a
    fixed seed (the same images for every run and teacher) and removed from it, so a model is chosen
    on images no run trained on and the test split only reports. With noise, `train.labels` are
    noisy, `train.clean_labels` the originals and `train.label_noise_rate` the realised rate.
    """
    kind = spec.kind
    if kind.storage != "cifar-pickle":
        raise UserInputError(
            f"data spec {spec.name!r}: train/test datasets are read for "
            f"{' and '.join(k.name for k in DATASET_KINDS.values() if k.storage == 'cifar-pickle')}; "
            "imagenet uses dkd_tune.data.imagenet_loaders, COCO-format data load_coco_data"
        )
    if spec.download and kind.downloads and not (cifar100_folder(spec.root) / "meta").is_file():
        _download_cifar100(spec)
    if spec.generate is not None:  # only a generated kind takes generate: (DataSpec's check)
        make_synthetic(spec.root, **spec.generate)
    train, test = read_cifar100(
        spec.root, name=spec.name, how_to_get=how_to_get(spec), mean=kind.mean, std=kind.std
    )
    validation = None
    if spec.validation:
        train, validation = _hold_out(train, spec.validation, source=str(spec.root))
    if spec.label_noise > 0:
        noisy, realised = symmetric_label_noise(
            train.labels, spec.label_noise, train.num_classes, spec.noise_seed
        )
        train = dataclasses.replace(train, labels=noisy, clean_labels=train.labels, label_noise_rate=realised)
    return train, validation, test


def _hold_out(train: ImageDataset, per_class: int, source: str) -> tuple[ImageDataset, ImageDataset]:
    """Split `per_class` images of every class off `train` (seeded, stratified); (rest, held out), both in file order."""
    labels = train.labels.numpy()
    counts = np.bincount(labels, minlength=train.num_classes)
    if counts.min() <= per_class:
        raise UserInputError(
            f"data {source}: validation {per_class} images per class leaves no training image for class "
            f"{int(counts.argmin())} ({int(counts.min())} images); expected fewer than {int(counts.min())}"
        )
    rng = np.random.default_rng(derived_seed(0, "validation-split", per_class))
    held = np.zeros(len(labels), dtype=bool)
    for cls in range(train.num_classes):
        members = np.flatnonzero(labels == cls)
        held[rng.choice(members, per_class, replace=False)] = True

    def subset(mask: np.ndarray) -> ImageDataset:
        index = torch.from_numpy(np.flatnonzero(mask))
        coarse = None if train.coarse_labels is None else train.coarse_labels[index]
        return dataclasses.replace(
            train, images=train.images[index], labels=train.labels[index], coarse_labels=coarse
        )

    return subset(~held), subset(held)


def how_to_get(spec: DataSpec) -> str:
    """How a user gets `spec`'s files when they are missing (ends the error message)."""
    return spec.kind.how_to_get.format(root=spec.root)


def load_coco_data(spec: DataSpec, workers: int = 0) -> CocoData:
    """A COCO-format spec's checked folder (generated first for synthetic-coco with generate:)."""
    if spec.generate is not None:
        make_synthetic_coco(spec.root, **spec.generate)
    return load_coco(
        spec.root, name=spec.name, validation=spec.validation, augment=spec.augment, workers=workers
    )


def coco_category_names(spec: DataSpec) -> tuple[str, ...]:
    """A COCO-format spec's category names in label order (by id), read from its training annotations only."""
    return tuple(name for _, name in coco_categories(spec))


def coco_categories(spec: DataSpec) -> tuple[tuple[int, str], ...]:
    """A COCO-format spec's (category id, name) pairs in label order (by id), from its training annotations."""
    import json

    from dkd_tune.data.synthetic_coco import categories

    if spec.generate is not None:  # generated COCO data: its categories are the generator's
        listed = categories()
    else:
        path = spec.root / "annotations" / "instances_train2017.json"
        try:
            listed = json.loads(path.read_text())["categories"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"{path}: not a readable COCO annotation file ({error})") from None
    return tuple((int(c["id"]), str(c["name"])) for c in sorted(listed, key=lambda c: int(c["id"])))


def _download_cifar100(spec: DataSpec) -> None:
    from torchvision.datasets import CIFAR100

    try:
        spec.root.mkdir(parents=True, exist_ok=True)
        CIFAR100(str(spec.root), train=True, download=True)
    except (OSError, RuntimeError) as error:
        raise UserInputError(
            f"{spec.root / CIFAR_FOLDER}: could not download CIFAR-100 ({type(error).__name__}: {error}); "
            f"download {CIFAR100_URL} by hand and extract it into {spec.root}"
        ) from None


def dataset_problem(spec: DataSpec) -> str | None:
    """Why `spec` cannot be read right now (one line), or None; checked before a search starts."""
    if spec.download or spec.generate is not None:  # fetched or built when the search starts
        return None
    storage = spec.kind.storage
    if storage == "coco-folder":
        for name in ("instances_train2017.json", "instances_val2017.json"):
            if not (spec.root / "annotations" / name).is_file():
                return (
                    f"{spec.root / 'annotations' / name}: annotation file not found; a COCO folder holds "
                    f"annotations/instances_{{train,val}}2017.json, train2017/ and val2017/; {how_to_get(spec)}"
                )
        return None
    if storage == "image-folder":
        missing = [split for split in ("train", "val") if not (spec.root / split).is_dir()]
        if missing:
            return f"{spec.root / missing[0]}: no such folder; {how_to_get(spec)}"
        return None
    folder = cifar100_folder(spec.root)
    for file in CIFAR_FILES:
        if not (folder / file).is_file():
            return f"{folder / file}: missing file; expected {CIFAR_FOLDER}/{{train,test,meta}}; {how_to_get(spec)}"
    return None


def dataset_num_classes(spec: DataSpec) -> int:
    """Number of classes of `spec`'s dataset, without reading its images (detection: categories + background)."""
    kind = spec.kind
    if kind.is_detection:
        return len(coco_category_names(spec)) + 1
    if kind.num_classes is not None:
        return kind.num_classes
    if kind.storage == "image-folder":
        return sum(1 for entry in (spec.root / "train").iterdir() if entry.is_dir())
    if spec.generate is not None:  # what the folder will hold once generated (or already holds)
        return int(spec.generate.get("classes", SYNTHETIC_DEFAULT_CLASSES))
    params = synthetic_params(spec.root)
    if params is not None:
        return int(params["classes"])
    train, _ = read_cifar100(spec.root, name=spec.name, how_to_get="")
    return train.num_classes
