"""`dkd-tune check FILE`: every check `dkd-tune run` makes before it starts (the file, teacher checkpoints opened
and matched, data folders read), nothing trained or written; one line saying what would run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dkd_tune.config.loading import load_search_space
from dkd_tune.config.plan import search_parts
from dkd_tune.config.tracking_uri import check_tracking_uri


def check_search_file(path: Path, overrides: Sequence[str] = ()) -> str:
    """The summary of what `dkd-tune run path` would run; raises the run's own one-line error otherwise."""
    from dkd_tune.search.tuner import expected_trials

    notes: list[str] = []
    space = load_search_space(path, list(overrides), notes)  # the file, teacher checkpoints, data folders
    check_tracking_uri(space.tracking_uri, f"{path}: tracking_uri")
    check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    parts = search_parts(space)
    trials = sum(expected_trials(space, teacher) for _, teacher in parts if teacher is not None)
    trials += sum(1 for _, teacher in parts if teacher is None)
    teachers = ", ".join(
        f"{t.label} ({t.model}, {'checkpoint ok' if t.checkpoint else 'trained first'})"
        for t in space.teachers
    )
    scheduler = (
        f"ASHA from epoch {space.scheduler.grace_period} (factor {space.scheduler.reduction_factor:g})"
        if space.scheduler.type == "asha"
        else "no pruning"
    )
    per_trial = space.resources
    resources = (
        f"{per_trial.workers} workers x {per_trial.gpu:g} GPU"
        if per_trial.workers > 1
        else f"{per_trial.cpu:g} CPU, {per_trial.gpu:g} GPU"
    )
    data = space.data_spec
    summary = (
        f"ok: {path}: search {space.name!r} would run {trials} trials of {space.student} on {data.name} "
        f"({data.root}) in {len(parts)} parts, up to {space.max_epochs()} epochs each, loss {space.loss}, "
        f"{space.search.algorithm} search, {scheduler}, {resources} per trial; teachers: {teachers or 'none'}"
    )
    return "\n".join([*(f"note: {note}" for note in notes), summary])
