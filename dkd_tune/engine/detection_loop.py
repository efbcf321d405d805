"""The detection training loop: a Faster R-CNN student trained with its own losses, plus DKD on its R-CNN head (A.6).

Per batch, the student runs its usual training forward, opened up where A.6 needs it: its RPN
proposes boxes, its R-CNN head samples them and assigns each a label by IoU with the ground
truth (below 0.5: background, label 0, a class of its own), and classifies them. The teacher,
in eval mode and without gradients, runs its own backbone on the same images and its R-CNN head
on the *same proposals* (rescaled if its transform resized the images differently), giving
class logits proposal by proposal. The loss mode's distillation term (`core.losses.LOSS_MODES`:
KD, DKD, TCKD or NCKD, from the project's losses) on those logits and labels is added, after its
warm-up factor, to the detector's losses (weighted by `ce_weight`). `fit_detector` reads like the
classification loop's `fit`: learning rate, training batches, COCO evaluation, atomic checkpoint,
report, per epoch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from dkd_tune.core.losses import LOSS_MODES, LossMode
from dkd_tune.core.recipes import Recipe
from dkd_tune.core.selection import epoch_selection_metric
from dkd_tune.engine.detection_eval import EvaluationSplit
from dkd_tune.engine.loop import EpochRecorder, FitResult, Reporter, checked_loss_mode
from dkd_tune.engine.run_setup import RunIdentity

# torchvision's detection references: the learning rate rises linearly from 1/1000 of its value
# over the first 1000 iterations (or the first epoch, if shorter), as Detectron2's schedules do.
LR_WARMUP_ITERATIONS = 1000
LR_WARMUP_START = 1e-3
DETECTOR_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class HeadOutputs(NamedTuple):
    """One batch through the student: its losses and its R-CNN head's view of the sampled proposals."""

    losses: dict[str, torch.Tensor]  # the detector's own four losses
    class_logits: torch.Tensor  # (P, K + 1): the R-CNN head's logits, proposal by proposal
    labels: torch.Tensor  # (P,): labels assigned by IoU, 0 for background
    proposals: list[torch.Tensor]  # the sampled proposals of each image, in the student's input pixels
    image_sizes: list[tuple[int, int]]  # each image's size after the student's transform


class StudentForward(nn.Module):
    """The training forward of a torchvision Faster R-CNN, returning the R-CNN head's logits and labels too.

    A module, so DDP wraps it and synchronises the student's gradients as for any model.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> HeadOutputs:
        detector = self.detector
        batch, targets = detector.transform(images, targets)
        features = detector.backbone(batch.tensors)
        proposals, rpn_losses = detector.rpn(batch, features, targets)
        heads = detector.roi_heads
        proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        from torchvision.models.detection.roi_heads import fastrcnn_loss

        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )
        losses = {**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        return HeadOutputs(losses, class_logits, torch.cat(labels), proposals, list(batch.image_sizes))


@torch.no_grad()
def teacher_rcnn_logits(
    teacher: nn.Module,
    images: list[torch.Tensor],
    proposals: list[torch.Tensor],
    student_sizes: list[tuple[int, int]],
) -> torch.Tensor:
    """The teacher's R-CNN class logits for the student's proposals: same boxes, the teacher's own features."""
    batch, _ = teacher.transform(images)
    scaled = [
        boxes * boxes.new_tensor([t_w / s_w, t_h / s_h, t_w / s_w, t_h / s_h])
        for boxes, (s_h, s_w), (t_h, t_w) in zip(proposals, student_sizes, batch.image_sizes, strict=True)
    ]
    features = teacher.backbone(batch.tensors)
    heads = teacher.roi_heads
    box_features = heads.box_head(heads.box_roi_pool(features, scaled, batch.image_sizes))
    class_logits, _ = heads.box_predictor(box_features)
    return class_logits


def detection_objective(
    mode: LossMode, head: HeadOutputs, teacher_logits: torch.Tensor | None, recipe: Recipe, warmup: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The detector's losses times `ce_weight`, plus the mode's distillation term on the R-CNN head times the warm-up."""
    parts = {name: value.detach() for name, value in head.losses.items()}
    total = recipe.ce_weight * sum(head.losses.values())
    if mode.distillation is None:
        return total, parts
    assert teacher_logits is not None
    distillation, terms = mode.distillation(head.class_logits, teacher_logits, head.labels, recipe)
    parts.update({name: term.detach() for name, term in terms.items()})
    return total + warmup * distillation, parts


def detection_step(
    student: nn.Module,
    teacher: nn.Module | None,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    loss_mode: str,
    recipe: Recipe,
    warmup: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch's loss (to back-propagate) and its parts; `student` is a `StudentForward` (or DDP of one)."""
    mode = LOSS_MODES[loss_mode]
    head = student(images, targets)
    teacher_logits = None
    if mode.needs_teacher:
        assert teacher is not None
        teacher_logits = teacher_rcnn_logits(teacher, images, head.proposals, head.image_sizes)
    return detection_objective(mode, head, teacher_logits, recipe, warmup)


# --------------------------------------------------------------------------------------------
# The loop


def fit_detector(
    student: nn.Module,
    train_loader: Any,
    evaluations: dict[str, EvaluationSplit],
    recipe: Recipe,
    *,
    identity: RunIdentity,
    loss_mode: str = "dkd",
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Train detector `student` for `recipe.epochs` epochs (or until `stop_after_epochs`), reporting COCO AP each epoch.

    `evaluations` maps a split name ("test", and "val" when the data hold one out) to what scores
    it; each epoch reports `<split>_ap`, `<split>_ap50`, ... The FitResult's `final_test_score` and
    `best_test_score` hold the test AP. Under torch.distributed the student is wrapped in DDP, each
    rank takes its share of the images and only rank 0 writes checkpoints.
    """
    mode = checked_loss_mode(loss_mode, teacher)
    device = torch.device(device)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if mode.needs_teacher:
        teacher = teacher.to(device).eval().requires_grad_(False)

    torch.manual_seed(recipe.seed)
    student = student.to(device)
    trained = [parameter for parameter in student.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(
        trained, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    last_epoch = recipe.epochs if stop_after_epochs is None else min(recipe.epochs, stop_after_epochs)
    record = EpochRecorder(
        student, optimizer, identity, recipe, loss_mode, checkpoint_dir, reporter, last_epoch, "test_ap",
        chosen_by=epoch_selection_metric("detection", "val" in evaluations),
    )  # fmt: skip
    if resume_from is not None:
        record.resume(resume_from, device)
    forward: nn.Module = StudentForward(student)
    if dist.is_initialized():
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )

    for epoch in range(record.start_epoch, last_epoch):
        lr, warmup = recipe.lr_at(epoch), recipe.warmup_factor_at(epoch)
        train_loader.sampler.set_epoch(epoch)
        torch.manual_seed(recipe.seed * 1000 + epoch)  # the epoch's flips and proposal sampling

        train = _train_epoch(
            forward, teacher, train_loader, optimizer, mode, recipe, lr, warmup, epoch, device
        )
        metrics = {
            "epoch": epoch + 1,
            **train,
            "lr": lr,
            "warmup_factor": warmup if mode.needs_teacher else 0.0,
        }
        for split, evaluation in evaluations.items():
            metrics.update(
                {f"{split}_{name}": value for name, value in evaluation.score(student, device).items()}
            )
        diverged = not math.isfinite(metrics["train_loss"])
        metrics["diverged"] = float(diverged)
        record.epoch_done(epoch, metrics, diverged)
        if diverged:
            break
    return record.result()


def _train_epoch(
    forward: nn.Module,
    teacher: nn.Module | None,
    train_loader: Any,
    optimizer: torch.optim.Optimizer,
    mode: LossMode,
    recipe: Recipe,
    lr: float,
    warmup: float,
    epoch: int,
    device: torch.device,
) -> dict[str, float]:
    """One epoch's batches; returns the image-weighted means of the loss and its parts, and the speed."""
    forward.train()
    names = ("loss", *DETECTOR_LOSSES, *mode.terms)
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # ..., images
    warmup_iterations = min(LR_WARMUP_ITERATIONS, len(train_loader) - 1) if epoch == 0 else 0
    started = time.perf_counter()
    for iteration, (images, targets) in enumerate(train_loader):
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{key: _to(value, device) for key, value in target.items()} for target in targets]
        rise = iteration / warmup_iterations if iteration < warmup_iterations else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * (LR_WARMUP_START * (1 - rise) + rise)
        loss, parts = detection_step(forward, teacher, images, targets, mode.name, recipe, warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values = torch.stack([loss.detach(), *(parts[name] for name in names[1:])]).double()
        sums[:-1] += values * len(images)
        sums[-1] += len(images)
    if dist.is_initialized():
        dist.all_reduce(sums)
    seconds = time.perf_counter() - started
    count = max(float(sums[-1]), 1.0)
    means = {
        ("train_loss" if name == "loss" else f"train_{name}"): float(sums[i]) / count
        for i, name in enumerate(names)
    }
    return {**means, "epoch_time_s": seconds, "images_per_s": count / seconds}


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
