"""The training loop every trial runs: a student trained with CE, KD, DKD, TCKD or NCKD, one epoch at a time.

`fit` reads top to bottom: per epoch it sets the learning rate and warm-up factor, runs the
training batches (teacher logits from a live teacher or from the exact logit cache), evaluates,
writes an atomic checkpoint and hands the epoch's metrics to a reporter. It imports torch only,
so it runs, is tested and is benchmarked without Ray or MLflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.losses import LOGGED_TERMS, LOSS_MODE_NAMES, LOSS_MODES, LossMode
from dkd_tune.core.recipes import Recipe
from dkd_tune.core.selection import epoch_selection_metric
from dkd_tune.engine.acceleration import Acceleration, compiled, memory_format, prepared_model
from dkd_tune.engine.checkpoints import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    existing_file,
    restore_training_state,
    save_best_model,
    save_training_state,
)
from dkd_tune.engine.phase_clock import PhaseClock
from dkd_tune.engine.run_setup import RunIdentity

# --------------------------------------------------------------------------------------------
# Settings and interfaces


class TeacherLogits(Protocol):
    """Where a batch's teacher logits come from: the live teacher or the exact logit cache."""

    def logits_for(self, batch: Any) -> torch.Tensor: ...


class LiveTeacher:
    """Runs the teacher on each batch, in eval mode and without gradients."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def logits_for(self, batch: Any) -> torch.Tensor:
        return self.model(batch.images)


@dataclass
class EpochReport:
    """What a reporter receives after each epoch."""

    epoch: int  # epochs completed so far (1-based), the unit ASHA counts in
    metrics: dict[str, float]
    checkpoint: Path | None  # the training checkpoint written after this epoch, if any
    status: str  # "running", "completed", "stopped" (at stop_after_epochs) or "diverged"


@dataclass
class FitResult:
    status: str  # "completed", "stopped" (at stop_after_epochs) or "diverged"
    epochs_completed: int
    # The test split's score: top-1 % for a classifier, COCO AP for a detector (`history` names which).
    final_test_score: float
    best_test_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None


Reporter = Callable[[EpochReport], None]


# --------------------------------------------------------------------------------------------
# The objective


def training_objective(
    loss_mode: str,
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor | None,
    labels: torch.Tensor,
    recipe: Recipe,
    warmup: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss to back-propagate and its unweighted parts (for logging), for one batch.

    CE weighted by `ce_weight`, plus the mode's distillation term (`dkd_tune.core.losses.LOSS_MODES`)
    times the warm-up factor.
    """
    mode = LOSS_MODES[loss_mode]
    ce = F.cross_entropy(logits_student.float(), labels)
    parts = {"ce": ce.detach()}
    total = recipe.ce_weight * ce
    if mode.distillation is None:
        return total, parts
    assert logits_teacher is not None
    distillation, terms = mode.distillation(logits_student, logits_teacher, labels, recipe)
    parts.update({name: term.detach() for name, term in terms.items()})
    return total + warmup * distillation, parts


# --------------------------------------------------------------------------------------------
# The loop


def fit(
    student: nn.Module,
    train_loader: Any,
    test_loader: Iterable,
    recipe: Recipe,
    *,
    identity: RunIdentity,
    loss_mode: str = "dkd",
    teacher: TeacherLogits | nn.Module | None = None,
    device: torch.device | str = "cpu",
    acceleration: Acceleration | None = None,
    reporter: Reporter | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    stop_after_epochs: int | None = None,
    val_loader: Iterable | None = None,
) -> FitResult:
    """Train `student` for `recipe.epochs` epochs (or until `stop_after_epochs`) and report each epoch.

    With `val_loader` (the validation split) each epoch also reports val_acc and val_loss.

    `train_loader` yields batches with `.images`, `.labels` (and `.indices`, `.view_ids` for the
    logit cache) and has `set_epoch(epoch)`, so an epoch's data depend only on the seed and the
    epoch: resuming needs nothing but the checkpoint. With torch.distributed initialised, the
    student is wrapped in DDP, metrics are summed over ranks, every rank calls the reporter with the
    same metrics and only rank 0 writes checkpoints.
    """
    mode = checked_loss_mode(loss_mode, teacher)
    device = torch.device(device)
    acceleration = acceleration or Acceleration.for_device(device)
    acceleration.apply_global_settings()
    teacher = _placed_teacher(teacher, device, acceleration) if mode.needs_teacher else None
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    torch.manual_seed(recipe.seed)
    student = prepared_model(student, acceleration).to(device, memory_format=memory_format(acceleration))
    optimizer = torch.optim.SGD(
        student.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    last_epoch = recipe.epochs if stop_after_epochs is None else min(recipe.epochs, stop_after_epochs)
    record = EpochRecorder(
        student, optimizer, identity, recipe, loss_mode, checkpoint_dir, reporter, last_epoch, "test_acc",
        chosen_by=epoch_selection_metric("classification", val_loader is not None),
    )  # fmt: skip
    if resume_from is not None:
        record.resume(resume_from, device)
    model = _runnable(student, device, acceleration)  # runs the batches; `student` holds the weights saved

    for epoch in range(record.start_epoch, last_epoch):
        lr, warmup = recipe.lr_at(epoch), recipe.warmup_factor_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loader.set_epoch(epoch)

        train = _train_epoch(
            model, train_loader, optimizer, teacher, mode, recipe, warmup, device, acceleration
        )
        test = evaluate(model, test_loader, device, acceleration)
        metrics = _epoch_metrics(epoch, train, test, lr, warmup, mode)
        if val_loader is not None:
            val = evaluate(model, val_loader, device, acceleration)
            metrics.update(val_acc=val["acc"], val_loss=val["loss"])
        diverged = not math.isfinite(train.sums["loss"])
        record.epoch_done(epoch, metrics, diverged)
        if diverged:
            break
    return record.result()


@dataclass
class EpochRecorder:
    """What a training loop (a classifier's or a detector's) does after each epoch, and its result.

    It keeps the chosen model (`best.pt`): the epoch with the best validation score `chosen_by`, or
    without a validation split the latest epoch, never one picked by its test score (the test split
    only reports). It reports the best test `score` so far, writes the resumable state (`last.pt`)
    and hands the epoch to the reporter. Every rank reports (Ray Train synchronises on it); only
    rank 0 writes checkpoints.
    """

    student: nn.Module
    optimizer: torch.optim.Optimizer
    identity: RunIdentity
    recipe: Recipe
    loss_mode: str
    checkpoint_dir: Path | None
    reporter: Reporter | None
    last_epoch: int  # where this call stops (the recipe's last epoch, or the caller's stop)
    score: str  # the test metric reported as best and final: "test_acc", or a detector's "test_ap"
    chosen_by: str | None = None  # the validation metric best.pt is chosen by ("val_acc", "val_ap")
    start_epoch: int = 0
    best: float = -math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    status: str = "completed"

    def resume(self, path: str | Path, device: torch.device) -> None:
        self.start_epoch, self.best, self.history = restore_training_state(
            path, self.student, self.optimizer, device
        )

    def epoch_done(self, epoch: int, metrics: dict[str, float], diverged: bool) -> None:
        writes = self.checkpoint_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0)
        value = metrics.get(self.score, 0.0)
        if not diverged and value > self.best:
            self.best = value
        if writes and not diverged and self._is_chosen(metrics):
            save_best_model(
                self.checkpoint_dir / BEST_CHECKPOINT, self.student, self.identity, self.recipe, metrics
            )
        metrics[f"best_{self.score}"] = max(self.best, 0.0)
        self.history.append(metrics)
        self.status = run_status(epoch + 1, self.recipe.epochs, self.last_epoch, diverged)
        checkpoint = None
        if writes and not diverged:
            checkpoint = self.checkpoint_dir / LAST_CHECKPOINT
            save_training_state(
                checkpoint, self.student, self.optimizer, self.identity, self.recipe, self.loss_mode,
                epoch + 1, self.best, self.history,
            )  # fmt: skip
        if self.reporter is not None:
            self.reporter(
                EpochReport(epoch=epoch + 1, metrics=metrics, checkpoint=checkpoint, status=self.status)
            )

    def _is_chosen(self, metrics: dict[str, float]) -> bool:
        """Whether this epoch's model becomes best.pt: a new best validation score, or the latest epoch."""
        if self.chosen_by is None:
            return True
        earlier = (report.get(self.chosen_by, -math.inf) for report in self.history)  # resumed ones too
        return metrics.get(self.chosen_by, -math.inf) > max(earlier, default=-math.inf)

    def result(self) -> FitResult:
        """`final_test_score` and `best_test_score` hold the score (a detector's: test AP)."""
        return FitResult(
            status=self.status if self.history else "completed",
            epochs_completed=self.history[-1]["epoch"] if self.history else self.start_epoch,
            final_test_score=self.history[-1].get(self.score, 0.0) if self.history else 0.0,
            best_test_score=max(self.best, 0.0),
            history=self.history,
            best_checkpoint=existing_file(self.checkpoint_dir, BEST_CHECKPOINT),
            last_checkpoint=existing_file(self.checkpoint_dir, LAST_CHECKPOINT),
        )


@dataclass
class EpochTraining:
    """One epoch's training pass: sums over its samples (summed over ranks) and where its time went."""

    sums: dict[str, float]  # "loss", "ce", each logged distillation term, "correct"
    count: int  # samples
    batches: int
    seconds: float
    phase_seconds: dict[str, float]  # data, teacher, student


def _train_epoch(
    model: nn.Module,
    train_loader: Any,
    optimizer: torch.optim.Optimizer,
    teacher: TeacherLogits | None,
    mode: LossMode,
    recipe: Recipe,
    warmup: float,
    device: torch.device,
    acceleration: Acceleration,
) -> EpochTraining:
    """Run the epoch's batches: teacher logits, student forward, objective, backward, SGD step."""
    model.train()
    clock = PhaseClock(device)
    sums = RunningSums(("loss", "ce", *LOGGED_TERMS), device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    started = time.perf_counter()
    clock.start()
    for batch in train_loader:
        clock.lap("data")
        if acceleration.cuda_graphs:  # a new step: CUDA graphs may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        with acceleration.autocast(device):
            logits_teacher = teacher.logits_for(batch) if teacher is not None else None
        clock.lap("teacher")
        with acceleration.autocast(device):
            logits_student = model(batch.images)
            loss, parts = training_objective(
                mode.name, logits_student, logits_teacher, batch.labels, recipe, warmup
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.lap("student")
        sums.add(batch.labels.numel(), loss=loss.detach(), **parts)
        correct += (logits_student.detach().argmax(1) == batch.labels).sum()
    totals, count, batches = sums.collect(correct=correct)
    return EpochTraining(totals, count, batches, time.perf_counter() - started, clock.seconds())


class RunningSums:
    """Sample-weighted sums of named per-batch values, kept on the device (reading them each step
    would stall a GPU) and summed over ranks once, at the end of the epoch."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.device = device
        self.zero = torch.zeros((), device=device)  # a value the batch does not have
        self.totals = torch.zeros(len(names), device=device, dtype=torch.float64)
        self.count = self.batches = 0

    def add(self, size: int, **values: torch.Tensor) -> None:
        # A handful of small kernels and no host-device copy: nothing here waits for the device.
        batch = torch.stack([values.get(name, self.zero) for name in self.names]).double()
        self.totals.add_(batch, alpha=size)
        self.count, self.batches = self.count + size, self.batches + 1

    def collect(self, **extra: torch.Tensor) -> tuple[dict[str, float], int, int]:
        """(sums by name, samples, batches), over all ranks; `extra` sums join under their names."""
        counts = torch.tensor([self.count, self.batches], dtype=torch.float64, device=self.device)
        everything = torch.cat([self.totals, *(value.double().view(1) for value in extra.values()), counts])
        if dist.is_initialized():
            dist.all_reduce(everything)
        values = everything.tolist()
        named = dict(zip((*self.names, *extra), values[:-2], strict=True))
        return named, int(values[-2]), int(values[-1])


def _epoch_metrics(
    epoch: int, train: EpochTraining, test: dict[str, float], lr: float, warmup: float, mode: LossMode
) -> dict[str, float]:
    """The metrics of one epoch, as every reporter (Ray Tune, MLflow, the console) receives them."""
    count, per_batch_ms = train.count, 1000 / max(train.batches, 1)
    metrics = {
        "epoch": epoch + 1,
        "train_loss": train.sums["loss"] / count,
        "train_ce": train.sums["ce"] / count,
        "train_acc": 100.0 * train.sums["correct"] / count,
        "test_acc": test["acc"],
        "test_acc_top5": test["acc_top5"],
        "test_loss": test["loss"],
        "lr": lr,
        "warmup_factor": warmup if mode.needs_teacher else 0.0,
        "epoch_time_s": train.seconds,
        "images_per_s": count / train.seconds,
        "time_data_ms": per_batch_ms * train.phase_seconds["data"],
        "time_teacher_ms": per_batch_ms * train.phase_seconds["teacher"],
        "time_student_ms": per_batch_ms * train.phase_seconds["student"],
        "diverged": float(not math.isfinite(train.sums["loss"])),
    }
    metrics.update({f"train_{term}": train.sums[term] / count for term in mode.terms})
    return metrics


def run_status(epochs_done: int, recipe_epochs: int, last_epoch: int, diverged: bool) -> str:
    """What a run is after an epoch (the word every reporter receives); shared with the detection loop."""
    if diverged:
        return "diverged"
    if epochs_done == recipe_epochs:
        return "completed"
    if epochs_done == last_epoch:
        return "stopped"  # ended where the caller asked, before the recipe's last epoch
    return "running"


def checked_loss_mode(loss_mode: str, teacher: Any) -> LossMode:
    """The loss mode's row, refusing an unknown mode or a distillation mode without a teacher (one line)."""
    if loss_mode not in LOSS_MODES:
        raise UserInputError(
            f"loss mode {loss_mode!r} is not valid; expected one of {', '.join(LOSS_MODE_NAMES)}"
        )
    mode = LOSS_MODES[loss_mode]
    if mode.needs_teacher and teacher is None:
        raise UserInputError(f"loss mode {loss_mode!r} needs a teacher (or a teacher-logit cache)")
    return mode


def _placed_teacher(teacher: Any, device: torch.device, acceleration: Acceleration) -> TeacherLogits:
    """The teacher as a logit source; a live one (loaded anywhere, a trial loads it on the CPU) beside the student."""
    if isinstance(teacher, nn.Module):
        teacher = LiveTeacher(teacher)
    if isinstance(teacher, LiveTeacher):
        teacher.model.to(device, memory_format=memory_format(acceleration))
    return teacher


def _runnable(student: nn.Module, device: torch.device, acceleration: Acceleration) -> nn.Module:
    """What runs the batches: the student, wrapped in DDP when distributed, compiled when asked."""
    model: nn.Module = student
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    return compiled(model, acceleration)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, acceleration: Acceleration | None = None
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy over a loader, summed over ranks."""
    acceleration = acceleration or Acceleration()
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top1, top5
    count = 0
    for batch in loader:
        with acceleration.autocast(device):
            logits = model(batch.images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == batch.labels.unsqueeze(1)
        count += batch.labels.numel()
        sums += torch.stack(
            [
                F.cross_entropy(logits, batch.labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
            ]
        )
    sums = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"acc": 100.0 * top1 / count, "acc_top5": 100.0 * top5 / count, "loss": loss / count}
