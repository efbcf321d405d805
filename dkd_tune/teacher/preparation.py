"""A search's teacher, prepared once: loaded from its checkpoint or trained with CE (reused by later
searches), its gap measured and its logit cache built; `TeacherArtifacts` is what trials receive."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_json
from dkd_tune.core.progress import Log
from dkd_tune.core.recipes import Recipe
from dkd_tune.data import ImageDataset, ImageFolderData, InMemoryData
from dkd_tune.engine.checkpoints import BEST_CHECKPOINT, LAST_CHECKPOINT
from dkd_tune.engine.loop import fit
from dkd_tune.engine.run_setup import prepare_run
from dkd_tune.models import load_teacher
from dkd_tune.teacher.gap import LogitGapStats, measure_logit_gap
from dkd_tune.teacher.logit_cache import TeacherLogitCache, augmentation_views, dataset_fingerprint
from dkd_tune.teacher.logit_interventions import NO_INTERVENTION, LogitIntervention

TEACHER_RECORD = "teacher.json"


# ------------------------------------------------------------------------------------------------
# A search's teacher: loaded or trained once, measured, cached


@dataclass(frozen=True)
class TeacherArtifacts:
    """What a search keeps per teacher (in its state.json) and ships to every trial."""

    label: str
    model: str
    checkpoint: str
    num_classes: int
    gap: LogitGapStats | None
    cache_path: str | None
    cache_note: str = ""
    predicted_beta: float | None = None
    intervention: LogitIntervention = NO_INTERVENTION  # what trials do to its training logits
    class_groups: tuple[int, ...] | None = (
        None  # each class's superclass, for a within-superclass permutation
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "num_classes": self.num_classes,
            "gap": self.gap.to_dict() if self.gap is not None else None,
            "cache_path": self.cache_path,
            "cache_note": self.cache_note,
            "predicted_beta": self.predicted_beta,
            "intervention": self.intervention.to_dict(),
            "class_groups": list(self.class_groups) if self.class_groups is not None else None,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TeacherArtifacts:
        gap = values.get("gap")
        beta = values.get("predicted_beta")
        return cls(
            label=str(values["label"]),
            model=str(values["model"]),
            checkpoint=str(values["checkpoint"]),
            num_classes=int(values["num_classes"]),
            gap=LogitGapStats.from_dict(gap) if gap is not None else None,
            cache_path=values.get("cache_path"),
            cache_note=str(values.get("cache_note", "")),
            predicted_beta=float(beta) if beta is not None else None,
            # States written before interventions existed hold only "non_target".
            intervention=LogitIntervention.from_dict(
                values.get("intervention") or {"non_target": values.get("non_target", "as_is")}
            ),
            class_groups=tuple(int(g) for g in values["class_groups"])
            if values.get("class_groups")
            else None,
        )


def teacher_training_dir(
    teachers_dir: str | os.PathLike, model: str, recipe: Recipe, train_set: ImageDataset, augment: str
) -> Path:
    """Where a teacher trained with this recipe on this data and augmentation lives: reused across searches."""
    identity = {
        "model": model,
        "recipe": recipe.to_dict(),
        "dataset": dataset_fingerprint(train_set),
        "augment": augment,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return Path(teachers_dir).expanduser().resolve() / f"{model}-{digest[:12]}"


def prepare_teacher(
    *,
    label: str,
    model: str,
    checkpoint: str | None,
    train_recipe: Recipe | None,
    train_set: ImageDataset,
    test_set: ImageDataset,
    augment: str,
    teachers_dir: Path,
    cache_dir: Path | None,
    cache_note: str,
    device: torch.device,
    log: Log = print,
    progress: bool = True,
    validation_set: ImageDataset | None = None,
    intervention: LogitIntervention = NO_INTERVENTION,
    class_groups: tuple[int, ...] | None = None,
) -> TeacherArtifacts:
    """Load (or train once) a search's teacher, measure its logit gap and build its logit cache.

    With `train_recipe` the teacher is trained with cross-entropy into
    `teacher_training_dir(...)/best.pt`, reused by any later search with the same recipe, data
    and augmentation, and resumed from `last.pt` when an earlier training was interrupted.
    `cache_dir` None means no cache (`cache_note` says why). `predicted_beta` is left to the caller.
    The gap is measured through `intervention` (the logits the student will see); the cache keeps
    the teacher's own logits, which trials pass through the intervention.
    """
    if intervention.needs_class_groups and class_groups is None:
        raise UserInputError(
            f"teacher {label!r}: non_target {intervention.non_target} needs superclasses, and dataset "
            f"{train_set.name!r} has none"
        )
    device = torch.device(device)
    if checkpoint is not None:
        weights = Path(checkpoint).expanduser().resolve()
    elif train_recipe is not None:
        folder = teacher_training_dir(teachers_dir, model, train_recipe, train_set, augment)
        weights = train_teacher_once(model, train_recipe, train_set, test_set, augment, folder, device, log)
    else:
        raise UserInputError(f"teacher {label!r}: give a checkpoint or a train: recipe")
    teacher = load_teacher(model, weights, num_classes=train_set.num_classes, device=device)
    held_out = f"{len(test_set)} test" + (f" and {len(validation_set)} validation" if validation_set else "")
    log(
        f"dkd-tune: teacher '{label}': measuring the logit gap on {len(train_set)} training images and its "
        f"top-1 on {held_out} images ({len(train_set) + len(test_set) + len(validation_set or [])} images in all)"
    )
    gap = measure_logit_gap(
        teacher, train_set, test_set, validation=validation_set, device=device, progress=progress,
        intervention=intervention,
        class_groups=torch.tensor(class_groups, device=device) if class_groups is not None else None,
    )  # fmt: skip
    cache_path = None
    if cache_dir is not None:
        views = augmentation_views(augment)
        if views is None:
            cache_note = f"off (augment {augment!r} has unbounded views)"
        else:
            padding, flip = views
            cache = TeacherLogitCache.build(
                teacher,
                train_set,
                cache_dir,
                padding=padding,
                flip=flip,
                device=device,
                log=log,
                progress=progress,
            )
            cache_path = cache.path
    log(f"dkd-tune: teacher '{label}': logit cache {cache_note}" + (f": {cache_path}" if cache_path else ""))
    return TeacherArtifacts(
        label=label,
        model=model,
        checkpoint=str(weights),
        num_classes=train_set.num_classes,
        gap=gap,
        cache_path=cache_path,
        cache_note=cache_note,
        intervention=intervention,
        class_groups=class_groups if intervention.needs_class_groups else None,
    )


def prepare_folder_teacher(
    *, label: str, model: str, checkpoint: str, data: ImageFolderData, device: torch.device, log: Log = print
) -> TeacherArtifacts:
    """An ImageNet-style teacher: loaded from its checkpoint, gap measured over train/ (resized, center crop).

    Folder data is decoded by workers and augmented with random-resized crops, whose views are
    unbounded: no logit cache, and a teacher is given, not trained here.
    """
    from dkd_tune.data.imagenet import imagenet_eval_loader

    device = torch.device(device)
    weights = Path(checkpoint).expanduser().resolve()
    teacher = load_teacher(model, weights, num_classes=data.num_classes, device=device)

    def unaugmented(split: str):
        return imagenet_eval_loader(
            data.root, split, 256, workers=data.workers, image_size=data.input_size, device=device
        )

    log(f"dkd-tune: teacher '{label}': measuring the logit gap on {data.root / 'train'}")
    gap = measure_logit_gap(teacher, unaugmented("train"), unaugmented("val"), device=device)
    note = "off (random-resized crops of folder data have unbounded views)"
    log(f"dkd-tune: teacher '{label}': logit cache {note}")
    return TeacherArtifacts(
        label=label, model=model, checkpoint=str(weights), num_classes=data.num_classes, gap=gap,
        cache_path=None, cache_note=note,
    )  # fmt: skip


def train_teacher_once(
    model: str,
    recipe: Recipe,
    train_set: ImageDataset,
    test_set: ImageDataset,
    augment: str,
    folder: Path,
    device: torch.device,
    log: Log = print,
) -> Path:
    """`folder/best.pt` of a finished cross-entropy training: reused if there, resumed from last.pt, or trained."""
    best, last, record = folder / BEST_CHECKPOINT, folder / LAST_CHECKPOINT, folder / TEACHER_RECORD
    if record.is_file() and best.is_file():
        log(
            f"dkd-tune: teacher {model}: reusing the teacher trained earlier with this recipe and data: {best}"
        )
        return best
    folder.mkdir(parents=True, exist_ok=True)
    resume_from = last if last.is_file() else None
    if resume_from is not None:
        log(f"dkd-tune: teacher {model}: resuming its interrupted training from {last}")
    else:
        log(
            f"dkd-tune: teacher {model}: training it ({recipe.name}, {recipe.epochs} epochs, {len(train_set)} images, "
            f"augment {augment}) on {device} into {folder}"
        )
    run = prepare_run(model, InMemoryData(train_set, test_set, augment), recipe, device=device)

    def report(epoch_report) -> None:
        metrics = epoch_report.metrics
        log(
            f"dkd-tune: teacher {model} epoch {epoch_report.epoch}/{recipe.epochs}: loss {metrics['train_loss']:.4f}, "
            f"train {metrics['train_acc']:.2f}%, test {metrics['test_acc']:.2f}%"
        )

    result = fit(
        run.model,
        run.train_loader,
        run.test_loader,
        recipe,
        identity=run.identity,
        loss_mode="ce",
        device=device,
        acceleration=run.acceleration,
        reporter=report,
        checkpoint_dir=folder,
        resume_from=resume_from,
    )
    if result.status != "completed" or result.best_checkpoint is None:
        raise UserInputError(
            f"{folder}: training teacher {model} {result.status} after {result.epochs_completed} epochs; "
            "lower its lr (teachers[].train.overrides) and run again"
        )
    atomic_write_json(
        record,
        {
            "model": model,
            "recipe": recipe.to_dict(),
            "augment": augment,
            "dataset": train_set.name,
            "epochs": result.epochs_completed,
            "best_test_acc": result.best_test_score,
            "final_test_acc": result.final_test_score,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    log(
        f"dkd-tune: teacher {model}: trained, best test top-1 {result.best_test_score:.2f}% ({result.best_checkpoint})"
    )
    return result.best_checkpoint
