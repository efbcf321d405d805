"""A detector's COCO metrics (AP, AP50, AP75, APs/m/l) on one split, by pycocotools' COCOeval.

Detections are mapped back from labels 1..K to the dataset's category ids and from corner boxes
to COCO's x, y, w, h; under DDP each rank detects its share of the images and every rank scores
the gathered whole, so all ranks report the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# COCOeval.stats[0:6], in percent, under the names every reporter receives (prefixed by the split).
AP_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")


@dataclass
class EvaluationSplit:
    """What scores a detector on one split: its loader, its annotations (a pycocotools COCO) and its images."""

    loader: Iterable
    ground_truth: Any
    image_ids: list[int]
    category_ids: tuple[int, ...]

    def score(self, detector: nn.Module, device: torch.device) -> dict[str, float]:
        return coco_metrics(
            detector, self.loader, self.ground_truth, self.image_ids, self.category_ids, device
        )


@torch.no_grad()
def coco_metrics(
    detector: nn.Module,
    loader: Iterable,
    ground_truth,
    image_ids: list[int],
    category_ids: tuple[int, ...],
    device: torch.device,
) -> dict[str, float]:
    """AP metrics (%) of `detector` over `loader`'s images; a size with no ground truth is left out."""
    was_training = detector.training
    detector.eval()
    detections = []
    for images, targets in loader:
        outputs = detector([image.to(device, non_blocking=True) for image in images])
        for target, output in zip(targets, outputs, strict=True):
            detections += _as_coco_results(target["image_id"], output, category_ids)
    detector.train(was_training)
    if dist.is_initialized():
        gathered: list[list] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, detections)
        detections = [item for part in gathered for item in part]
    return score_detections(ground_truth, detections, image_ids)


def _as_coco_results(
    image_id: int, output: dict[str, torch.Tensor], category_ids: tuple[int, ...]
) -> list[dict]:
    boxes = output["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    return [
        {"image_id": int(image_id), "category_id": category_ids[int(label) - 1], "bbox": box, "score": score}
        for box, label, score in zip(
            boxes.tolist(), output["labels"].tolist(), output["scores"].float().cpu().tolist(), strict=True
        )
    ]


def score_detections(ground_truth, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """COCOeval's bbox stats (%) of `detections` on `image_ids`; no detection at all scores 0."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return dict.fromkeys(AP_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [float(value) for value in evaluation.stats[: len(AP_NAMES)]]
    # COCOeval writes -1 for a size range without ground-truth boxes: not a score, so not reported.
    return {
        name: 100.0 * value
        for name, value in zip(AP_NAMES, stats, strict=True)
        if value >= 0 and math.isfinite(value)
    }
