"""What every detection run starts from (a trial, a teacher's training): a seeded detector, its training loader and its scored splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dkd_tune.core.recipes import Recipe
from dkd_tune.data.coco import CocoData, detection_loader
from dkd_tune.engine.detection_eval import EvaluationSplit
from dkd_tune.engine.run_setup import RunIdentity

EVAL_BATCH_SIZE = 8


@dataclass
class PreparedDetectionRun:
    model: nn.Module
    train_loader: torch.utils.data.DataLoader
    evaluations: dict[str, EvaluationSplit]  # "test", and "val" when the data hold one out
    identity: RunIdentity


def prepare_detection_run(
    arch: str, data: CocoData, recipe: Recipe, *, rank: int = 0, world_size: int = 1
) -> PreparedDetectionRun:
    """The detector `arch` seeded by `recipe.seed` (backbone from ImageNet weights where it has them) and its loaders.

    `recipe.batch_size` is the global batch: each DDP rank takes its share of the images.
    """
    from dkd_tune.models.detection import create_detector

    train_annotations = data.ground_truth("train")  # also the validation split's (held out of it)
    train_loader = detection_loader(
        data.dataset("train", train=True, ground_truth=train_annotations),
        max(1, recipe.batch_size // world_size),
        seed=recipe.seed,
        shuffle=True,
        workers=data.workers,
        rank=rank,
        world_size=world_size,
    )
    evaluations = {}
    for split in ("val", "test") if data.validation_ids else ("test",):
        ground_truth = train_annotations if split == "val" else data.ground_truth(split)
        loader = detection_loader(
            data.dataset(split, train=False, ground_truth=ground_truth),
            EVAL_BATCH_SIZE,
            seed=0,
            shuffle=False,
            workers=data.workers,
            rank=rank,
            world_size=world_size,
        )
        evaluations[split] = EvaluationSplit(
            loader, ground_truth, data.image_ids(split, ground_truth), data.category_ids
        )
    torch.manual_seed(recipe.seed)
    model = create_detector(arch, data.num_classes, pretrained_backbone=True)
    settings = getattr(model, "detector_settings", None)
    identity = RunIdentity(
        arch=arch,
        num_classes=data.num_classes,
        dataset=data.name,
        categories=data.category_names,
        category_ids=data.category_ids,
        detector=settings.to_dict() if settings is not None else None,
    )
    return PreparedDetectionRun(model, train_loader, evaluations, identity)
