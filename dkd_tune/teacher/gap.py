"""The teacher's logit gap z_t - max_{i != t} z_i on the training set (appendix A.3's confidence), its accuracy,
and the other measures of confidence that auto-beta's feature choice compares with the gap."""

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
    # Other confidence measures over the same training samples (NaN where not measured):
    standardized_mean: float = (
        math.nan
    )  # mean of (z_t - z_max) / sd_i(z): the gap in units of the row's spread
    non_target_entropy: float = (
        math.nan
    )  # mean entropy (nats) of softmax(z_i / T) over the non-target classes
    entropy_temperature: float = math.nan  # the T of non_target_entropy
    val_acc: float = math.nan  # top-1 on the validation split, when there is one

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (NaN becomes null)."""
        background = (
            {"background_mean": self.background_mean, "background_samples": self.background_samples}
            if self.background_samples
            else {}
        )
        features = {
            key: value
            for key in ("standardized_mean", "non_target_entropy", "entropy_temperature", "val_acc")
            if math.isfinite(value := getattr(self, key))
        }
        return {
            **background,
            **features,
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
            standardized_mean=_number(values.get("standardized_mean")),
            non_target_entropy=_number(values.get("non_target_entropy")),
            entropy_temperature=_number(values.get("entropy_temperature")),
            val_acc=_number(values.get("val_acc")),
        )


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


ENTROPY_TEMPERATURE = 4.0  # the paper's CIFAR temperature (A.2): the softness NCKD sees there


@torch.no_grad()
def measure_logit_gap(
    teacher: nn.Module,
    train: ImageDataset | Any,
    test: ImageDataset | Any | None = None,
    *,
    validation: ImageDataset | Any | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: bool = True,
    intervention: Any = None,
    class_groups: torch.Tensor | None = None,
) -> LogitGapStats:
    """Mean, median and std of z_t - max_{i != t} z_i over `train`, as the paper reports it.

    One pass of the teacher in eval mode over unaugmented images (and over `test` and `validation`
    for its top-1 there), batched on `device`. `train` and `test` are in-memory datasets, or loaders
    of unaugmented batches for data read from folders (ImageNet). The teacher's mode is restored. The progress bar counts the images of every split.
    With `intervention` (a `LogitIntervention`) the training logits are measured as the student will
    see them; the top-1 on the held-out splits is always the teacher's own (they have no labels to
    intervene with at inference).
    """
    device = torch.device(device)
    was_training = teacher.training
    teacher = teacher.to(device).eval()
    held_out = [source for source in (test, validation) if source is not None]
    total = _image_count(train) + sum(_image_count(source) for source in held_out)
    try:
        splits = " and ".join(
            name for name, source in (("test", test), ("val", validation)) if source is not None
        )
        label = f"teacher logit gap (train) and top-1 ({splits})" if splits else "teacher logit gap"
        with Progress(label, total, unit="img", enabled=progress) as bar:
            train_pass = _gap_pass(teacher, train, device, batch_size, bar, intervention, class_groups)
            test_acc, val_acc = (
                _top1(teacher, source, device, batch_size, bar) if source is not None else math.nan
                for source in (test, validation)
            )
    finally:
        teacher.train(was_training)
    gaps = train_pass.gaps
    return LogitGapStats(
        mean=gaps.mean().item(),
        median=_median(gaps),
        std=gaps.std(correction=0).item(),
        negative_fraction=(gaps < 0).double().mean().item(),
        train_acc=100.0 * train_pass.correct / len(gaps),
        test_acc=test_acc,
        num_samples=len(gaps),
        standardized_mean=train_pass.standardized.mean().item(),
        non_target_entropy=train_pass.entropy.mean().item(),
        entropy_temperature=ENTROPY_TEMPERATURE,
        val_acc=val_acc,
    )


def _image_count(source: Any) -> int:
    return len(source) if isinstance(source, ImageDataset) else len(source.dataset)


@dataclass
class _TrainPass:
    """Per-sample measures of one unaugmented pass over the training images (float64, CPU)."""

    gaps: torch.Tensor
    standardized: torch.Tensor
    entropy: torch.Tensor
    correct: int


def _gap_pass(
    teacher: nn.Module,
    source: ImageDataset | Any,
    device: torch.device,
    batch_size: int,
    bar: Progress,
    intervention: Any = None,
    class_groups: torch.Tensor | None = None,
) -> _TrainPass:
    """Gaps, standardised gaps, non-target entropies and top-1 hits of one unaugmented pass."""
    gaps, standardized, entropy, correct = [], [], [], 0
    for batch, logits in _logit_batches(teacher, source, device, batch_size, bar):
        if intervention is not None and not intervention.is_identity:
            logits = intervention.apply(logits, batch.labels, batch.indices, class_groups)
        labels = batch.labels[:, None]
        target = logits.gather(1, labels).squeeze(1)
        non_target = logits.scatter(1, labels, -math.inf)
        gap = target - non_target.amax(1)
        gaps.append(gap.double().cpu())
        standardized.append((gap / logits.std(dim=1, correction=0).clamp_min(1e-12)).double().cpu())
        entropy.append(_entropy(non_target / ENTROPY_TEMPERATURE).double().cpu())
        correct += int((logits.argmax(1) == batch.labels).sum())
    return _TrainPass(torch.cat(gaps), torch.cat(standardized), torch.cat(entropy), correct)


def _top1(
    teacher: nn.Module, source: ImageDataset | Any, device: torch.device, batch_size: int, bar
) -> float:
    correct = sum(
        int((logits.argmax(1) == batch.labels).sum())
        for batch, logits in _logit_batches(teacher, source, device, batch_size, bar)
    )
    return 100.0 * correct / max(_image_count(source), 1)


def _logit_batches(
    teacher: nn.Module, source: ImageDataset | Any, device: torch.device, batch_size: int, bar
):
    """(batch, float32 logits) over one unaugmented pass, checking the teacher's output size once per batch."""
    in_memory = isinstance(source, ImageDataset)
    name = source.name if in_memory else str(getattr(source.dataset, "root", "the dataset"))
    num_classes = source.num_classes if in_memory else len(source.dataset.classes)
    if _image_count(source) == 0:
        raise UserInputError(f"dataset {name!r} is empty; the logit gap needs training images")
    for batch in EvalLoader(source, batch_size, device) if in_memory else source:
        logits = teacher(batch.images).float()
        if logits.shape[1] != num_classes:
            raise UserInputError(
                f"the teacher has {logits.shape[1]} outputs but dataset {name!r} has "
                f"{num_classes} classes; expected a teacher trained on this dataset"
            )
        yield batch, logits
        bar.update(len(batch.labels))


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of softmax(logits); -inf entries (the masked target) carry no mass."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(dim=1)


def _median(values: torch.Tensor) -> float:
    """The middle value, or the mean of the two middle values for an even count (as numpy's median)."""
    ordered = values.sort().values
    count = len(ordered)
    return float((ordered[(count - 1) // 2] + ordered[count // 2]) / 2)
