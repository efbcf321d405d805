"""Choosing trials from a results table by the project's one rule (`dkd_tune.core.selection`): the validation
split's final score when the trials have one, the test split's only when none does."""

from __future__ import annotations

import pandas as pd

from dkd_tune.config.plan import BASELINE_PREFIX
from dkd_tune.core.selection import selection_metric


def selection_column(frame: pd.DataFrame) -> str:
    """The results column `frame`'s trials are ranked by (`final_val_acc`, `final_val_ap`, or a test one)."""
    task = (
        "detection" if "final_test_ap" in frame and frame["final_test_ap"].notna().any() else "classification"
    )
    validated = f"final_{selection_metric(task, True)}"
    has_validation = validated in frame and frame[validated].notna().any()
    return f"final_{selection_metric(task, has_validation)}"


def candidates(frame: pd.DataFrame) -> pd.DataFrame:
    """Searched trials that ran their full budget with a score (baselines are references, not candidates)."""
    if frame.empty:
        return frame
    # A table without a `part` column (written by hand or by an older version) holds no baseline.
    baseline = frame["part"].astype(str).str.startswith(BASELINE_PREFIX) if "part" in frame else False
    kept = frame[(frame["status"] == "completed") & ~baseline]
    return kept[kept[selection_column(frame)].notna()]


def ranked(frame: pd.DataFrame, column: str | None = None) -> pd.DataFrame:
    """`frame`'s candidates best first (ties: the trial id), by `column` or the selection column."""
    pool = candidates(frame)
    if pool.empty:
        return pool
    column = column or selection_column(frame)
    return pool.sort_values([column, "trial_id"], ascending=[False, True], kind="stable")


def best_trial(frame: pd.DataFrame) -> dict | None:
    """The search's answer: its best candidate, as a dict (None when no trial ran its full budget)."""
    order = ranked(frame)
    return None if order.empty else order.iloc[0].to_dict()


def best_trials_per_teacher(frame: pd.DataFrame) -> pd.DataFrame:
    """Each teacher's best candidate, one row per teacher."""
    order = ranked(frame)
    return order if order.empty else order.groupby("teacher", sort=True).head(1).reset_index(drop=True)
