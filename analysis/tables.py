"""Tables of a search's trials: Markdown rendering, the Table A.1-style beta x teacher pivot, a per-teacher summary.

Only trials that ran the full budget (status "completed") are compared by accuracy: a trial ASHA
stopped at epoch 2 of 8 has a lower accuracy because it trained less, not because of its beta.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dkd_tune.config.plan import BASELINE_PREFIX
from dkd_tune.core.losses import LOSS_MODES

# Up to this many distinct betas per table are shown as they are (a grid search, Table A.1);
# more (TPE samples beta continuously) are grouped into log-spaced bins.
MAX_EXACT_BETA_ROWS = 12
DEFAULT_BETA_BINS = 8


def markdown_table(frame: pd.DataFrame, *, index: bool = False) -> str:
    """A GitHub Markdown table of `frame` (cells formatted by `format_cell`)."""
    columns = ([frame.index.name or ""] if index else []) + [str(column) for column in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    # itertuples keeps each column's type (iterrows would turn a row of ints and floats into floats).
    for label, *values in frame.itertuples(index=True, name=None):
        cells = [format_cell(label)] if index else []
        cells.extend(format_cell(value) for value in values)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    """Numbers to 3 significant digits below 10 and 2 decimals above (accuracies read as 85.37)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def distillation_trials(frame: pd.DataFrame) -> pd.DataFrame:
    """The searched trials that use beta (teacher parts, loss dkd or nckd), with a finite positive beta."""
    searched = frame[~frame["part"].astype(str).str.startswith(BASELINE_PREFIX)]
    uses_beta = searched["loss"].isin([name for name, mode in LOSS_MODES.items() if mode.uses_beta])
    beta = pd.to_numeric(searched["beta"], errors="coerce")
    return searched[uses_beta & beta.gt(0) & np.isfinite(beta)]


def teacher_order(frame: pd.DataFrame) -> list[str]:
    """Teachers by increasing gap (the order of Table A.1), then by name."""
    teachers = frame[~frame["part"].astype(str).str.startswith(BASELINE_PREFIX)]
    gaps = teachers.groupby("teacher", sort=True)["teacher_gap"].max()
    return sorted(gaps.index, key=lambda teacher: (_nan_last(gaps[teacher]), str(teacher)))


@dataclass(frozen=True)
class BetaPivot:
    """Table A.1 for a search: best top-1 per (beta or beta bin, teacher), trial counts, and each teacher's gap."""

    table: pd.DataFrame  # index: beta (or a "low-high" bin label), columns: teachers; NaN where no trial
    counts: pd.DataFrame  # same shape: how many completed trials each cell's best is taken from
    gaps: pd.Series  # teacher -> mean logit gap
    binned: bool
    metric: str

    def markdown(self) -> str:
        """The pivot as Markdown, each teacher's best value in bold, and a gap row as in Table A.1."""
        if self.table.empty:
            return "(no completed trials with a beta)"
        teachers = list(self.table.columns)
        header = ["beta (bin)" if self.binned else "beta", *teachers]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        best = self.table.max(axis=0)
        for label, row in self.table.iterrows():
            cells = [format_cell(label)]
            for teacher in teachers:
                text = format_cell(row[teacher])
                cells.append(f"**{text}**" if text and row[teacher] == best[teacher] else text)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(
            "| gap z_t - z_max | " + " | ".join(format_cell(self.gaps.get(t)) for t in teachers) + " |"
        )
        counts = ", ".join(f"{teacher} {int(self.counts[teacher].sum())}" for teacher in teachers)
        binned = ", betas grouped into log-spaced bins" if self.binned else ""
        return (
            "\n".join(lines)
            + f"\n\n{self.metric} of the best completed trial per cell{binned}; completed trials: {counts}"
        )


def beta_pivot(
    frame: pd.DataFrame,
    *,
    metric: str = "final_test_acc",
    bins: int | None = None,
    statuses: Sequence[str] = ("completed",),
) -> BetaPivot:
    """beta x teacher -> best `metric` among the trials with one of `statuses` (Table A.1's layout).

    With at most MAX_EXACT_BETA_ROWS distinct betas (3 significant digits) and `bins` None the rows
    are the betas themselves; otherwise `bins` (default DEFAULT_BETA_BINS) log-spaced bins between the
    smallest and largest beta, labelled "low-high".
    """
    trials = distillation_trials(frame)
    trials = trials[trials["status"].isin(list(statuses)) & trials[metric].notna()]
    teachers = [teacher for teacher in teacher_order(frame) if teacher in set(trials["teacher"])]
    gaps = frame.groupby("teacher")["teacher_gap"].max().reindex(teachers).astype("float64")
    if trials.empty:
        empty = pd.DataFrame(columns=teachers, dtype="float64")
        return BetaPivot(empty, empty.copy(), gaps, binned=False, metric=metric)
    betas = trials["beta"].astype("float64").map(lambda beta: float(f"{beta:.3g}"))
    binned = bins is not None or betas.nunique() > MAX_EXACT_BETA_ROWS
    if binned:
        labels, order = _log_bins(trials["beta"].astype("float64"), bins or DEFAULT_BETA_BINS)
        rows = labels
    else:
        rows, order = betas, sorted(betas.unique())
    keyed = pd.DataFrame({"row": rows.to_numpy(), "teacher": trials["teacher"].to_numpy()})
    keyed["value"] = trials[metric].astype("float64").to_numpy()
    table = keyed.pivot_table(index="row", columns="teacher", values="value", aggfunc="max")
    counts = keyed.pivot_table(index="row", columns="teacher", values="value", aggfunc="count")
    table = table.reindex(index=order, columns=teachers).astype("float64")
    counts = counts.reindex(index=order, columns=teachers).fillna(0).astype("int64")
    table.index.name = counts.index.name = "beta"
    table.columns.name = counts.columns.name = None
    return BetaPivot(table, counts, gaps, binned=binned, metric=metric)


def _log_bins(betas: pd.Series, count: int) -> tuple[pd.Series, list[str]]:
    low, high = float(betas.min()), float(betas.max())
    if math.isclose(low, high):
        label = format_cell(low)
        return pd.Series([label] * len(betas), index=betas.index), [label]
    edges = np.geomspace(low, high, count + 1)
    positions = np.clip(np.searchsorted(edges, betas.to_numpy(), side="right") - 1, 0, count - 1)
    names = [f"{format_cell(edges[i])}-{format_cell(edges[i + 1])}" for i in range(count)]
    return pd.Series([names[p] for p in positions], index=betas.index), names


def teacher_summary(frame: pd.DataFrame, metric: str = "final_test_acc") -> pd.DataFrame:
    """One row per teacher (by gap) and per baseline: trials, trial-epochs, best completed trial's beta and top-1."""
    rows = []
    for part, trials in frame.groupby("part", sort=False):
        completed = trials[(trials["status"] == "completed") & trials[metric].notna()]
        best = completed.loc[completed[metric].idxmax()] if not completed.empty else None
        is_baseline = str(part).startswith(BASELINE_PREFIX)
        rows.append(
            {
                "teacher": str(part) if is_baseline else str(trials["teacher"].iloc[0]),
                "model": str(trials["teacher_model"].iloc[0]),
                "gap": float(trials["teacher_gap"].max())
                if trials["teacher_gap"].notna().any()
                else math.nan,
                "trials": len(trials),
                "completed": len(completed),
                "trial_epochs": int(trials["stop_epoch"].sum()),
                "best_beta": float(best["beta"]) if best is not None and not is_baseline else math.nan,
                f"best_{metric}": float(best[metric]) if best is not None else math.nan,
                "predicted_beta": float(trials["predicted_beta"].max())
                if trials["predicted_beta"].notna().any()
                else math.nan,
            }
        )
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    order = {teacher: position for position, teacher in enumerate(teacher_order(frame))}
    summary["_baseline"] = summary["teacher"].str.startswith(BASELINE_PREFIX)
    summary["_order"] = summary["teacher"].map(order).fillna(len(order))
    summary = summary.sort_values(["_baseline", "_order", "teacher"]).drop(columns=["_baseline", "_order"])
    if summary["predicted_beta"].isna().all():
        summary = summary.drop(columns=["predicted_beta"])
    return summary.reset_index(drop=True)


def _nan_last(value: float) -> float:
    return math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
