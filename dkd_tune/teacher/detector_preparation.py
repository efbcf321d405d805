"""A search's detection teacher, prepared once: loaded from its checkpoint or trained with the detector's own losses (reused by later searches), its R-CNN head's gap measured."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_json, file_sha256
from dkd_tune.core.progress import Log
from dkd_tune.core.recipes import Recipe
from dkd_tune.data.coco import CocoData
from dkd_tune.engine.checkpoints import BEST_CHECKPOINT, LAST_CHECKPOINT
from dkd_tune.engine.detection_loop import fit_detector
from dkd_tune.engine.detection_setup import prepare_detection_run
from dkd_tune.models.detection import load_detector
from dkd_tune.teacher.detection_gap import measure_detection_gap
from dkd_tune.teacher.preparation import TEACHER_RECORD, TeacherArtifacts

NO_CACHE = "off (a detector's proposals come from the student, so the teacher runs live)"


def prepare_detection_teacher(
    *,
    label: str,
    model: str,
    checkpoint: str | None,
    train_recipe: Recipe | None,
    data: CocoData,
    teachers_dir: Path,
    device: torch.device,
    log: Log = print,
) -> TeacherArtifacts:
    """Load (or train once) the teacher detector and measure its R-CNN head's gap over assigned proposals."""
    if checkpoint is not None:
        weights = Path(checkpoint).expanduser().resolve()
    elif train_recipe is not None:
        weights = train_detector_once(
            model,
            train_recipe,
            data,
            detector_training_dir(teachers_dir, model, train_recipe, data),
            device,
            log,
        )
    else:
        raise UserInputError(f"teacher {label!r}: give a checkpoint or a train: recipe")
    teacher = load_detector(
        model, weights, categories=data.category_names, category_ids=data.category_ids, device=device
    )
    log(f"dkd-tune: teacher '{label}': measuring the logit gap of its R-CNN head on its proposals")
    gap = measure_detection_gap(teacher, data, device=device)
    log(
        f"dkd-tune: teacher '{label}': gap {gap.mean:.3f} over {gap.num_samples} object proposals, "
        f"{gap.background_mean:.3f} over {gap.background_samples} background ones; logit cache {NO_CACHE}"
    )
    return TeacherArtifacts(
        label=label,
        model=model,
        checkpoint=str(weights),
        num_classes=data.num_classes,
        gap=gap,
        cache_path=None,
        cache_note=NO_CACHE,
    )


def detector_training_dir(teachers_dir: Path, model: str, recipe: Recipe, data: CocoData) -> Path:
    """Where a teacher trained with this recipe on these annotations lives: reused across searches."""
    identity = {
        "model": model,
        "recipe": recipe.to_dict(),
        "annotations": file_sha256(data.annotation_file("train")),
        "validation_ids": list(data.validation_ids),
        "augment": data.augment,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return Path(teachers_dir).expanduser().resolve() / f"{model}-{digest[:12]}"


def train_detector_once(
    model: str, recipe: Recipe, data: CocoData, folder: Path, device: torch.device, log: Log = print
) -> Path:
    """`folder/best.pt` of a finished training with the detector's own losses: reused, resumed from last.pt, or trained."""
    best, last, record = folder / BEST_CHECKPOINT, folder / LAST_CHECKPOINT, folder / TEACHER_RECORD
    if record.is_file() and best.is_file():
        log(
            f"dkd-tune: teacher {model}: reusing the detector trained earlier with this recipe and data: {best}"
        )
        return best
    folder.mkdir(parents=True, exist_ok=True)
    resume_from = last if last.is_file() else None
    log(
        f"dkd-tune: teacher {model}: "
        + (
            f"resuming its interrupted training from {last}"
            if resume_from
            else f"training it ({recipe.name}, {recipe.epochs} epochs) on {device} into {folder}"
        )
    )
    run = prepare_detection_run(model, data, recipe)

    def report(epoch_report) -> None:
        metrics = epoch_report.metrics
        log(
            f"dkd-tune: teacher {model} epoch {epoch_report.epoch}/{recipe.epochs}: loss {metrics['train_loss']:.4f}, "
            f"test AP {metrics.get('test_ap', 0.0):.2f}"
        )

    result = fit_detector(
        run.model, run.train_loader, run.evaluations, recipe,
        identity=run.identity, loss_mode="ce", device=device, reporter=report,
        checkpoint_dir=folder, resume_from=resume_from,
    )  # fmt: skip
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
            "augment": data.augment,
            "dataset": data.name,
            "epochs": result.epochs_completed,
            "best_test_ap": result.best_test_score,
            "final_test_ap": result.final_test_score,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    log(
        f"dkd-tune: teacher {model}: trained, best test AP {result.best_test_score:.2f} ({result.best_checkpoint})"
    )
    return result.best_checkpoint
