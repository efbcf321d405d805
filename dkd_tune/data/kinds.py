"""The dataset kinds dkd-tune reads, one row each: how the files are stored, the task, the calibration family, the options.

Callers ask a spec's row (`DataSpec.kind`) instead of comparing dataset names; adding a dataset
is a row here plus, for a new storage format, its reader in `splits.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dkd_tune.data.cifar import CIFAR100_URL
from dkd_tune.data.dataset import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD

# How the files are laid out, hence which reader: CIFAR-100's pickles (decoded once into memory and
# shared by every trial), an ImageFolder tree (read by each trial's workers), a COCO folder.
Storage = Literal["cifar-pickle", "image-folder", "coco-folder"]
Task = Literal["classification", "detection"]

SYNTHETIC_GENERATE_KEYS = (
    "classes",
    "superclasses",
    "train_per_class",
    "test_per_class",
    "image_size",
    "seed",
    "rotation",
)
SYNTHETIC_COCO_GENERATE_KEYS = ("train_images", "val_images", "image_size", "seed")


@dataclass(frozen=True)
class DatasetKind:
    """One dataset a `data:` spec can name, and everything dkd-tune does differently for it."""

    name: str
    task: Task
    family: str  # which auto-beta calibration applies (and the runs' `dataset_family` tag)
    storage: Storage
    augmentations: tuple[str, ...]  # the `augment:` values it takes, the default first
    how_to_get: str  # ends a "missing file" message; {root} is the spec's folder
    downloads: bool = False  # `download: true` fetches it
    generate_keys: tuple[str, ...] = ()  # `generate:` builds it with these parameters (none: not generated)
    label_noise: bool = False  # `label_noise:` applies
    validation_split: bool = True  # `validation:` can hold images out of the training split
    num_classes: int | None = None  # fixed by the dataset (None: read from the files)
    mean: tuple[float, ...] | None = None  # fixed normalisation (None: the training set's own statistics)
    std: tuple[float, ...] | None = None

    @property
    def is_detection(self) -> bool:
        return self.task == "detection"


DATASET_KINDS: dict[str, DatasetKind] = {
    kind.name: kind
    for kind in (
        DatasetKind(
            "cifar100", "classification", "cifar", "cifar-pickle", ("standard", "autoaugment", "none"),
            how_to_get="set download: true in the data spec (or pass --set data.download=true), or download "
            f"{CIFAR100_URL} and extract it into {{root}}",
            downloads=True, label_noise=True, num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD,
        ),
        DatasetKind(
            "synthetic", "classification", "synthetic", "cifar-pickle", ("standard", "autoaugment", "none"),
            how_to_get="run `dkd-tune make-synthetic --out {root}`, or add generate: to the data spec",
            generate_keys=SYNTHETIC_GENERATE_KEYS, label_noise=True,
        ),
        DatasetKind(
            "imagenet", "classification", "imagenet", "image-folder", ("standard",),
            how_to_get="expected ImageFolder train/ and val/ under {root}",
            validation_split=False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ),
        DatasetKind(
            "coco", "detection", "coco", "coco-folder", ("standard", "none"),
            how_to_get="download train2017, val2017 and annotations_trainval2017 from cocodataset.org into it",
        ),
        DatasetKind(
            "synthetic-coco", "detection", "coco", "coco-folder", ("standard", "none"),
            how_to_get="add generate: to the data spec",
            generate_keys=SYNTHETIC_COCO_GENERATE_KEYS,
        ),
    )
}  # fmt: skip

DATASET_NAMES = tuple(DATASET_KINDS)


def kinds_where(flag: str) -> list[str]:
    """The names of the kinds whose `flag` field is set (for "available for ... only" messages)."""
    return [kind.name for kind in DATASET_KINDS.values() if getattr(kind, flag)]
