"""The teacher's logit gap z_t - max_{i != t} z_i on the training set (appendix A.3's confidence), with its accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.progress import Progress
from dkd_tune.data import EvalLoader, ImageDataset


@dataclass(frozen=True)
class LogitGapStats:
    """The teacher's gap z_t - max_{i != t} z_i over the training set, and its top-1 accuracies (%)."""

    mean: float
    median: float
    std: float  # population standard deviation over the training samples
    negative_fraction: float  # share of training samples where the gap is < 0 (the teacher is wrong)
    train_acc: float
    test_acc: float  # NaN when no test set was measured
    num_samples: int
    # A detector's gap is over the R-CNN head's proposals: the fields above are its foreground
    # (object) proposals, these its background ones (label 0, a class of its own); classifiers: none.
    background_mean: float = math.nan
    background_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (NaN becomes null)."""
        background = (
            {"background_mean": self.background_mean, "background_samples": self.background_samples}
            if self.background_samples
            else {}
        )
        return {
            **background,
            "mean": self.mean,
            "median": self.median,
            "std": self.std,
            "negative_fraction": self.negative_fraction,
            "train_acc": self.train_acc,
            "test_acc": self.test_acc if math.isfinite(self.test_acc) else None,
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LogitGapStats:
        test_acc = values.get("test_acc")
        return cls(
            mean=float(values["mean"]),
            median=float(values["median"]),
            std=float(values["std"]),
            negative_fraction=float(values["negative_fraction"]),
            train_acc=float(values["train_acc"]),
            test_acc=math.nan if test_acc is None else float(test_acc),
            num_samples=int(values["num_samples"]),
            background_mean=float(values.get("background_mean", math.nan)),
            background_samples=int(values.get("background_samples", 0)),
        )


@torch.no_grad()
def measure_logit_gap(
    teacher: nn.Module,
    train: ImageDataset | Any,
    test: ImageDataset | Any | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: bool = True,
) -> LogitGapStats:
    """Mean, median and std of z_t - max_{i != t} z_i over `train`, as the paper reports it.

    One pass of the teacher in eval mode over unaugmented images (and over `test` for its test
    top-1), batched on `device`. `train` and `test` are in-memory datasets, or loaders of
    unaugmented batches for data read from folders (ImageNet). The teacher's mode is restored.
    """
    device = torch.device(device)
    was_training = teacher.training
    teacher = teacher.to(device).eval()
    total = _image_count(train) + (_image_count(test) if test is not None else 0)
    try:
        label = "teacher logit gap (train) and top-1 (test)" if test is not None else "teacher logit gap"
        with Progress(label, total, unit="img", enabled=progress) as bar:
            gaps, train_correct = _gap_pass(teacher, train, device, batch_size, bar)
            test_acc = math.nan
            if test is not None:
                _, test_correct = _gap_pass(teacher, test, device, batch_size, bar)
                test_acc = 100.0 * test_correct / max(_image_count(test), 1)
    finally:
        teacher.train(was_training)
    return LogitGapStats(
        mean=gaps.mean().item(),
        median=_median(gaps),
        std=gaps.std(correction=0).item(),
        negative_fraction=(gaps < 0).double().mean().item(),
        train_acc=100.0 * train_correct / len(gaps),
        test_acc=test_acc,
        num_samples=len(gaps),
    )


def _image_count(source: Any) -> int:
    return len(source) if isinstance(source, ImageDataset) else len(source.dataset)


def _gap_pass(
    teacher: nn.Module, source: ImageDataset | Any, device: torch.device, batch_size: int, bar: Progress
) -> tuple[torch.Tensor, int]:
    """(per-sample gaps as float64 on the CPU, number of top-1 hits) of one unaugmented pass."""
    in_memory = isinstance(source, ImageDataset)
    name = source.name if in_memory else str(getattr(source.dataset, "root", "the dataset"))
    num_classes = source.num_classes if in_memory else len(source.dataset.classes)
    if _image_count(source) == 0:
        raise UserInputError(f"dataset {name!r} is empty; the logit gap needs training images")
    gaps, correct = [], 0
    for batch in EvalLoader(source, batch_size, device) if in_memory else source:
        logits = teacher(batch.images).float()
        if logits.shape[1] != num_classes:
            raise UserInputError(
                f"the teacher has {logits.shape[1]} outputs but dataset {name!r} has "
                f"{num_classes} classes; expected a teacher trained on this dataset"
            )
        labels = batch.labels[:, None]
        target = logits.gather(1, labels).squeeze(1)
        rival = logits.scatter(1, labels, -math.inf).amax(1)
        gaps.append((target - rival).double().cpu())
        correct += int((logits.argmax(1) == batch.labels).sum())
        bar.update(len(batch.labels))
    return torch.cat(gaps), correct


def _median(values: torch.Tensor) -> float:
    """The middle value, or the mean of the two middle values for an even count (as numpy's median)."""
    ordered = values.sort().values
    count = len(ordered)
    return float((ordered[(count - 1) // 2] + ordered[count // 2]) / 2)
