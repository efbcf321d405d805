"""COCO-format detection data: the folder checked once, then read by torchvision's `CocoDetection` with transforms v2.

A COCO folder holds `annotations/instances_train2017.json` with `train2017/` and
`annotations/instances_val2017.json` with `val2017/` (the paper reports on val2017, which is
this project's test split; `validation: N` holds N training images out as the split trials are
chosen on). Category ids (COCO's run 1..90 with gaps) become contiguous labels 1..K, label 0
being the background: the R-CNN head then has K + 1 logits, none for a category that does not
exist, which matters for NCKD (an always-empty class would take part in every non-target
distribution). Crowd boxes are left out of training, as torchvision's references do.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dkd_tune.core.errors import UserInputError

SPLIT_FILES = {"train": "train2017", "test": "val2017"}  # dkd-tune split -> COCO folder/annotation name
SIZE_CHECKS = 50  # images whose recorded width and height are compared with the file's


@dataclass(frozen=True)
class CocoData:
    """A checked COCO-format folder: what every trial and teacher reads its loaders from (small, picklable)."""

    root: Path
    name: str
    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]
    validation_ids: tuple[int, ...] = ()  # training images held out as the validation split
    augment: str = "standard"  # standard: horizontal flips; none
    workers: int = 0

    @property
    def num_classes(self) -> int:
        """Logits of the R-CNN head: the categories and the background (label 0)."""
        return len(self.category_ids) + 1

    def annotation_file(self, split: str) -> Path:
        return (
            self.root / "annotations" / f"instances_{SPLIT_FILES['train' if split == 'val' else split]}.json"
        )

    def image_dir(self, split: str) -> Path:
        return self.root / SPLIT_FILES["train" if split == "val" else split]

    def ground_truth(self, split: str):
        """The split's annotations as a pycocotools `COCO` (its load messages kept off the console)."""
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(self.annotation_file(split)))

    def image_ids(self, split: str, ground_truth=None) -> list[int]:
        """The split's image ids in a fixed order; training images without a usable box are skipped."""
        coco = ground_truth or self.ground_truth(split)
        if split == "val":
            return list(self.validation_ids)
        ids = sorted(coco.getImgIds())
        if split == "train":
            held_out = set(self.validation_ids)
            ids = [i for i in ids if i not in held_out and _has_box(coco, i)]
        return ids

    def dataset(self, split: str, *, train: bool, ground_truth=None) -> CocoSplit:
        """The split's images and targets; `ground_truth` (the split's annotations, loaded) avoids reading them again."""
        coco = ground_truth or self.ground_truth(split)
        return CocoSplit(
            self, split, coco, self.image_ids(split, coco), flip=train and self.augment == "standard"
        )


def _has_box(coco, image_id: int) -> bool:
    return any(
        not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in coco.imgToAnns[image_id]
    )


class CocoSplit(torch.utils.data.Dataset):
    """One split through `torchvision.datasets.CocoDetection`: (image tensor in [0, 1], target dict).

    An item is an index, or (index, flip) as `EpochOrder` yields them in training: whether an image is
    flipped is decided with the order, from the seed, the epoch and the image, in the main process.
    Workers (kept alive across epochs) then flip exactly as a run without workers, and a resumed run
    exactly as an uninterrupted one.
    """

    def __init__(self, data: CocoData, split: str, ground_truth, image_ids: list[int], flip: bool):
        self.source = _loaded_coco_detection(str(data.image_dir(split)), ground_truth, None)
        self.source.ids = list(image_ids)
        self.targets = CocoTargets(data.category_ids)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.source.ids)

    def __getitem__(self, item: int | tuple[int, bool]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, flip = item if isinstance(item, tuple) else (item, False)
        image, annotations = self.source[index]
        image, target = self.targets(image, annotations, flip=flip and self.flip)
        target["image_id"] = self.source.ids[index]
        return image, target


def _loaded_coco_detection(root: str, ground_truth, transforms):
    """torchvision's `CocoDetection` over annotations already loaded: COCO's train2017 file is 450 MB of
    JSON, so a trial (and each of its DDP ranks) reads it once for training and validation, not per use."""
    from torchvision.datasets import CocoDetection, VisionDataset

    # CocoDetection's __init__ would read the file; everything else of it is used as it is.
    dataset = CocoDetection.__new__(CocoDetection)
    VisionDataset.__init__(dataset, root, transforms=transforms)
    dataset.coco = ground_truth
    dataset.ids = sorted(ground_truth.imgs)
    return dataset


class CocoTargets:
    """CocoDetection's `transforms`: COCO annotations to torchvision detection targets, then transforms v2."""

    def __init__(self, category_ids: tuple[int, ...]):
        from torchvision.transforms import v2

        self.label_of = {category_id: label for label, category_id in enumerate(category_ids, start=1)}
        self.pipeline = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
        )
        self.flipped = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(p=1.0), self.pipeline])

    def __call__(
        self, image: Any, annotations: list[dict], *, flip: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from torchvision import tv_tensors

        kept = [a for a in annotations if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in kept], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # COCO's x, y, w, h -> x1, y1, x2, y2
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(image.height, image.width)),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in kept], dtype=torch.int64),
        }
        image, target = (self.flipped if flip else self.pipeline)(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        return image, target


def collate_detections(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class EpochOrder(torch.utils.data.Sampler):
    """A shuffled order and (with `flips`) each image's flip that depend on the seed and the epoch alone,
    yielded as indices or (index, flip); each DDP rank takes every world_size-th image."""

    def __init__(
        self,
        size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        flips: bool = False,
    ):
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.flips = flips
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.size))
        generator = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            generator.shuffle(order)
        mine = order[self.rank :: self.world_size]
        if not self.flips:
            return iter(mine)
        flips = [generator.random() < 0.5 for _ in range(self.size)]
        return iter([(index, flips[index]) for index in mine])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def detection_loader(
    dataset: CocoSplit,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """Batches of (images, targets); `loader.sampler.set_epoch(e)` fixes an epoch's order and flips."""
    sampler = EpochOrder(len(dataset), seed, rank, world_size, shuffle, flips=getattr(dataset, "flip", False))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_detections,
        drop_last=False,
        persistent_workers=workers > 0,
    )


# ------------------------------------------------------------------------------------------------
# The folder, checked once per search


def load_coco(root: Path, *, name: str, validation: int, augment: str, workers: int = 0) -> CocoData:
    """Check the folder (one line per problem, naming the file) and pick the validation images."""
    root = Path(root).expanduser().resolve()  # trials read it from other working directories
    files = {
        split: root / "annotations" / f"instances_{folder}.json" for split, folder in SPLIT_FILES.items()
    }
    found: dict[str, dict] = {}
    for split, path in files.items():
        if not path.is_file():
            raise UserInputError(
                f"data: {path}: annotation file not found; a COCO folder holds annotations/instances_train2017.json "
                "with train2017/ and annotations/instances_val2017.json with val2017/"
            )
        found[split] = _read_instances(path)
        _check_images(path, found[split], root / SPLIT_FILES[split])
    train_categories = _categories(found["train"])
    if _categories(found["test"]) != train_categories:
        raise UserInputError(
            f"data: {files['test']}: its categories differ from those of {files['train']}; "
            "both files must list the same categories"
        )
    ids = tuple(sorted(train_categories))
    names = tuple(train_categories[i] for i in ids)
    with_boxes = sorted({a["image_id"] for a in found["train"]["annotations"] if not a.get("iscrowd", 0)})
    if validation >= len(with_boxes):
        raise UserInputError(
            f"data: validation = {validation}: the training split has only {len(with_boxes)} images with boxes"
        )
    held_out = tuple(sorted(random.Random(0).sample(with_boxes, validation))) if validation else ()
    return CocoData(root, name, ids, names, held_out, augment, workers)


def _read_instances(path: Path) -> dict:
    try:
        instances = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"data: {path}: not a readable COCO annotation file ({error})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(instances, dict) or not isinstance(instances.get(key), list):
            raise UserInputError(f"data: {path}: missing the list {key!r} of a COCO instances file")
    return instances


def _categories(instances: dict) -> dict[int, str]:
    return {int(c["id"]): str(c["name"]) for c in instances["categories"]}


def _check_images(path: Path, instances: dict, image_dir: Path) -> None:
    """Every annotated image is a file of the size the annotations say; every box names a known image and category."""
    from PIL import Image

    if not image_dir.is_dir():
        raise UserInputError(f"data: {image_dir}: image folder not found (the images of {path.name})")
    present = {entry.name for entry in image_dir.iterdir()}
    images = {int(image["id"]): image for image in instances["images"]}
    for image in instances["images"]:
        if image["file_name"] not in present:
            raise UserInputError(
                f"data: {path}: image {image['id']} is {image['file_name']!r}, which is not in {image_dir}"
            )
    step = max(1, len(instances["images"]) // SIZE_CHECKS)
    for image in instances["images"][::step]:
        with Image.open(image_dir / image["file_name"]) as opened:
            if opened.size != (image["width"], image["height"]):
                raise UserInputError(
                    f"data: {path}: image {image['id']} ({image['file_name']}) is {opened.size[0]}x{opened.size[1]} "
                    f"pixels, the annotations say {image['width']}x{image['height']}"
                )
    categories = _categories(instances)
    for annotation in instances["annotations"]:
        if annotation["image_id"] not in images:
            raise UserInputError(
                f"data: {path}: annotation {annotation['id']} names image {annotation['image_id']}, which the file does not list"
            )
        if annotation["category_id"] not in categories:
            raise UserInputError(
                f"data: {path}: annotation {annotation['id']} names category {annotation['category_id']}, "
                "which the file does not list"
            )
