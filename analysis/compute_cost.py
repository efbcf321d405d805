"""Compute spent finding beta: a search's trial-epochs against auto-beta's one full run and one teacher pass, in one unit.

The unit is one *trial-epoch*: one epoch of DKD training of the student with the live teacher
(per training image: a teacher forward, a student forward and backward). Both sides train the
same student on the same data, so trial-epochs compare directly. Auto-beta's extra cost is one
teacher forward pass over the training set to measure the gap; the search measures it too and,
when it builds the exact teacher-logit cache, pays one such pass per augmented view and then
trains without the teacher's forward. Teacher passes are converted with the ratio of FLOPs per
image (convolutions and matrix products, counted by torch's FlopCounterMode) of a teacher forward
to a live-teacher training step. Training the teacher itself is needed by both and not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from analysis.tables import distillation_trials

# The Parquet schema of the compute table (documented in the README): name -> pandas dtype.
COMPUTE_COLUMNS = {
    "teacher": "string",
    "search_trials": "int64",
    "search_trial_epochs": "int64",
    "search_teacher_passes": "int64",
    "search_epoch_equivalents": "float64",
    "autobeta_trial_epochs": "int64",
    "autobeta_teacher_passes": "int64",
    "autobeta_epoch_equivalents": "float64",
    "search_over_autobeta": "float64",
    "teacher_pass_epochs": "float64",
    "search_wall_time_s": "float64",
    "autobeta_wall_time_s": "float64",
    "median_trial_epoch_s": "float64",
    "min_trial_epoch_s": "float64",
}


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per training image of the student's step (forward + backward) and of the teacher's forward."""

    student_train: float
    teacher_forward: float

    @property
    def teacher_pass_epochs(self) -> float:
        """One teacher pass over the training set, in trial-epochs (live-teacher DKD epochs)."""
        return self.teacher_forward / (self.student_train + self.teacher_forward)

    @property
    def cached_epoch_fraction(self) -> float:
        """A trial-epoch with the logit cache (no teacher forward), in trial-epochs."""
        return self.student_train / (self.student_train + self.teacher_forward)


def step_flops(student: str, teacher: str, num_classes: int, image_size: int, batch: int = 8) -> StepFlops:
    """Count the FLOPs of one student training step and one teacher forward on a small batch, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from dkd_tune.models import create_model

    images = torch.randn(batch, 3, image_size, image_size)
    student_net = create_model(student, num_classes=num_classes).train()
    with FlopCounterMode(display=False) as counter:
        student_net(images).sum().backward()
    student_flops = counter.get_total_flops() / batch
    teacher_net = create_model(teacher, num_classes=num_classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher_net(images)
    return StepFlops(
        student_train=float(student_flops), teacher_forward=float(counter.get_total_flops() / batch)
    )


def compute_table(
    search_frame: pd.DataFrame,
    histories: pd.DataFrame,
    flops: Mapping[str, StepFlops],
    cache_views: Mapping[str, int],
    max_epochs: int,
    autobeta_wall_time_s: Mapping[str, float | None],
) -> pd.DataFrame:
    """Per teacher: the search's trial-epochs and teacher passes against auto-beta's, both in trial-epochs.

    `cache_views`: teacher -> views its logit cache holds (0 when the search built none).
    `autobeta_wall_time_s`: teacher -> wall time of the full run at the predicted beta, if one ran.
    """
    trials = distillation_trials(search_frame)
    rows = []
    for teacher, group in trials.groupby("teacher", sort=False):
        teacher = str(teacher)
        step = flops[teacher]
        views = int(cache_views.get(teacher, 0))
        trial_epochs = int(group["stop_epoch"].sum())
        # The search: its trials (cheaper per epoch with the cache), the gap pass, and one pass per cached view.
        search_passes = 1 + views
        per_epoch = step.cached_epoch_fraction if views else 1.0
        search_cost = trial_epochs * per_epoch + search_passes * step.teacher_pass_epochs
        autobeta_cost = max_epochs + step.teacher_pass_epochs
        rows.append(
            {
                "teacher": teacher,
                "search_trials": len(group),
                "search_trial_epochs": trial_epochs,
                "search_teacher_passes": search_passes,
                "search_epoch_equivalents": search_cost,
                "autobeta_trial_epochs": max_epochs,
                "autobeta_teacher_passes": 1,
                "autobeta_epoch_equivalents": autobeta_cost,
                "search_over_autobeta": search_cost / autobeta_cost,
                "teacher_pass_epochs": step.teacher_pass_epochs,
                "search_wall_time_s": float(group["wall_time_s"].sum()),
                "autobeta_wall_time_s": autobeta_wall_time_s.get(teacher),
                "median_trial_epoch_s": _epoch_seconds(histories, group, "median"),
                "min_trial_epoch_s": _epoch_seconds(histories, group, "min"),
            }
        )
    return pd.DataFrame(rows, columns=list(COMPUTE_COLUMNS)).astype(COMPUTE_COLUMNS)


def _epoch_seconds(histories: pd.DataFrame, trials: pd.DataFrame, statistic: str) -> float | None:
    """The median or min training time of one epoch over the trials' epochs (the min: the least-disturbed epoch)."""
    if histories.empty or "epoch_time_s" not in histories:
        return None
    mine = histories[
        histories["part"].isin(trials["part"].unique()) & histories["trial_id"].isin(trials["trial_id"])
    ]
    values = mine["epoch_time_s"].dropna()
    if values.empty:
        return None
    return float(values.median() if statistic == "median" else values.min())
