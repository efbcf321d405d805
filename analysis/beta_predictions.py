"""Predicted betas per teacher, each made without that teacher's own search result, and their regret against the search.

For every teacher of a finished search this module gives the searched best beta (the completed
DKD trial with the highest final top-1) and the betas that predictors make from the teacher's
gap. The predictors that are evaluated by training at their beta never see the teacher's own
search result:

- `loo`: auto-beta's fit (`fit_calibration`) refitted on the OTHER teachers' (gap, best beta)
  points, then asked for this teacher's gap: the held-out test of auto-beta.
- `constant`: the geometric mean of the other teachers' best betas, i.e. the same fit with its
  slope held at 0. If `loo` does no better than this, the gap carried no information.
- `calibration`: a calibration made elsewhere for this dataset family (the user's file, or the
  one dkd-tune ships for the family), asked for this teacher's gap.

Two more are reported but not trained: `in_sample` (the fit to all teachers, this one included:
how well the relation holds, not a prediction) and `cifar` (the shipped CIFAR calibration applied
to a gap from another family, which it was not made for).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from analysis.tables import distillation_trials
from dkd_tune.auto_beta import Calibration, CalibrationPoint, fit_calibration

TRAINED_PREDICTORS = ("loo", "constant", "calibration")
REPORTED_PREDICTORS = ("in_sample", "cifar")
# A predicted beta within 0.5% of a completed search trial's beta counts as covered by that trial
# (the numbers in the report have 3 significant digits); anything else is trained.
COVERED_RELATIVE_TOLERANCE = 0.005
# The Parquet schema of the evaluation (documented in the README): name -> pandas dtype.
EVALUATION_COLUMNS = {
    "teacher": "string",
    "teacher_model": "string",
    "teacher_gap": "float64",
    "predictor": "string",
    "predicted_beta": "float64",
    "searched_beta": "float64",
    "log2_error": "float64",
    "accuracy": "float64",
    "searched_accuracy": "float64",
    "regret": "float64",
    "source": "string",
    "run_wall_time_s": "float64",
    "warnings": "string",
    "detail": "string",
}


@dataclass(frozen=True)
class Prediction:
    """One predictor's beta for one teacher, and why it may be unreliable."""

    predictor: str
    beta: float
    warnings: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class TeacherBetas:
    """A teacher's gap, its searched best beta and accuracy, and every predictor's beta for it."""

    teacher: str
    teacher_model: str
    gap: float
    searched_beta: float | None
    searched_acc: float | None
    searched_trial: str | None
    completed_trials: int
    predictions: dict[str, Prediction] = field(default_factory=dict)


def best_completed_trial(frame: pd.DataFrame, teacher: str) -> pd.Series | None:
    """The teacher's completed DKD trial with the highest final top-1 (ties: the smaller beta), as calibrations pick it."""
    trials = distillation_trials(frame)
    completed = trials[
        (trials["teacher"] == teacher) & (trials["status"] == "completed") & trials["final_test_acc"].notna()
    ]
    if completed.empty:
        return None
    return completed.sort_values(["final_test_acc", "beta"], ascending=[False, True], kind="stable").iloc[0]


def teacher_betas(
    frame: pd.DataFrame,
    family: str,
    *,
    calibration: Calibration | None = None,
    cifar: Calibration | None = None,
) -> list[TeacherBetas]:
    """Every teacher of the search (by gap) with its searched best beta and the predictors' betas."""
    teachers = []
    for teacher, trials in distillation_trials(frame).groupby("teacher", sort=True):
        gaps = trials["teacher_gap"].dropna()
        if gaps.empty:
            continue
        best = best_completed_trial(frame, str(teacher))
        teachers.append(
            TeacherBetas(
                teacher=str(teacher),
                teacher_model=str(trials["teacher_model"].iloc[0]),
                gap=float(gaps.iloc[0]),
                searched_beta=float(best["beta"]) if best is not None else None,
                searched_acc=float(best["final_test_acc"]) if best is not None else None,
                searched_trial=str(best["trial_id"]) if best is not None else None,
                completed_trials=int(
                    ((trials["status"] == "completed") & trials["final_test_acc"].notna()).sum()
                ),
            )
        )
    teachers.sort(key=lambda t: (t.gap, t.teacher))
    points = [
        CalibrationPoint(t.teacher, t.gap, t.searched_beta) for t in teachers if t.searched_beta is not None
    ]
    for entry in teachers:
        others = [point for point in points if point.teacher != entry.teacher]
        predictions = entry.predictions
        if len(others) >= 2 and len({point.mean_logit_gap for point in others}) >= 2:
            held_out = fit_calibration(others, family, f"leave-one-out: fitted without {entry.teacher}")
            predictions["loo"] = _predict(
                "loo", held_out, entry.gap, f"fitted on {', '.join(p.teacher for p in others)}"
            )
        if others:
            mean_log = math.fsum(math.log(point.best_beta) for point in others) / len(others)
            predictions["constant"] = Prediction(
                "constant",
                math.exp(mean_log),
                detail=f"geometric mean of the best betas of {', '.join(p.teacher for p in others)}",
            )
        if calibration is not None:
            predictions["calibration"] = _predict("calibration", calibration, entry.gap, calibration.name)
        if len(points) >= 2 and len({point.mean_logit_gap for point in points}) >= 2:
            everyone = fit_calibration(points, family, "in-sample: fitted on every teacher")
            predictions["in_sample"] = _predict("in_sample", everyone, entry.gap, "fitted on every teacher")
        if cifar is not None:
            predictions["cifar"] = _predict("cifar", cifar, entry.gap, cifar.name)
    return teachers


def covering_trial(frame: pd.DataFrame, teacher: str, beta: float) -> pd.Series | None:
    """A completed search trial of `teacher` at this beta (within COVERED_RELATIVE_TOLERANCE), nearest first."""
    trials = distillation_trials(frame)
    completed = trials[
        (trials["teacher"] == teacher) & (trials["status"] == "completed") & trials["final_test_acc"].notna()
    ]
    if completed.empty:
        return None
    distance = (completed["beta"].astype("float64") / beta).map(lambda ratio: abs(math.log(ratio)))
    nearest = distance.idxmin()
    return completed.loc[nearest] if distance[nearest] <= math.log1p(COVERED_RELATIVE_TOLERANCE) else None


def betas_to_train(
    teachers: Sequence[TeacherBetas],
    search_frame: pd.DataFrame,
    predictors: Sequence[str] = TRAINED_PREDICTORS,
) -> dict[str, list[float]]:
    """teacher -> the distinct predicted betas that no completed search trial covers (these are trained)."""
    pending: dict[str, list[float]] = {}
    for entry in teachers:
        for name in predictors:
            prediction = entry.predictions.get(name)
            if prediction is None or covering_trial(search_frame, entry.teacher, prediction.beta) is not None:
                continue
            betas = pending.setdefault(entry.teacher, [])
            if not any(_same_beta(prediction.beta, beta) for beta in betas):
                betas.append(prediction.beta)
    return {teacher: sorted(betas) for teacher, betas in pending.items()}


def evaluation_rows(
    teachers: Sequence[TeacherBetas],
    search_frame: pd.DataFrame,
    runs_frame: pd.DataFrame,
    predictors: Sequence[str] = (*TRAINED_PREDICTORS, *REPORTED_PREDICTORS),
) -> pd.DataFrame:
    """Long format, one row per (teacher, predictor): beta, the top-1 reached at it (where trained) and the regret."""
    rows = []
    for entry in teachers:
        for name in predictors:
            prediction = entry.predictions.get(name)
            if prediction is None:
                continue
            accuracy, source, wall = None, "not trained", None
            if name in TRAINED_PREDICTORS:
                row = covering_trial(search_frame, entry.teacher, prediction.beta)
                if row is not None:
                    source = f"search trial {row['trial_id']}"
                else:
                    row = _run_at(runs_frame, entry.teacher, prediction.beta)
                    source = f"full run {row['trial_id']}" if row is not None else "missing"
                if row is not None and row["status"] == "completed":
                    accuracy = float(row["final_test_acc"])
                    wall = float(row["wall_time_s"]) if pd.notna(row["wall_time_s"]) else None
                elif row is not None:
                    source += f" ({row['status']})"
            regret = (
                entry.searched_acc - accuracy
                if accuracy is not None and entry.searched_acc is not None
                else None
            )
            log2_error = (
                math.log2(prediction.beta / entry.searched_beta) if entry.searched_beta is not None else None
            )
            rows.append(
                {
                    "teacher": entry.teacher,
                    "teacher_model": entry.teacher_model,
                    "teacher_gap": entry.gap,
                    "predictor": name,
                    "predicted_beta": prediction.beta,
                    "searched_beta": entry.searched_beta,
                    "log2_error": log2_error,
                    "accuracy": accuracy,
                    "searched_accuracy": entry.searched_acc,
                    "regret": regret,
                    "source": source,
                    "run_wall_time_s": wall,
                    "warnings": "; ".join(prediction.warnings),
                    "detail": prediction.detail,
                }
            )
    frame = pd.DataFrame(rows, columns=list(EVALUATION_COLUMNS))
    return frame.astype(EVALUATION_COLUMNS)


def _predict(name: str, calibration: Calibration, gap: float, detail: str) -> Prediction:
    suggestion = calibration.predict(gap)
    return Prediction(name, float(suggestion.beta), tuple(suggestion.warnings), detail)


def _run_at(runs: pd.DataFrame, teacher: str, beta: float) -> pd.Series | None:
    if runs.empty:
        return None
    candidates = runs[(runs["teacher"] == teacher) & runs["beta"].notna()]
    matches = candidates[candidates["beta"].map(lambda value: _same_beta(float(value), beta))]
    return matches.iloc[0] if not matches.empty else None


def _same_beta(a: float, b: float) -> bool:
    return abs(math.log(a / b)) <= math.log1p(COVERED_RELATIVE_TOLERANCE)
