"""Best beta per teacher from finished searches' results Parquet, turned into an auto-beta calibration."""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from dkd_tune import __version__
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import file_sha256
from dkd_tune.core.selection import SPLIT_METRICS, selection_metric
from dkd_tune.teacher.auto_beta import (
    FAMILIES,
    Calibration,
    CalibrationPoint,
    fit_calibration,
    save_calibration,
)

REQUIRED_COLUMNS = (
    "search",
    "teacher",
    "teacher_model",
    "teacher_gap",
    "dataset",
    "dataset_family",
    "loss",
    "status",
    "beta",
    "final_test_acc",
)
# The score a trial is chosen by, in order of preference: the validation split when the search held
# one out (choose on validation, report on test), the test split only when it did not.
# The project's rule (dkd_tune.core.selection), most preferred first: validation scores, then test ones.
SELECTION_SCORES = tuple(
    f"final_{selection_metric(task, validated)}" for validated in (True, False) for task in SPLIT_METRICS
)
SELECTION_RULE = (
    "each point is the beta of the DKD trial with the highest final validation score (final_val_acc, "
    "or final_val_ap for detection; the test split's score only for a search without a validation "
    "split, which the point's source names) among the trials of one (search, teacher) that ran the "
    "full budget (status 'completed'; ASHA-stopped trials are not comparable)"
)

ResultsSource = pd.DataFrame | str | os.PathLike


def calibration_points_from_results(results: Iterable[ResultsSource]) -> list[CalibrationPoint]:
    """One point per (search, teacher): the best completed DKD trial's beta and that teacher's gap."""
    points, _family, _labels, _on_test = _points_and_family(list(results))
    return points


def calibrate_from_results(
    results: Iterable[ResultsSource],
    out: str | os.PathLike,
    family: str | None = None,
    name: str | None = None,
) -> tuple[Calibration, list[str]]:
    """Fit a calibration from results Parquet files (or frames), write it atomically to `out`.

    Returns the calibration and its warnings (points chosen on the test split).
    """
    results = list(results)
    points, files_family, labels, chosen_on_test = _points_and_family(results)
    if len(points) < 2:
        raise UserInputError(
            f"only {len(points)} (search, teacher) pair(s) have completed DKD trials in {', '.join(labels)}; "
            "a beta fit needs at least 2 teachers"
        )
    if family is not None and family != files_family:
        raise UserInputError(
            f"--family {family} was given but the results are of family {files_family!r} "
            f"({', '.join(labels)}); gaps are not comparable across families"
        )
    described = []
    for source, label in zip(results, labels, strict=True):
        if isinstance(source, pd.DataFrame):
            described.append(label)
        else:
            described.append(f"{label} (sha256 {file_sha256(source)[:12]})")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    provenance = (
        f"Fitted by dkd-tune {__version__} `calibrate` on {today} from {', '.join(described)}; "
        f"{SELECTION_RULE}; the gap is the teacher's mean z_t - z_max as measured by the search."
    )
    warnings = []
    if chosen_on_test:
        warnings.append(
            f"the best beta of {', '.join(chosen_on_test)} was chosen on the test split: their searches "
            "had no validation split (data.validation), so those points fit the split they report on"
        )
        provenance += f" Chosen on the test split: {', '.join(chosen_on_test)}."
    calibration = fit_calibration(points, files_family, provenance, name=name or Path(out).stem)
    save_calibration(calibration, out)
    return calibration, warnings


def _points_and_family(
    results: list[ResultsSource],
) -> tuple[list[CalibrationPoint], str, list[str], list[str]]:
    """The points, the family, a label per source and the points chosen on the test split."""
    if not results:
        raise UserInputError("no results given: pass the results Parquet files of finished searches")
    frames, labels = [], []
    for index, source in enumerate(results):
        label = f"results frame #{index}" if isinstance(source, pd.DataFrame) else str(source)
        frame = source if isinstance(source, pd.DataFrame) else _read_results_file(source)
        missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
        if missing:
            raise UserInputError(
                f"{label}: missing column(s) {', '.join(missing)} "
                "(expected the per-trial results Parquet of a dkd-tune search)"
            )
        frames.append(frame.assign(_results_label=label))
        labels.append(label)
    trials = pd.concat(frames, ignore_index=True)
    family = _single_family(trials, labels)

    dkd = trials[trials["loss"] == "dkd"]
    finished = dkd[
        (dkd["status"] == "completed")
        & _has_a_selection_score(dkd)
        & dkd["beta"].map(lambda beta: _is_finite(beta) and beta > 0)
    ]
    points, chosen_on_test = [], []
    groups = list(finished.groupby(["search", "teacher"], sort=True))
    repeated = finished.groupby("teacher")["search"].nunique()
    for (search, teacher), group in groups:
        score = _group_selection_score(group)
        # Highest score wins; a tie goes to the smaller beta so the choice does not depend on row order.
        best = group.sort_values([score, "beta"], ascending=[False, True], kind="stable").iloc[0]
        gap = _teacher_gap(trials, search, teacher)
        label = f"{search}/{teacher}" if repeated[teacher] > 1 else str(teacher)
        if score.startswith("final_test"):
            chosen_on_test.append(label)
        points.append(
            CalibrationPoint(
                teacher=label,
                mean_logit_gap=gap,
                best_beta=float(best["beta"]),
                source=(
                    f"search {search!r} in {best['_results_label']}: teacher {best['teacher_model']} on "
                    f"{best['dataset']}, best {score} {float(best[score]):.4g} "
                    f"of {len(group)} completed DKD trials"
                ),
            )
        )
    points.sort(key=lambda point: (point.mean_logit_gap, point.teacher))
    return points, family, labels, chosen_on_test


def _has_a_selection_score(trials: pd.DataFrame) -> pd.Series:
    """Whether each trial has a finite value of any of SELECTION_SCORES."""
    present = pd.Series(False, index=trials.index)
    for name in SELECTION_SCORES:
        if name in trials:
            present |= trials[name].map(_is_finite).astype(bool)
    return present


def _group_selection_score(group: pd.DataFrame) -> str:
    """The score every trial of one (search, teacher) is compared by: the most preferred they all have."""
    for name in SELECTION_SCORES:
        finite = group[name].map(_is_finite) if name in group else pd.Series(False, index=group.index)
        if finite.all():
            return name
        if finite.any():  # trials of one search share its splits: mixed scores mean a file edited by hand
            break
    raise UserInputError(
        f"search {group['search'].iloc[0]!r} teacher {group['teacher'].iloc[0]!r}: its completed DKD trials "
        f"do not share one of {', '.join(SELECTION_SCORES)}; the trials of a search are scored alike"
    )


def _read_results_file(path: str | os.PathLike) -> pd.DataFrame:
    import pyarrow

    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise UserInputError(f"{path}: results file not found") from None
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"{path}: cannot read results Parquet ({reason})") from None


def _single_family(trials: pd.DataFrame, labels: list[str]) -> str:
    by_family = trials.dropna(subset=["dataset_family"]).groupby("dataset_family", sort=True)[
        "_results_label"
    ]
    files_per_family = {family: sorted(set(files)) for family, files in by_family}
    if not files_per_family:
        raise UserInputError(f"no trials with a dataset_family in {', '.join(labels)}")
    if len(files_per_family) > 1:
        listing = "; ".join(f"{family} ({', '.join(files)})" for family, files in files_per_family.items())
        raise UserInputError(
            f"the results mix dataset families: {listing}; a calibration is for one family, "
            "pass the results of one family only"
        )
    family = next(iter(files_per_family))
    if family not in FAMILIES:
        raise UserInputError(
            f"{', '.join(labels)}: dataset_family {family!r} is not a known family "
            f"(expected one of {', '.join(FAMILIES)})"
        )
    return family


def _teacher_gap(trials: pd.DataFrame, search: str, teacher: str) -> float:
    rows = trials[(trials["search"] == search) & (trials["teacher"] == teacher)]
    gaps = sorted({float(gap) for gap in rows["teacher_gap"] if _is_finite(gap)})
    if not gaps:
        raise UserInputError(f"search {search!r} teacher {teacher!r}: no finite teacher_gap in its trials")
    if not math.isclose(gaps[0], gaps[-1], rel_tol=1e-6, abs_tol=1e-9):
        raise UserInputError(
            f"search {search!r} teacher {teacher!r}: trials disagree on teacher_gap "
            f"({gaps[0]:g} .. {gaps[-1]:g}); the gap is measured once per search"
        )
    return gaps[0]


def _is_finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
