"""A search's data and teachers, prepared once: the decoded dataset in Ray's object store, each teacher in a Ray task (train or load, gap, logit cache)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dkd_tune.config.schema import SearchSpaceFile, TeacherConfig
from dkd_tune.config.search_state import SearchState
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.losses import LOSS_MODES
from dkd_tune.search.options import SearchOptions
from dkd_tune.search.verbosity import NORMAL, QUIET, VERBOSE
from dkd_tune.teacher.preparation import TeacherArtifacts

if TYPE_CHECKING:
    import ray

    from dkd_tune.data.shared import TrialData
    from dkd_tune.data.spec import DataSpec


def load_data(space: SearchSpaceFile, options: SearchOptions) -> tuple[DataSpec, TrialData]:
    """(data spec, what the trials share) of the search, read before anything is written or started."""

    data_spec = space.data_spec
    return data_spec, shared_data(data_spec, space, options)


def launch_teacher_preparation(
    space: SearchSpaceFile,
    data_spec: DataSpec,
    shared_ref: ray.ObjectRef,
    experiment_dir: Path,
    state: SearchState,
    options: SearchOptions,
    baseline_cpus: float,
) -> dict[str, ray.ObjectRef]:
    """Start one Ray task per teacher not prepared yet (load or train, gap, cache); returns their refs."""
    import ray

    pending = {}
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    for teacher in space.teachers:
        if teacher.label in state.teachers:
            continue
        cache_dir, cache_note = cache_decision(space, data_spec, experiment_dir)
        gpu = 1 if space.resources.gpu > 0 else 0
        cpus = max(1, int(space.resources.cpu)) if gpu else max(1, total_cpus - int(baseline_cpus))
        options.log(
            f"dkd-tune: preparing teacher '{teacher.label}' ({teacher.model}); logit cache: {cache_note}"
        )
        task = ray.remote(prepare_teacher_task).options(num_cpus=cpus, num_gpus=gpu, max_retries=0)
        pending[teacher.label] = task.remote(
            teacher,
            space.student,
            data_spec,
            shared_ref,
            str(search_teachers_dir(experiment_dir, options)),
            cache_dir,
            cache_note,
            cpus,
            options.verbosity,
        )
    return pending


def collect_teachers(
    space: SearchSpaceFile,
    pending: dict[str, ray.ObjectRef],
    data_spec: DataSpec,
    state: SearchState,
    save_state: Callable[[], None],
    options: SearchOptions,
) -> dict[str, TeacherArtifacts]:
    """Wait for the teacher tasks; record each teacher's artifacts, gap and auto-beta in the state."""
    import ray

    artifacts: dict[str, TeacherArtifacts] = {}
    for teacher in space.teachers:
        if teacher.label not in pending:
            artifacts[teacher.label] = state.teachers[teacher.label]
            continue
        prepared = ray.get(pending[teacher.label])
        prepared = dataclasses.replace(prepared, predicted_beta=predict_beta(prepared, data_spec, options))
        artifacts[teacher.label] = prepared
        state.teachers[teacher.label] = prepared
        save_state()
        gap = prepared.gap
        on = "R-CNN head on object proposals, " if gap.background_samples else ""
        options.log(
            f"dkd-tune: teacher '{teacher.label}': {on}train top-1 {gap.train_acc:.2f}%, test top-1 {gap.test_acc:.2f}%, "
            f"mean logit gap {gap.mean:.3f}"
            + (f" (objects; background {gap.background_mean:.3f})" if gap.background_samples else "")
            + (f", auto-beta {prepared.predicted_beta:.2f}" if prepared.predicted_beta else "")
            + (
                ""
                if prepared.intervention.is_identity
                else f" (intervention: {prepared.intervention.describe()})"
            )
        )
    return artifacts


def shared_data(data_spec: DataSpec, space: SearchSpaceFile, options: SearchOptions) -> TrialData:
    """What the trials share: the decoded dataset (read once, here), or for ImageNet its folders."""
    from dkd_tune.data import ImageFolderData, dataset_num_classes, load_coco_data, load_splits
    from dkd_tune.data.shared import SharedDataset

    storage = data_spec.kind.storage
    if storage == "coco-folder":
        # Images are decoded by each trial's loader: in its own threads on a CPU, by workers beside a GPU.
        workers = max(1, int(space.resources.cpu)) if space.resources.gpu > 0 else 0
        options.log(f"dkd-tune: checking {data_spec.name} in {data_spec.root}")
        return load_coco_data(data_spec, workers=workers)
    if storage == "image-folder":
        # Folder data is read by each trial's DataLoader workers, one per CPU the trial asks for.
        return ImageFolderData(
            data_spec.root, dataset_num_classes(data_spec), workers=max(1, int(space.resources.cpu))
        )
    options.log(f"dkd-tune: loading {data_spec.name} from {data_spec.root}")
    train, validation, test = load_splits(data_spec)
    return SharedDataset.from_datasets(train, test, validation)


def prepare_teacher_task(
    teacher: TeacherConfig,
    student: str,
    data_spec: DataSpec,
    shared: TrialData,
    teachers_dir: str,
    cache_dir: str | None,
    cache_note: str,
    cpus: int,
    verbosity: int = NORMAL,
) -> TeacherArtifacts:
    import torch

    from dkd_tune.core.recipes import resolve_recipe
    from dkd_tune.engine.devices import training_device
    from dkd_tune.tasks import TeacherRequest, task_for

    torch.set_num_threads(cpus)
    train_recipe = None
    if teacher.train is not None:
        train_recipe = resolve_recipe(
            teacher.train.recipe, student=teacher.model, overrides=teacher.train.overrides
        )
    request = TeacherRequest(
        label=teacher.label,
        model=teacher.model,
        checkpoint=teacher.checkpoint,
        train_recipe=train_recipe,
        augment=data_spec.augment,
        teachers_dir=Path(teachers_dir),
        cache_dir=Path(cache_dir) if cache_dir else None,
        cache_note=cache_note,
        device=training_device(),
        log=print if verbosity > QUIET else _silent,
        progress=verbosity >= VERBOSE,
        intervention=teacher.intervention,
    )
    return task_for(data_spec.kind.task).prepare_teacher(request, shared)


def _silent(line: str) -> None:
    """The log of a teacher prepared under -q."""


def search_teachers_dir(experiment_dir: Path, options: SearchOptions) -> Path:
    """Trained teachers live beside the searches of a storage folder, keyed by recipe and data, so any
    search or validation there that asks for the same teacher reuses it."""
    return Path(options.teachers_dir) if options.teachers_dir else experiment_dir.parent / "teachers"


def cache_decision(
    space: SearchSpaceFile, data_spec: DataSpec, experiment_dir: Path
) -> tuple[str | None, str]:
    """Where to build the exact teacher-logit cache, or None, and why (for the log)."""
    from dkd_tune.data.train_loader import CIFAR_PADDING
    from dkd_tune.data.views import num_views
    from dkd_tune.tasks import task_for

    mode = space.cache.teacher_logits
    no_cache = task_for(data_spec.kind.task).no_logit_cache
    if no_cache is not None:
        return None, no_cache
    if mode == "off":
        return None, "off (disabled in the file)"
    if data_spec.augment == "autoaugment":
        return None, "off (views are unbounded with AutoAugment)"
    if data_spec.kind.storage == "image-folder":
        return None, f"off (views are unbounded with {data_spec.name}'s random-resized crops)"
    if not LOSS_MODES[space.loss].needs_teacher:
        return None, f"off (no teacher in {space.loss}-only trials)"
    directory = (
        Path(space.cache.dir).expanduser() if space.cache.dir else experiment_dir.parent / "teacher_logits"
    )
    views = num_views(CIFAR_PADDING, flip=True) if data_spec.augment == "standard" else 1
    # Building costs one teacher pass per view; trials without it cost one per trial-epoch.
    trial_epochs = space.search.num_samples * space.max_epochs()
    if mode == "auto" and trial_epochs < views:
        return (
            None,
            f"off (auto: {views} views cost more teacher passes than at most {trial_epochs} trial-epochs)",
        )
    return str(directory), f"on ({views} views per image, in {directory})"


def predict_beta(prepared: TeacherArtifacts, data_spec: DataSpec, options: SearchOptions) -> float | None:
    from dkd_tune.teacher.auto_beta import default_calibration_or_none, suggest_beta

    calibration = default_calibration_or_none(data_spec.family)
    if calibration is None or prepared.gap is None:
        return None
    try:
        suggestion = suggest_beta(calibration, prepared.gap, prepared.model)
    except UserInputError as error:  # e.g. a feature this teacher's measurement lacks: no prediction
        options.log(f"dkd-tune: auto-beta: no prediction for teacher '{prepared.label}': {error}")
        return None
    for warning in suggestion.warnings:
        options.log(f"dkd-tune: auto-beta: {warning}")
    return float(suggestion.beta)
