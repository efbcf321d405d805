"""The task interface: what a classification or a detection trial and teacher each need, one class per task.

A search, a trial and a teacher's preparation ask `task_for(kind)` (the dataset row's `task`) and
call the same methods whichever it is; the pairs below them (`engine.loop`/`engine.detection_loop`,
`engine.run_setup`/`engine.detection_setup`, `teacher.gap`/`teacher.detection_gap`,
`teacher.preparation`/`teacher.detector_preparation`) share their results' types (`FitResult`,
`RunIdentity`, `LogitGapStats`, `TeacherArtifacts`) and are chosen here only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dkd_tune.core.losses import LOSS_MODES
from dkd_tune.core.recipes import Recipe
from dkd_tune.data import CocoData, ImageFolderData, InMemoryData
from dkd_tune.data.shared import SharedDataset, TrialData
from dkd_tune.engine.detection_loop import fit_detector
from dkd_tune.engine.detection_setup import prepare_detection_run
from dkd_tune.engine.loop import FitResult, LiveTeacher, Reporter, fit
from dkd_tune.engine.run_setup import prepare_run
from dkd_tune.models import load_teacher
from dkd_tune.models.detection import load_detector
from dkd_tune.teacher.detector_preparation import NO_CACHE, prepare_detection_teacher
from dkd_tune.teacher.logit_cache import CorruptCacheError, TeacherLogitCache
from dkd_tune.teacher.logit_interventions import NO_INTERVENTION, IntervenedTeacher, LogitIntervention
from dkd_tune.teacher.preparation import TeacherArtifacts, prepare_folder_teacher, prepare_teacher

EVAL_BATCH_SIZE = 512


@dataclass(frozen=True)
class TrialRun:
    """One trial as a task runs it: its student, data, recipe and loss, and where it reports and saves."""

    student: str
    data: TrialData
    recipe: Recipe
    loss_mode: str
    teacher: TeacherArtifacts | None
    augment: str
    max_epochs: int
    compile: bool | None
    reporter: Reporter | None
    checkpoint_dir: Path
    resume_from: Path | None
    device: torch.device
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class TeacherRequest:
    """One teacher to load (or train once), measure and, where the task allows, cache."""

    label: str
    model: str
    checkpoint: str | None
    train_recipe: Recipe | None
    augment: str
    teachers_dir: Path
    cache_dir: Path | None
    cache_note: str
    device: torch.device
    log: Callable[[str], None] = print
    progress: bool = False
    intervention: LogitIntervention = NO_INTERVENTION


class Task(Protocol):
    name: str
    # Why a teacher's logits are never cached for this task (None: the search decides).
    no_logit_cache: str | None

    def run_trial(self, run: TrialRun) -> FitResult:
        """Build the trial's loaders, student and teacher, and train it."""

    def prepare_teacher(self, request: TeacherRequest, data: TrialData) -> TeacherArtifacts:
        """Load (or train once) the teacher, measure its logit gap, and build its logit cache if it can."""


class ClassificationTask:
    """Image classification: in-memory data augmented on the device, or image folders read by workers."""

    name = "classification"
    no_logit_cache = None

    def run_trial(self, run: TrialRun) -> FitResult:
        data = run.data
        source = (
            InMemoryData(*data.datasets(), run.augment, val=data.validation())
            if isinstance(data, SharedDataset)
            else data
        )
        prepared = prepare_run(
            run.student, source, run.recipe,
            device=run.device, compile=run.compile, rank=run.rank, world_size=run.world_size,
            eval_batch_size=EVAL_BATCH_SIZE,
        )  # fmt: skip
        teacher = (
            teacher_logit_source(run.teacher, prepared.train_loader, run.device)
            if LOSS_MODES[run.loss_mode].needs_teacher
            else None
        )
        return fit(
            prepared.model,
            prepared.train_loader,
            prepared.test_loader,
            run.recipe,
            val_loader=prepared.val_loader,
            identity=prepared.identity,
            loss_mode=run.loss_mode,
            teacher=teacher,
            device=run.device,
            acceleration=prepared.acceleration,
            reporter=run.reporter,
            checkpoint_dir=run.checkpoint_dir,
            resume_from=run.resume_from,
            stop_after_epochs=run.max_epochs,
        )

    def prepare_teacher(self, request: TeacherRequest, data: TrialData) -> TeacherArtifacts:
        if isinstance(data, ImageFolderData):  # unbounded views: given, never trained or cached here
            return prepare_folder_teacher(
                label=request.label, model=request.model, checkpoint=request.checkpoint, data=data,
                device=request.device, log=request.log,
            )  # fmt: skip
        train_set, test_set = data.datasets()
        return prepare_teacher(
            validation_set=data.validation(),
            intervention=request.intervention,
            class_groups=data.class_groups,
            label=request.label,
            model=request.model,
            checkpoint=request.checkpoint,
            train_recipe=request.train_recipe,
            train_set=train_set,
            test_set=test_set,
            augment=request.augment,
            teachers_dir=request.teachers_dir,
            cache_dir=request.cache_dir,
            cache_note=request.cache_note,
            device=request.device,
            log=request.log,
            progress=request.progress,
        )


class DetectionTask:
    """DKD on a Faster R-CNN's R-CNN head: COCO-format data, the teacher run live on the student's proposals."""

    name = "detection"
    no_logit_cache = NO_CACHE

    def run_trial(self, run: TrialRun) -> FitResult:
        data = run.data
        if not isinstance(data, CocoData):
            raise TypeError(f"a detection trial reads COCO-format data, not {type(data).__name__}")
        prepared = prepare_detection_run(
            run.student, data, run.recipe, rank=run.rank, world_size=run.world_size
        )
        teacher = None
        if LOSS_MODES[run.loss_mode].needs_teacher:
            if run.teacher is None:
                raise ValueError("a distillation trial needs teacher artifacts")
            teacher = load_detector(
                run.teacher.model,
                run.teacher.checkpoint,
                categories=data.category_names,
                category_ids=data.category_ids,
            )
        return fit_detector(
            prepared.model, prepared.train_loader, prepared.evaluations, run.recipe,
            identity=prepared.identity, loss_mode=run.loss_mode, teacher=teacher, device=run.device,
            reporter=run.reporter, checkpoint_dir=run.checkpoint_dir, resume_from=run.resume_from,
            stop_after_epochs=run.max_epochs,
        )  # fmt: skip

    def prepare_teacher(self, request: TeacherRequest, data: TrialData) -> TeacherArtifacts:
        if not isinstance(data, CocoData):
            raise TypeError(f"a detection teacher reads COCO-format data, not {type(data).__name__}")
        return prepare_detection_teacher(
            label=request.label, model=request.model, checkpoint=request.checkpoint,
            train_recipe=request.train_recipe, data=data, teachers_dir=request.teachers_dir,
            device=request.device, log=request.log,
        )  # fmt: skip


TASKS: dict[str, Task] = {task.name: task for task in (ClassificationTask(), DetectionTask())}


def task_for(name: str) -> Task:
    """The task a dataset row names (`DatasetKind.task`)."""
    return TASKS[name]


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
