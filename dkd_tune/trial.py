"""One search trial: what is fixed for a search's trials (the plan) and the `fit` call one trial's values become.

A search prepares a `TrialPlan` (what is fixed: student, recipe, loss, teacher artifacts, task) and
the data every trial shares (`data.shared`: for in-memory data, decoded arrays that Ray's object
store hands to every trial without a copy) once; `run_trial` turns them plus one trial's sampled
hyperparameters into a `tasks.TrialRun` that the plan's task (classification or detection) trains.
Torch only: a trainable is a thin adapter around this, and this runs without Ray in tests and
benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dkd_tune.core.recipes import Recipe, recipe_with
from dkd_tune.data.shared import TrialData
from dkd_tune.engine.devices import training_device
from dkd_tune.engine.loop import FitResult, Reporter
from dkd_tune.tasks import TrialRun, task_for
from dkd_tune.teacher.preparation import TeacherArtifacts


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
    task: str = "classification"  # the dataset row's task (`tasks.TASKS`)


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
    run = TrialRun(
        student=plan.student, data=data, recipe=recipe, loss_mode=loss_mode, teacher=plan.teacher,
        augment=plan.augment, max_epochs=plan.max_epochs, compile=plan.compile, reporter=reporter,
        checkpoint_dir=checkpoint_dir, resume_from=resume_from, device=device, rank=rank, world_size=world_size,
    )  # fmt: skip
    return task_for(plan.task).run_trial(run)
