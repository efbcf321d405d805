"""One search trial: the inputs every trial shares (prepared once per search) and the `fit` call they become.

A search prepares a `TrialPlan` (what is fixed: student, recipe, loss, teacher artifacts) and a
`SharedDataset` (the decoded images as numpy arrays, which Ray's object store hands to every
trial without a copy) once; `run_trial` turns them plus one trial's sampled hyperparameters
into loaders, a student, a teacher-logit source and a `engine.loop.fit` call. Torch only: a trainable
is a thin adapter around this, and this runs without Ray in tests and benchmarks.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkd_tune.core.losses import LOSS_MODES
from dkd_tune.core.recipes import Recipe, recipe_with
from dkd_tune.data import CocoData, ImageDataset, ImageFolderData, InMemoryData
from dkd_tune.engine.detection_loop import fit_detector
from dkd_tune.engine.detection_setup import prepare_detection_run
from dkd_tune.engine.devices import training_device
from dkd_tune.engine.loop import FitResult, LiveTeacher, Reporter, fit
from dkd_tune.engine.run_setup import prepare_run
from dkd_tune.models import load_teacher
from dkd_tune.models.detection import load_detector
from dkd_tune.teacher.logit_cache import CorruptCacheError, TeacherLogitCache
from dkd_tune.teacher.logit_interventions import IntervenedTeacher
from dkd_tune.teacher.preparation import TeacherArtifacts

EVAL_BATCH_SIZE = 512


@dataclass
class SharedDataset:
    """A decoded train/test pair as numpy arrays: zero-copy through Ray's object store."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    label_noise_rate: float = 0.0
    val_images: np.ndarray | None = None  # the validation split, when the data spec holds one out
    val_labels: np.ndarray | None = None
    class_groups: tuple[int, ...] | None = None  # each class's superclass, where the data has them

    @classmethod
    def from_datasets(
        cls, train: ImageDataset, test: ImageDataset, validation: ImageDataset | None = None
    ) -> SharedDataset:
        return cls(
            train_images=train.images.numpy(),
            train_labels=train.labels.numpy(),
            test_images=test.images.numpy(),
            test_labels=test.labels.numpy(),
            num_classes=train.num_classes,
            class_names=list(train.class_names),
            mean=tuple(train.mean),
            std=tuple(train.std),
            name=train.name,
            label_noise_rate=float(getattr(train, "label_noise_rate", 0.0)),
            val_images=None if validation is None else validation.images.numpy(),
            val_labels=None if validation is None else validation.labels.numpy(),
            class_groups=train.class_groups(),
        )

    def validation(self) -> ImageDataset | None:
        if self.val_images is None:
            return None
        return self._dataset(self.val_images, self.val_labels)

    def datasets(self) -> tuple[ImageDataset, ImageDataset]:
        return self._dataset(self.train_images, self.train_labels), self._dataset(
            self.test_images, self.test_labels
        )

    def _dataset(self, images: np.ndarray, labels: np.ndarray) -> ImageDataset:
        with warnings.catch_warnings():
            # Object-store arrays are read-only; loaders only read them (padding makes a copy).
            warnings.simplefilter("ignore", UserWarning)
            return ImageDataset(
                images=torch.from_numpy(images),
                labels=torch.from_numpy(labels),
                num_classes=self.num_classes,
                class_names=self.class_names,
                mean=self.mean,
                std=self.std,
                name=self.name,
            )


# What a search hands its trials: decoded images in memory, ImageNet's folders, or COCO.
TrialData = SharedDataset | ImageFolderData | CocoData


@dataclass(frozen=True)
class TrialPlan:
    """Everything about a trial that is fixed for the whole search (or one teacher's part of it)."""

    student: str
    num_classes: int
    dataset_name: str
    augment: str
    loss_mode: str
    base_recipe: Recipe
    teacher: TeacherArtifacts | None
    max_epochs: int
    compile: bool | None = None
    cpus_per_trial: float = 1.0


def trial_recipe(base: Recipe, hyperparameters: dict[str, Any]) -> Recipe:
    """The base recipe with one trial's sampled values (numbers typed as the fields are)."""
    return recipe_with(base, hyperparameters, source="trial config")


def run_trial(
    plan: TrialPlan,
    data: TrialData,
    hyperparameters: dict[str, Any],
    *,
    reporter: Reporter | None,
    checkpoint_dir: Path,
    resume_from: Path | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> FitResult:
    """Build one trial's loaders, student and teacher-logit source, and train it."""
    recipe = trial_recipe(plan.base_recipe, hyperparameters)
    loss_mode = hyperparameters.get("loss", plan.loss_mode)
    device = device or training_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(plan.cpus_per_trial)))
    if isinstance(data, CocoData):
        return run_detection_trial(
            plan, data, recipe, loss_mode,
            reporter=reporter, checkpoint_dir=checkpoint_dir, resume_from=resume_from,
            device=device, rank=rank, world_size=world_size,
        )  # fmt: skip
    source = (
        InMemoryData(*data.datasets(), plan.augment, val=data.validation())
        if isinstance(data, SharedDataset)
        else data
    )
    run = prepare_run(
        plan.student, source, recipe,
        device=device, compile=plan.compile, rank=rank, world_size=world_size,
        eval_batch_size=EVAL_BATCH_SIZE,
    )  # fmt: skip
    teacher = (
        teacher_logit_source(plan.teacher, run.train_loader, device)
        if LOSS_MODES[loss_mode].needs_teacher
        else None
    )
    return fit(
        run.model,
        run.train_loader,
        run.test_loader,
        recipe,
        val_loader=run.val_loader,
        identity=run.identity,
        loss_mode=loss_mode,
        teacher=teacher,
        device=device,
        acceleration=run.acceleration,
        reporter=reporter,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        stop_after_epochs=plan.max_epochs,
    )


def run_detection_trial(
    plan: TrialPlan,
    data: CocoData,
    recipe: Recipe,
    loss_mode: str,
    *,
    reporter: Reporter | None,
    checkpoint_dir: Path,
    resume_from: Path | None,
    device: torch.device,
    rank: int,
    world_size: int,
) -> FitResult:
    """A detection trial: the student detector and its COCO loaders; the teacher detector runs live on its proposals."""
    run = prepare_detection_run(plan.student, data, recipe, rank=rank, world_size=world_size)
    teacher = None
    if LOSS_MODES[loss_mode].needs_teacher:
        if plan.teacher is None:
            raise ValueError("a distillation trial needs teacher artifacts")
        teacher = load_detector(
            plan.teacher.model,
            plan.teacher.checkpoint,
            categories=data.category_names,
            category_ids=data.category_ids,
        )
    return fit_detector(
        run.model, run.train_loader, run.evaluations, recipe,
        identity=run.identity, loss_mode=loss_mode, teacher=teacher, device=device, reporter=reporter,
        checkpoint_dir=checkpoint_dir, resume_from=resume_from, stop_after_epochs=plan.max_epochs,
    )  # fmt: skip


def teacher_logit_source(artifacts: TeacherArtifacts | None, train_loader: Any, device: torch.device):
    """The exact logit cache when the search built one and this loader's views are finite; else the live teacher.

    The cache's hash is checked (once per process and file version): a damaged cache is reported
    in one line and the trial runs the live teacher instead, never the damaged logits. A teacher
    with an intervention (the validation's controls and gap experiments) is wrapped either way.
    """
    if artifacts is None:
        raise ValueError("a distillation trial needs teacher artifacts")
    source = _unwrapped_teacher_source(artifacts, train_loader, device)
    if artifacts.intervention.is_identity:
        return source
    groups = torch.tensor(artifacts.class_groups) if artifacts.class_groups is not None else None
    return IntervenedTeacher(source, artifacts.intervention, groups)


def _unwrapped_teacher_source(artifacts: TeacherArtifacts, train_loader: Any, device: torch.device):
    uses_finite_views = getattr(train_loader, "num_views", None) is not None
    if artifacts.cache_path and uses_finite_views and os.path.exists(artifacts.cache_path):
        try:
            return TeacherLogitCache.open(artifacts.cache_path, verify=True).to(device)
        except CorruptCacheError as error:
            print(f"dkd-tune: {error}; this trial runs the live teacher instead", file=sys.stderr, flush=True)
    model = load_teacher(artifacts.model, artifacts.checkpoint, num_classes=artifacts.num_classes)
    return LiveTeacher(model)
