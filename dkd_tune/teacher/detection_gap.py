"""A detection teacher's logit gap, measured where DKD acts: its R-CNN head over proposals with IoU-assigned labels.

The teacher proposes boxes with its own RPN (eval mode, as at test time); each proposal gets
the label of the ground-truth box it overlaps most at IoU >= 0.5, else the background (label 0),
exactly as training assigns them. The gap z_t - max_{i != t} z_i is then taken over the head's
K + 1 logits, separately for object (foreground) proposals, which are what the appendix's gap
describes, and for background ones, which outnumber them many times. The head's top-1 over object
proposals on the training and test images fills the accuracy fields classifiers use (over all
proposals it would mostly count background, which even an untrained head gets right).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dkd_tune.core.errors import UserInputError
from dkd_tune.data.coco import CocoData, detection_loader
from dkd_tune.teacher.gap import LogitGapStats, _median

GAP_IMAGES = 1000  # training images measured (evenly spaced): COCO's 118k would cost an epoch


@torch.no_grad()
def measure_detection_gap(
    teacher: nn.Module, data: CocoData, *, device: torch.device | str = "cpu", max_images: int = GAP_IMAGES
) -> LogitGapStats:
    """The R-CNN head's gap over foreground proposals (mean, median, std), its background mean, and top-1s."""
    device = torch.device(device)
    was_training = teacher.training
    teacher = teacher.to(device).eval()
    try:
        train_gaps, train_labels, train_hits = _head_pass(teacher, data, "train", device, max_images)
        _, test_labels, test_hits = _head_pass(teacher, data, "test", device, max_images)
    finally:
        teacher.train(was_training)
    foreground = train_gaps[train_labels > 0]
    background = train_gaps[train_labels == 0]
    if foreground.numel() == 0:
        raise UserInputError(
            f"data {data.root}: the teacher proposed no box overlapping an object at IoU >= 0.5 on "
            f"{min(max_images, len(data.image_ids('train')))} training images; is it trained on these categories?"
        )
    return LogitGapStats(
        mean=foreground.mean().item(),
        median=_median(foreground),
        std=foreground.std(correction=0).item(),
        negative_fraction=(foreground < 0).double().mean().item(),
        train_acc=100.0 * train_hits[train_labels > 0].double().mean().item(),
        test_acc=100.0 * test_hits[test_labels > 0].double().mean().item()
        if (test_labels > 0).any()
        else math.nan,
        num_samples=int(foreground.numel()),
        background_mean=background.mean().item() if background.numel() else math.nan,
        background_samples=int(background.numel()),
    )


def _head_pass(
    teacher: nn.Module, data: CocoData, split: str, device: torch.device, max_images: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gap, assigned label, top-1 hit) of every proposal on up to `max_images` images of `split`."""
    dataset = data.dataset(split, train=False)
    step = max(1, math.ceil(len(dataset) / max_images))
    subset = torch.utils.data.Subset(dataset, range(0, len(dataset), step))
    gaps, labels, hits = [], [], []
    for images, targets in detection_loader(subset, 8, seed=0, shuffle=False, workers=data.workers):
        images = [image.to(device) for image in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        logits, assigned = proposal_logits(teacher, images, targets)
        target_logit = logits.gather(1, assigned[:, None]).squeeze(1)
        rival = logits.scatter(1, assigned[:, None], -math.inf).amax(1)
        gaps.append((target_logit - rival).double().cpu())
        labels.append(assigned.cpu())
        hits.append((logits.argmax(1) == assigned).cpu())
    return torch.cat(gaps), torch.cat(labels), torch.cat(hits)


def proposal_logits(
    teacher: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The R-CNN head's logits on the detector's own proposals and their labels assigned by IoU (0: background)."""
    batch, targets = teacher.transform(images, targets)
    features = teacher.backbone(batch.tensors)
    proposals, _ = teacher.rpn(batch, features)
    heads = teacher.roi_heads
    _, assigned = heads.assign_targets_to_proposals(
        proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets]
    )
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
    logits, _ = heads.box_predictor(box_features)
    return logits.float(), torch.cat(assigned).clamp(min=0)
