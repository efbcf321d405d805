"""Figures of a search as PNG files: learning curves, top-1 vs beta per teacher, best beta vs teacher gap with the auto-beta curve.

matplotlib runs headless (the Agg backend) so figures are written on servers and in Ray drivers.
Every function writes one file atomically and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.ticker import FuncFormatter, LogLocator

from analysis.tables import distillation_trials, teacher_order
from dkd_tune.config.plan import BASELINE_PREFIX
from dkd_tune.core.files import atomic_path
from dkd_tune.teacher.auto_beta import AnyCalibration, CalibrationPoint

DPI = 120


@dataclass(frozen=True)
class BetaMark:
    """A run to mark on the accuracy-vs-beta plot (e.g. the full run at the predicted beta)."""

    teacher: str
    beta: float
    accuracy: float
    label: str
    marker: str = "X"


@dataclass(frozen=True)
class PredictionMark:
    """A predicted beta for one teacher's gap on the beta-vs-gap plot (with a line to the searched best, if given)."""

    teacher: str
    gap: float
    beta: float
    searched_beta: float | None
    label: str
    marker: str = "X"
    color: str = "tab:red"


def plot_learning_curves(
    histories: pd.DataFrame, frame: pd.DataFrame, path: str | Path, metric: str = "test_acc"
) -> Path:
    """`metric` per epoch for every trial, one panel per teacher (and baseline), coloured by beta."""
    parts = [p for p in _part_order(frame) if p in set(histories.get("part", pd.Series(dtype=str)))]
    if not parts:
        parts = ["(no trials)"]
    columns = min(len(parts), 3)
    rows = math.ceil(len(parts) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False, layout="constrained"
    )
    trials = frame.set_index(["part", "trial_id"])
    betas = distillation_trials(frame)["beta"].astype("float64")
    norm = LogNorm(betas.min(), betas.max()) if len(betas) and betas.min() < betas.max() else None
    colormap = plt.get_cmap("viridis")
    for axis, part in zip(axes.flat, parts, strict=False):
        part_histories = histories[histories["part"] == part] if "part" in histories else histories.iloc[:0]
        for trial_id, history in part_histories.groupby("trial_id", sort=True):
            history = history.sort_values("epoch")
            key = (part, trial_id)
            status = trials.loc[key, "status"] if key in trials.index else "completed"
            beta = trials.loc[key, "beta"] if key in trials.index else math.nan
            is_baseline = str(part).startswith(BASELINE_PREFIX)
            color = "black" if is_baseline or norm is None or not beta > 0 else colormap(norm(beta))
            completed = status == "completed"
            axis.plot(
                history["epoch"],
                history[metric],
                color=color,
                linewidth=1.6 if completed else 0.9,
                alpha=1.0 if completed else 0.45,
                linestyle="-" if completed else "--",
            )
        axis.set_title(_part_title(frame, part), fontsize=10)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(parts) :]:
        axis.set_visible(False)
    if norm is not None:
        mappable = plt.cm.ScalarMappable(norm=norm, cmap=colormap)
        figure.colorbar(mappable, ax=axes, label="beta", shrink=0.9)
    figure.suptitle("Learning curves (solid: full budget; dashed: stopped by ASHA)", fontsize=11)
    return _save(figure, path)


def plot_accuracy_vs_beta(
    frame: pd.DataFrame,
    path: str | Path,
    *,
    metric: str = "final_test_acc",
    marks: Sequence[BetaMark] = (),
) -> Path:
    """Per teacher, `metric` of the full-budget trials against beta (log scale); the best one ringed."""
    figure, axis = plt.subplots(figsize=(7.0, 4.6))
    trials = distillation_trials(frame)
    completed = trials[(trials["status"] == "completed") & trials[metric].notna()]
    colors = _teacher_colors(frame)
    for teacher in teacher_order(frame):
        points = completed[completed["teacher"] == teacher].sort_values("beta")
        if points.empty:
            continue
        gap = points["teacher_gap"].max()
        label = f"{teacher} (gap {gap:.2f})" if pd.notna(gap) else str(teacher)
        color = colors[teacher]
        axis.plot(points["beta"], points[metric], "o-", color=color, label=label, alpha=0.8, markersize=5)
        best = points.loc[points[metric].idxmax()]
        axis.plot(best["beta"], best[metric], "o", markersize=13, markerfacecolor="none", color=color)
    for mark in marks:
        axis.plot(
            mark.beta,
            mark.accuracy,
            mark.marker,
            color=colors.get(mark.teacher, "black"),
            markersize=10,
            markeredgecolor="black",
        )
    for label, marker in {mark.label: mark.marker for mark in marks}.items():
        # One legend entry per kind of mark, uncoloured: the colour is the teacher's.
        axis.plot([], [], marker, color="white", markeredgecolor="black", markersize=10, label=label)
    for part, reference in frame[frame["part"].astype(str).str.startswith(BASELINE_PREFIX)].groupby("part"):
        finished = reference[(reference["status"] == "completed") & reference[metric].notna()]
        if not finished.empty:
            axis.axhline(finished[metric].max(), color="grey", linestyle=":", label=f"{part} (no teacher)")
    axis.set_xscale("log")
    _plain_log_ticks(axis.xaxis)
    axis.set_xlabel("beta (NCKD weight)")
    axis.set_ylabel(f"{metric} (COCO AP)" if metric.endswith("_ap") else f"{metric} (%)")
    axis.set_title(
        f"{'AP' if metric.endswith('_ap') else 'Top-1'} vs beta, trials that ran the full budget (ringed: best per teacher)",
        fontsize=10,
    )
    axis.grid(alpha=0.3, which="both")
    _dedupe_legend(axis)
    return _save(figure, path)


def plot_best_beta_vs_gap(
    points: Sequence[CalibrationPoint],
    path: str | Path,
    *,
    calibration: AnyCalibration | None = None,
    calibration_label: str | None = None,
    predictions: Sequence[PredictionMark] = (),
    points_label: str = "searched best beta",
    title: str = "Best beta found by the search vs the teacher's gap",
    note: str | None = None,
) -> Path:
    """Best beta per teacher against its gap, the auto-beta curve and its 80% interval, and predictions;
    `note` says on the figure what it cannot show."""
    figure, axis = plt.subplots(figsize=(7.0, 4.6))
    gaps = [point.mean_logit_gap for point in points] + [mark.gap for mark in predictions]
    if calibration is not None:
        gaps += list(calibration.gap_range)
    if gaps:
        low, high = min(gaps), max(gaps)
        margin = max(0.25, 0.15 * (high - low))
        grid = np.linspace(low - margin, high + margin, 200)
        if calibration is not None and calibration.predicts_from_gap:
            suggestions = [calibration.predict(float(gap)) for gap in grid]
            label = calibration_label or f"auto-beta ({calibration.name})"
            axis.plot(grid, [s.beta for s in suggestions], color="tab:blue", label=label)
            axis.fill_between(
                grid,
                [s.low for s in suggestions],
                [s.high for s in suggestions],
                color="tab:blue",
                alpha=0.12,
                label="its 80% interval",
            )
    for point in points:
        axis.plot(point.mean_logit_gap, point.best_beta, "o", color="black", markersize=7)
        axis.annotate(
            point.teacher,
            (point.mean_logit_gap, point.best_beta),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    if points:
        axis.plot([], [], "o", color="black", label=points_label)
    for mark in predictions:
        axis.plot(mark.gap, mark.beta, mark.marker, color=mark.color, markersize=9, label=mark.label)
        if mark.searched_beta is not None:
            axis.plot([mark.gap, mark.gap], [mark.beta, mark.searched_beta], color=mark.color, alpha=0.5)
    axis.set_yscale("log")
    _plain_log_ticks(axis.yaxis)
    axis.set_xlabel("teacher's mean logit gap z_t - z_max (training set)")
    axis.set_ylabel("beta")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3, which="both")
    if note:
        axis.text(0.02, 0.02, note, transform=axis.transAxes, fontsize=8, color="dimgray", va="bottom")
    _dedupe_legend(axis)
    return _save(figure, path)


def _part_order(frame: pd.DataFrame) -> list[str]:
    teachers = teacher_order(frame)
    by_teacher = {}
    for part, trials in frame.groupby("part", sort=True):
        by_teacher[str(part)] = str(trials["teacher"].iloc[0])
    searched = [
        p for t in teachers for p, teacher in by_teacher.items() if teacher == t and not _is_baseline(p)
    ]
    return searched + sorted(p for p in by_teacher if _is_baseline(p))


def _part_title(frame: pd.DataFrame, part: str) -> str:
    trials = frame[frame["part"] == part]
    if trials.empty or _is_baseline(part):
        return f"{part} (no teacher)" if _is_baseline(part) else part
    gap = trials["teacher_gap"].max()
    model = trials["teacher_model"].iloc[0]
    return f"{part} ({model}, gap {gap:.2f})" if pd.notna(gap) else f"{part} ({model})"


def _is_baseline(part: str) -> bool:
    return str(part).startswith(BASELINE_PREFIX)


def _teacher_colors(frame: pd.DataFrame) -> Mapping[str, str]:
    palette = plt.get_cmap("tab10")
    return {teacher: palette(index % 10) for index, teacher in enumerate(teacher_order(frame))}


def _plain_log_ticks(axis) -> None:
    """Log-scale ticks written as 0.5, 2, 8 rather than 5x10^-1."""
    formatter = FuncFormatter(lambda value, _position: f"{value:g}")
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(formatter)
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))


def _dedupe_legend(axis) -> None:
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        axis.legend(unique.values(), unique.keys(), fontsize=8, loc="best")


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path
