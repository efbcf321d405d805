"""The one rule for choosing among runs or epochs: on the validation split when there is one, never on the split
that reports; the test split only when nothing else exists."""

from __future__ import annotations

# What a task is scored by on each split (epoch reports; a results table prefixes them with "final_").
SPLIT_METRICS = {
    "classification": {"val": "val_acc", "test": "test_acc"},
    "detection": {"val": "val_ap", "test": "test_ap"},
}


def selection_metric(task: str, has_validation: bool) -> str:
    """The metric runs (or epochs) of `task` are chosen by: the validation split's, else the test split's."""
    metrics = SPLIT_METRICS[task]
    return metrics["val"] if has_validation else metrics["test"]


def epoch_selection_metric(task: str, has_validation: bool) -> str | None:
    """What a training loop picks `best.pt` by: the validation metric, or None (the last epoch) without one.

    Never the test split: a checkpoint chosen on it would carry the test split into every later choice.
    """
    return SPLIT_METRICS[task]["val"] if has_validation else None
