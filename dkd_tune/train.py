"""The training loop every trial runs: a student trained with CE, KD, DKD, TCKD or NCKD, one epoch at a time.

`fit` reads top to bottom: per epoch it sets the learning rate and warm-up factor, runs the
training batches (teacher logits from a live teacher or from the exact logit cache), evaluates,
writes an atomic checkpoint and hands the epoch's metrics to a reporter. It imports torch only,
so it runs, is tested and is benchmarked without Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from dkd_tune.checkpoint import load_checkpoint, save_checkpoint
from dkd_tune.errors import UserInputError
from dkd_tune.losses import decoupled_terms, kd_loss
from dkd_tune.recipes import Recipe

LOSS_MODES = ("ce", "kd", "dkd", "tckd", "nckd")
TEACHERLESS_MODES = ("ce",)
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


# --------------------------------------------------------------------------------------------
# Settings and interfaces


@dataclass(frozen=True)
class Acceleration:
    """Speed settings. `for_device` turns everything on for CUDA and off for the CPU."""

    autocast_dtype: torch.dtype | None = None  # bf16 on CUDA: halves activation traffic, no loss scaling
    channels_last: bool = False  # NHWC convolutions run on tensor cores without transposes
    compile: bool = False  # torch.compile fuses the small CIFAR layers; pays off over long runs
    tf32: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def for_device(cls, device: torch.device, *, compile: bool | None = None) -> Acceleration:
        if device.type != "cuda":
            return cls(compile=bool(compile))
        return cls(
            autocast_dtype=torch.bfloat16,
            channels_last=True,
            compile=True if compile is None else compile,
            tf32=True,
            cudnn_benchmark=True,
        )

    def apply_global_settings(self) -> None:
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @property
    def input_dtype(self) -> torch.dtype:
        """Dtype the loaders should produce: the autocast dtype avoids one cast per batch."""
        return self.autocast_dtype or torch.float32


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
    final_test_acc: float
    best_test_acc: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records about the network it holds, so it can be reloaded without guessing."""

    arch: str
    num_classes: int
    dataset: str = ""
    input_size: int = 32
    mean: tuple[float, ...] = ()  # the input normalisation it was trained with (used by the probe)
    std: tuple[float, ...] = ()


@dataclass
class PreparedRun:
    """A seeded student, its loaders on the training device and the speed settings they share."""

    model: nn.Module
    train_loader: Any
    test_loader: Any
    acceleration: Acceleration
    identity: RunIdentity
    val_loader: Any = None  # the validation split's loader, when the data hold one out


def prepare_run(
    arch: str,
    data: Any,
    recipe: Recipe,
    *,
    device: torch.device,
    compile: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    eval_batch_size: int = 512,
) -> PreparedRun:
    """What every run starts from (trial, teacher training, `distill`): one place, so they cannot drift.

    `data` is a `dkd_tune.data.InMemoryData` or `ImageFolderData`. The student's initial weights
    depend on `recipe.seed` alone; each rank of a DDP run gets its share of every batch
    (`recipe.batch_size` is the global batch).
    """
    from dkd_tune.models import create_model

    acceleration = Acceleration.for_device(device, compile=compile)
    train_loader, test_loader = data.loaders(
        recipe.batch_size // world_size,
        device,
        seed=recipe.seed,
        eval_batch_size=eval_batch_size,
        rank=rank,
        world_size=world_size,
        channels_last=acceleration.channels_last,
        dtype=acceleration.input_dtype,
    )
    val_loader = None
    if hasattr(data, "val_loader"):
        val_loader = data.val_loader(
            device,
            eval_batch_size=eval_batch_size,
            rank=rank,
            world_size=world_size,
            channels_last=acceleration.channels_last,
            dtype=acceleration.input_dtype,
        )
    torch.manual_seed(recipe.seed)
    model = create_model(arch, num_classes=data.num_classes)
    mean, std = data.normalisation
    identity = RunIdentity(
        arch=arch,
        num_classes=data.num_classes,
        dataset=data.name,
        input_size=data.input_size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )
    return PreparedRun(model, train_loader, test_loader, acceleration, identity, val_loader)


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

    CE is weighted by `ce_weight`; the distillation term by `warmup` and by `kd_weight` (kd),
    `alpha` (tckd), `beta` (nckd) or both (dkd: alpha * TCKD + beta * NCKD).
    """
    ce = F.cross_entropy(logits_student.float(), labels)
    parts = {"ce": ce.detach()}
    total = recipe.ce_weight * ce
    if loss_mode == "ce":
        return total, parts
    assert logits_teacher is not None
    if loss_mode == "kd":
        kd = kd_loss(logits_student, logits_teacher, recipe.temperature)
        parts["kd"] = kd.detach()
        return total + warmup * recipe.kd_weight * kd, parts
    terms = decoupled_terms(logits_student, logits_teacher, labels, recipe.temperature)
    tckd, nckd = terms.tckd.mean(), terms.nckd.mean()
    parts["tckd"], parts["nckd"] = tckd.detach(), nckd.detach()
    distillation = {
        "dkd": recipe.alpha * tckd + recipe.beta * nckd,
        "tckd": recipe.alpha * tckd,
        "nckd": recipe.beta * nckd,
    }[loss_mode]
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
    if loss_mode not in LOSS_MODES:
        raise UserInputError(f"loss mode {loss_mode!r} is not valid; expected one of {', '.join(LOSS_MODES)}")
    if loss_mode not in TEACHERLESS_MODES and teacher is None:
        raise UserInputError(f"loss mode {loss_mode!r} needs a teacher (or a teacher-logit cache)")
    device = torch.device(device)
    acceleration = acceleration or Acceleration.for_device(device)
    acceleration.apply_global_settings()
    if isinstance(teacher, nn.Module):
        teacher = LiveTeacher(teacher)
    if isinstance(
        teacher, LiveTeacher
    ):  # loaded anywhere (a trial loads it on the CPU): runs beside the student
        teacher.model.to(device, memory_format=_memory_format(acceleration))
    is_main_rank = not dist.is_initialized() or dist.get_rank() == 0
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    torch.manual_seed(recipe.seed)
    student = student.to(device, memory_format=_memory_format(acceleration))
    optimizer = torch.optim.SGD(
        student.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    start_epoch, best_test_acc, history = 0, -math.inf, []
    if resume_from is not None:
        start_epoch, best_test_acc, history = _restore(resume_from, student, optimizer, device)

    trained_model = student  # the module whose weights are saved; `model` is what runs the batches
    model: nn.Module = student
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    if acceleration.compile:
        model = torch.compile(model)

    zero = torch.zeros((), device=device)  # the loss parts a mode does not have
    last_epoch = recipe.epochs if stop_after_epochs is None else min(recipe.epochs, stop_after_epochs)
    status = "completed"
    for epoch in range(start_epoch, last_epoch):
        lr, warmup = recipe.lr_at(epoch), recipe.warmup_factor_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loader.set_epoch(epoch)

        model.train()
        clock = PhaseClock(device)
        # Sums over the epoch's samples stay on the device: reading them each step would stall a GPU.
        loss_sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss, ce, kd, tckd, nckd
        correct = torch.zeros((), device=device, dtype=torch.int64)
        count = num_batches = 0
        epoch_start = time.perf_counter()
        batches = iter(train_loader)
        while True:
            mark_data = clock.mark()
            batch = next(batches, None)
            if batch is None:
                break
            mark_teacher = clock.mark()
            with acceleration.autocast(device):
                logits_teacher = (
                    teacher.logits_for(batch) if teacher is not None and loss_mode != "ce" else None
                )
            mark_student = clock.mark()
            with acceleration.autocast(device):
                logits_student = model(batch.images)
                loss, parts = training_objective(
                    loss_mode, logits_student, logits_teacher, batch.labels, recipe, warmup
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mark_end = clock.mark()
            clock.add("data", mark_data, mark_teacher)
            clock.add("teacher", mark_teacher, mark_student)
            clock.add("student", mark_student, mark_end)
            size = batch.labels.numel()
            count, num_batches = count + size, num_batches + 1
            # A handful of small kernels and no host-device copy: nothing here waits for the device.
            batch_losses = [loss.detach(), parts["ce"]] + [
                parts.get(name, zero) for name in ("kd", "tckd", "nckd")
            ]
            loss_sums.add_(torch.stack(batch_losses).double(), alpha=size)
            correct += (logits_student.detach().argmax(1) == batch.labels).sum()
        phase_seconds = clock.seconds()
        sums = torch.cat(
            [
                loss_sums,
                correct.double().view(1),
                torch.tensor([count, num_batches], dtype=torch.float64, device=device),
            ]
        )
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss_sum, ce_sum, kd_sum, tckd_sum, nckd_sum, correct_sum, count, num_batches = sums.tolist()
        epoch_seconds = time.perf_counter() - epoch_start

        test = evaluate(model, test_loader, device, acceleration)
        diverged = not math.isfinite(loss_sum)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / count,
            "train_ce": ce_sum / count,
            "train_acc": 100.0 * correct_sum / count,
            "test_acc": test["acc"],
            "test_acc_top5": test["acc_top5"],
            "test_loss": test["loss"],
            "lr": lr,
            "warmup_factor": warmup if loss_mode != "ce" else 0.0,
            "epoch_time_s": epoch_seconds,
            "images_per_s": count / epoch_seconds,
            "time_data_ms": 1000 * phase_seconds["data"] / max(num_batches, 1),
            "time_teacher_ms": 1000 * phase_seconds["teacher"] / max(num_batches, 1),
            "time_student_ms": 1000 * phase_seconds["student"] / max(num_batches, 1),
            "diverged": float(diverged),
        }
        metrics.update(_distillation_metrics(loss_mode, kd_sum / count, tckd_sum / count, nckd_sum / count))
        if val_loader is not None:
            val = evaluate(model, val_loader, device, acceleration)
            metrics.update(val_acc=val["acc"], val_loss=val["loss"])
        if not diverged and test["acc"] > best_test_acc:
            best_test_acc = test["acc"]
            if checkpoint_dir is not None and is_main_rank:
                _save_best(checkpoint_dir / BEST_CHECKPOINT, trained_model, identity, recipe, metrics)
        metrics["best_test_acc"] = max(best_test_acc, 0.0)
        history.append(metrics)

        if diverged:
            status = "diverged"
        elif epoch + 1 == recipe.epochs:
            status = "completed"
        elif epoch + 1 == last_epoch:
            status = "stopped"  # ended where the caller asked, before the recipe's last epoch
        else:
            status = "running"
        checkpoint = None
        if checkpoint_dir is not None and is_main_rank and not diverged:
            checkpoint = checkpoint_dir / LAST_CHECKPOINT
            _save_last(
                checkpoint,
                trained_model,
                optimizer,
                identity,
                recipe,
                loss_mode,
                epoch + 1,
                best_test_acc,
                history,
            )
        if (
            reporter is not None
        ):  # every rank reports (Ray Train synchronises on it); only rank 0 has a checkpoint
            reporter(EpochReport(epoch=epoch + 1, metrics=metrics, checkpoint=checkpoint, status=status))
        if diverged:
            break

    final = history[-1]["test_acc"] if history else 0.0
    return FitResult(
        status=status if history else "completed",
        epochs_completed=history[-1]["epoch"] if history else start_epoch,
        final_test_acc=final,
        best_test_acc=max(best_test_acc, 0.0),
        history=history,
        best_checkpoint=_existing(checkpoint_dir, BEST_CHECKPOINT),
        last_checkpoint=_existing(checkpoint_dir, LAST_CHECKPOINT),
    )


def _distillation_metrics(loss_mode: str, kd: float, tckd: float, nckd: float) -> dict[str, float]:
    if loss_mode == "kd":
        return {"train_kd": kd}
    if loss_mode in ("dkd", "tckd", "nckd"):
        return {"train_tckd": tckd, "train_nckd": nckd}
    return {}


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


class PhaseClock:
    """Per-epoch time spent in data, teacher and student phases, without a GPU sync per step.

    On CUDA the marks are events read once at the end of the epoch; on the CPU, wall-clock times.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = {"data": 0.0, "teacher": 0.0, "student": 0.0}
        self.pending: list[tuple[str, Any, Any]] = []

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, phase: str, start: Any, end: Any) -> None:
        if self.cuda:
            self.pending.append((phase, start, end))
        else:
            self.totals[phase] += end - start

    def seconds(self) -> dict[str, float]:
        if self.pending:
            torch.cuda.synchronize()
            for phase, start, end in self.pending:
                self.totals[phase] += start.elapsed_time(end) / 1000.0
            self.pending.clear()
        return dict(self.totals)


# --------------------------------------------------------------------------------------------
# Checkpoints


def _memory_format(acceleration: Acceleration) -> torch.memory_format:
    return torch.channels_last if acceleration.channels_last else torch.preserve_format


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _save_last(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    identity: RunIdentity,
    recipe: Recipe,
    loss_mode: str,
    epochs_completed: int,
    best_test_acc: float,
    history: list[dict[str, float]],
) -> None:
    device = next(model.parameters()).device
    save_checkpoint(
        path,
        {
            "kind": "training",
            **dataclasses.asdict(identity),
            "recipe": recipe.to_dict(),
            "loss_mode": loss_mode,
            "epoch": epochs_completed,
            "best_test_acc": best_test_acc,
            "history": history,
            "model": _cpu_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(device),
        },
    )


def _save_best(path: Path, model: nn.Module, identity: RunIdentity, recipe: Recipe, metrics: dict) -> None:
    save_checkpoint(
        path,
        {
            "kind": "model",
            **dataclasses.asdict(identity),
            "recipe": recipe.to_dict(),
            "metrics": {key: float(value) for key, value in metrics.items()},
            "state_dict": _cpu_state_dict(model),
        },
    )


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def _restore(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[int, float, list[dict[str, float]]]:
    payload = load_checkpoint(path)
    if payload.get("kind") != "training":
        raise UserInputError(
            f"{path}: not a training checkpoint (expected one written by dkd-tune's training loop)"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    if device.type == "cuda" and "cuda" in payload["rng"]:
        torch.cuda.set_rng_state(payload["rng"]["cuda"], device)
    return int(payload["epoch"]), float(payload["best_test_acc"]), list(payload["history"])


def _existing(directory: Path | None, name: str) -> Path | None:
    if directory is None:
        return None
    path = directory / name
    return path if path.exists() else None
