"""Single training runs outside a search: `dkd-tune train-teacher` and `dkd-tune distill`.

Each run loads the data once, trains with `engine.loop.fit`, prints one line per epoch and a summary,
keeps `best.pt` (a model checkpoint any command can load) and `last.pt` (to resume) in its
output folder, and logs to MLflow when a tracking URI is set (flag or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dkd_tune.config.overrides import parse_set_overrides
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.recipes import Recipe, resolve_recipe


@dataclass
class RunSettings:
    """What a single run needs besides its networks."""

    data: str
    out_dir: Path
    recipe: str
    overrides: Sequence[str] = ()
    tracking_uri: str | None = None
    experiment: str | None = None
    resume: bool = False
    device: str | None = None
    log: Callable[[str], None] = print


def check_settings(settings: RunSettings) -> None:
    """The tracking URI and device are usable, before any data or weights are read."""
    from dkd_tune.config.tracking_uri import check_tracking_uri
    from dkd_tune.engine.devices import chosen_device

    check_tracking_uri(settings.tracking_uri, "--tracking-uri")
    check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    chosen_device(settings.device)


def train_teacher(model: str, settings: RunSettings) -> Any:
    """Train `model` with cross-entropy only (the teacher recipe by default); a detector with its own losses."""
    from dkd_tune.models import model_info
    from dkd_tune.models.detection import is_detector

    check_settings(settings)
    recipe = resolve_recipe(
        settings.recipe, student=model, overrides=parse_set_overrides(settings.overrides), source="--set"
    )
    if is_detector(model):
        return _train_detector(
            student=model,
            recipe=recipe,
            loss_mode="ce",
            teacher=None,
            kind="train-teacher",
            settings=settings,
        )
    model_info(model)  # an unknown name fails here, with the closest valid names
    return _train(
        student=model, recipe=recipe, loss_mode="ce", teacher=None, kind="train-teacher", settings=settings
    )


def distill(
    student: str, teacher_model: str, teacher_checkpoint: str, loss_mode: str, settings: RunSettings
) -> Any:
    """Distil `student` from a trained teacher with one loss mode (dkd by default)."""
    from dkd_tune.data import dataset_num_classes, dataset_problem, parse_data_spec
    from dkd_tune.models import load_teacher, model_info
    from dkd_tune.models.detection import is_detector

    check_settings(settings)
    if is_detector(student) or is_detector(teacher_model):
        return _distill_detector(student, teacher_model, teacher_checkpoint, loss_mode, settings)
    model_info(student)
    model_info(teacher_model)
    recipe = resolve_recipe(
        settings.recipe,
        student=student,
        teacher=teacher_model,
        overrides=parse_set_overrides(settings.overrides),
        source="--set",
    )
    spec = parse_data_spec(settings.data, source="--data")
    problem = dataset_problem(spec)
    if problem:
        raise UserInputError(f"--data: {problem}")
    teacher = load_teacher(teacher_model, teacher_checkpoint, num_classes=dataset_num_classes(spec))
    return _train(
        student=student,
        recipe=recipe,
        loss_mode=loss_mode,
        teacher=teacher,
        kind="distill",
        settings=settings,
        extra_params={"teacher_model": teacher_model, "teacher_checkpoint": str(teacher_checkpoint)},
    )


def _train(
    *,
    student: str,
    recipe: Recipe,
    loss_mode: str,
    teacher: Any,
    kind: str,
    settings: RunSettings,
    extra_params: dict[str, Any] | None = None,
) -> Any:

    from dkd_tune.data import InMemoryData, load_train_test, parse_data_spec
    from dkd_tune.engine.checkpoints import LAST_CHECKPOINT
    from dkd_tune.engine.devices import chosen_device
    from dkd_tune.engine.loop import fit
    from dkd_tune.engine.run_setup import prepare_run

    spec = parse_data_spec(settings.data, source="--data")
    device = chosen_device(settings.device)
    resume_from = settings.out_dir / LAST_CHECKPOINT
    if resume_from.exists() and not settings.resume:
        raise UserInputError(
            f"--out {settings.out_dir}: already holds a run ({LAST_CHECKPOINT}); pass --resume to continue it or choose another --out"
        )
    train_set, test_set = load_train_test(spec)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    run = prepare_run(student, InMemoryData(train_set, test_set, spec.augment), recipe, device=device)
    noise = getattr(train_set, "label_noise_rate", 0.0)
    settings.log(
        f"dkd-tune {kind}: {student} on {spec.name} ({len(train_set.labels)} train / {len(test_set.labels)} test images, "
        f"{train_set.num_classes} classes{f', realised label noise {noise:.3f}' if noise else ''}), loss {loss_mode}, "
        f"{recipe.epochs} epochs, device {device}"
    )
    params = {
        **recipe.to_dict(),
        "loss": loss_mode,
        "model": student,
        "dataset": spec.name,
        "label_noise_rate": noise,
        **(extra_params or {}),
    }
    with _tracked_run(kind, settings, student, params) as log_epoch:

        def report(epoch_report) -> None:
            metrics = epoch_report.metrics
            settings.log(
                f"epoch {epoch_report.epoch:>3}/{recipe.epochs}  loss {metrics['train_loss']:.4f}  "
                f"train {metrics['train_acc']:.2f}%  test {metrics['test_acc']:.2f}% (best {metrics['best_test_acc']:.2f}%)  "
                f"lr {metrics['lr']:.4g}  {metrics['images_per_s']:.0f} img/s"
            )
            log_epoch(epoch_report)

        result = fit(
            run.model, run.train_loader, run.test_loader, recipe,
            identity=run.identity, loss_mode=loss_mode, teacher=teacher, device=device, acceleration=run.acceleration,
            reporter=report, checkpoint_dir=settings.out_dir, resume_from=resume_from if resume_from.exists() else None,
        )  # fmt: skip
        log_epoch(None, result=result)
    settings.log(
        f"dkd-tune {kind}: {result.status} after {result.epochs_completed} epochs; final test top-1 {result.final_test_score:.2f}%, "
        f"best {result.best_test_score:.2f}%; kept (last epoch): {result.best_checkpoint}"
    )
    return result


def _distill_detector(
    student: str, teacher_model: str, teacher_checkpoint: str, loss_mode: str, settings: RunSettings
) -> Any:
    """`distill` for detectors: DKD on the student's R-CNN head with the teacher's head on its proposals."""
    from dkd_tune.data import load_coco_data, parse_data_spec
    from dkd_tune.models.detection import detector_info, load_detector

    for name, role in ((student, "--student"), (teacher_model, "--teacher-model")):
        try:
            detector_info(name)
        except UserInputError as error:
            raise UserInputError(f"{role}: a detector distils from a detector; {error}") from None
    recipe = resolve_recipe(
        settings.recipe,
        student=student,
        teacher=teacher_model,
        overrides=parse_set_overrides(settings.overrides),
        source="--set",
    )
    data = load_coco_data(parse_data_spec(settings.data, source="--data"))
    teacher = load_detector(
        teacher_model, teacher_checkpoint, categories=data.category_names, category_ids=data.category_ids
    )
    return _train_detector(
        student=student, recipe=recipe, loss_mode=loss_mode, teacher=teacher, kind="distill", settings=settings,
        extra_params={"teacher_model": teacher_model, "teacher_checkpoint": str(teacher_checkpoint)},
    )  # fmt: skip


def _train_detector(
    *,
    student: str,
    recipe: Recipe,
    loss_mode: str,
    teacher: Any,
    kind: str,
    settings: RunSettings,
    extra_params: dict[str, Any] | None = None,
) -> Any:
    """One detection run (`train-teacher` or `distill` of a detector): COCO-format data, COCO AP per epoch."""
    from dkd_tune.data import load_coco_data, parse_data_spec
    from dkd_tune.engine.checkpoints import LAST_CHECKPOINT
    from dkd_tune.engine.detection_loop import fit_detector
    from dkd_tune.engine.detection_setup import prepare_detection_run
    from dkd_tune.engine.devices import chosen_device

    spec = parse_data_spec(settings.data, source="--data")
    if not spec.is_detection:
        raise UserInputError(
            f"--data: {student} is a detector and needs COCO-format data (coco:DIR or synthetic-coco:DIR), "
            f"not {spec.name}"
        )
    device = chosen_device(settings.device)
    resume_from = settings.out_dir / LAST_CHECKPOINT
    if resume_from.exists() and not settings.resume:
        raise UserInputError(
            f"--out {settings.out_dir}: already holds a run ({LAST_CHECKPOINT}); pass --resume to continue it or choose another --out"
        )
    data = load_coco_data(spec)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    run = prepare_detection_run(student, data, recipe)
    settings.log(
        f"dkd-tune {kind}: {student} on {spec.name} ({len(data.category_ids)} categories), loss {loss_mode}, "
        f"{recipe.epochs} epochs, device {device}"
    )
    params = {
        **recipe.to_dict(),
        "loss": loss_mode,
        "model": student,
        "dataset": spec.name,
        **(extra_params or {}),
    }
    with _tracked_run(kind, settings, student, params) as log_epoch:

        def report(epoch_report) -> None:
            metrics = epoch_report.metrics
            settings.log(
                f"epoch {epoch_report.epoch:>3}/{recipe.epochs}  loss {metrics['train_loss']:.4f}  "
                f"test AP {metrics['test_ap']:.2f} (best {metrics['best_test_ap']:.2f})  lr {metrics['lr']:.4g}"
            )
            log_epoch(epoch_report)

        result = fit_detector(
            run.model, run.train_loader, run.evaluations, recipe, identity=run.identity, loss_mode=loss_mode,
            teacher=teacher, device=device, reporter=report, checkpoint_dir=settings.out_dir,
            resume_from=resume_from if resume_from.exists() else None,
        )  # fmt: skip
        log_epoch(None, result=result)
    settings.log(
        f"dkd-tune {kind}: {result.status} after {result.epochs_completed} epochs; final test AP "
        f"{result.final_test_score:.2f}, best {result.best_test_score:.2f}; kept: {result.best_checkpoint}"
    )
    return result


@contextlib.contextmanager
def _tracked_run(
    kind: str, settings: RunSettings, model: str, params: dict[str, Any]
) -> Iterator[Callable[..., None]]:
    """Yield an epoch logger: MLflow when a tracking URI is set, else nothing."""
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        yield lambda *args, **kwargs: None
        return
    from dkd_tune.tracking.runs import TAG_STATUS, command_run, now_ms, numeric_metrics

    with command_run(kind, settings.experiment or kind, uri, run_name=f"{kind}-{model}") as (store, run_id):
        store.log_params(run_id, params)

        def log_epoch(epoch_report, result=None) -> None:
            if epoch_report is not None:
                store.log_metrics(run_id, numeric_metrics(epoch_report.metrics), epoch_report.epoch, now_ms())
            elif result is not None:
                store.set_tags(run_id, {TAG_STATUS: result.status})
                if result.best_checkpoint:
                    store.log_artifact(run_id, result.best_checkpoint)

        yield log_epoch
