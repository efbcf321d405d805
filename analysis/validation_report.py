"""The report of `dkd-tune validate-beta`: Markdown, the evaluation and compute tables as Parquet, and the figures."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.beta_predictions import TRAINED_PREDICTORS, TeacherBetas
from analysis.compute_cost import StepFlops, compute_table, step_flops
from analysis.plots import BetaMark, PredictionMark, plot_accuracy_vs_beta, plot_best_beta_vs_gap
from analysis.tables import format_cell, markdown_table
from dkd_tune.auto_beta import Calibration, CalibrationPoint, fit_calibration
from dkd_tune.config import SearchSpaceFile
from dkd_tune.storage import atomic_path, atomic_write_text

REPORT_FILE = "validation.md"
EVALUATION_FILE = "evaluation.parquet"
COMPUTE_FILE = "compute.parquet"
BETA_VS_GAP_FIGURE = "validation_beta_vs_gap.png"
ACCURACY_FIGURE = "validation_accuracy_vs_beta.png"
PREDICTOR_NAMES = {
    "loo": "auto-beta, leave-one-teacher-out",
    "constant": "constant, leave-one-teacher-out",
    "calibration": "auto-beta, calibration",
    "in_sample": "auto-beta fitted on every teacher (in-sample)",
    "cifar": "shipped CIFAR calibration",
}


@dataclass
class ValidationContext:
    """What the report states about how the validation was run."""

    name: str
    space: SearchSpaceFile
    source: str
    command: str
    sessions: list[dict[str, Any]]
    machine: str
    load_average: tuple[float, float]
    search_dir: Path
    autobeta_dir: Path | None
    family: str
    calibration: Calibration | None
    cifar: Calibration | None


def write_validation_outputs(
    context: ValidationContext,
    teachers: Sequence[TeacherBetas],
    evaluation: pd.DataFrame,
    search_frame: pd.DataFrame,
    runs_frame: pd.DataFrame,
    histories: pd.DataFrame,
    runs_histories: pd.DataFrame,
    search_state: dict[str, Any],
    folder: Path,
):
    """Write the report, the two Parquet tables and the two figures into `folder`; return the outcome."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis.validation import ValidationOutcome

    artifacts = search_state.get("teachers", {})
    flops = {
        entry.teacher: _teacher_flops(
            context.space.student, entry.teacher_model, artifacts.get(entry.teacher, {})
        )
        for entry in teachers
    }
    cache_views = {label: _cache_views(context.space, data) for label, data in artifacts.items()}
    loo_runs = evaluation[evaluation["predictor"] == _primary(evaluation)]
    wall = {row["teacher"]: row["run_wall_time_s"] for _, row in loo_runs.iterrows()}
    compute = compute_table(search_frame, histories, flops, cache_views, context.space.max_epochs(), wall)
    figures = [
        _beta_vs_gap_figure(teachers, context, folder / BETA_VS_GAP_FIGURE),
        _accuracy_figure(search_frame, evaluation, folder / ACCURACY_FIGURE),
    ]
    timing = training_time_table(artifacts, histories, runs_histories, search_frame, runs_frame)
    report = report_markdown(context, teachers, evaluation, compute, search_frame, artifacts, timing)
    report_path = folder / REPORT_FILE
    atomic_write_text(report_path, report)
    paths = {}
    for file_name, frame in ((EVALUATION_FILE, evaluation), (COMPUTE_FILE, compute)):
        with atomic_path(folder / file_name) as tmp:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        paths[file_name] = folder / file_name
    return ValidationOutcome(
        folder=folder,
        report_path=report_path,
        evaluation_path=paths[EVALUATION_FILE],
        compute_path=paths[COMPUTE_FILE],
        figures=figures,
        summary=summary_markdown(evaluation),
        evaluation=evaluation,
    )


def report_markdown(
    context: ValidationContext,
    teachers: Sequence[TeacherBetas],
    evaluation: pd.DataFrame,
    compute: pd.DataFrame,
    search_frame: pd.DataFrame,
    artifacts: dict[str, Any],
    timing: pd.DataFrame,
) -> str:
    """The whole report: how it was run, the per-teacher table, the summary, compute, time, and what limits it."""
    space = context.space
    seconds = sum(float(session["seconds"]) for session in context.sessions)
    first = context.sessions[0]["started"] if context.sessions else time.strftime("%Y-%m-%d %H:%M:%S")
    beta_range = space.space_for(space.teachers[0])["beta"]
    fixed = space.base_recipe(space.teachers[0])
    lines = [
        f"# Auto-beta validation: {context.name}",
        "",
        f"- Command: `{context.command or 'dkd-tune validate-beta ' + context.source}`",
        f"- Started {first}, report written {time.strftime('%Y-%m-%d %H:%M:%S')}; wall time {seconds:.0f} s "
        f"({seconds / 60:.1f} min) in {len(context.sessions)} session(s), teacher training included",
        f"- Machine: {context.machine}; 1-minute load average {context.load_average[0]:.1f} at the start of the "
        f"last session, {context.load_average[1]:.1f} at its end",
        f"- Data: `{_compact(space.data_spec_value())}` (family {context.family}); student {space.student}, "
        f"{space.max_epochs()} epochs per full run; fixed recipe: alpha {fixed.alpha:g}, T {fixed.temperature:g}, "
        f"warm-up {fixed.warmup_epochs} epochs, lr {fixed.lr:g}, batch {fixed.batch_size}, seed {fixed.seed}",
        f"- Search per teacher: {space.search.algorithm} over beta {_compact(beta_range.to_yaml_value())}, "
        f"{space.search.num_samples} trials, scheduler {space.scheduler.type}"
        + (
            f" (grace {space.scheduler.grace_period}, reduction factor {space.scheduler.reduction_factor:g})"
            if space.scheduler.type == "asha"
            else ""
        ),
        f"- Searches: `{context.search_dir.name}`"
        + (
            f", full runs at the predicted betas: `{context.autobeta_dir.name}`"
            if context.autobeta_dir
            else ""
        ),
        "",
        "## Per teacher",
        "",
        "Each teacher's predictions are made without its own search result: `loo` refits auto-beta "
        "(log beta linear in the gap, slope >= 0) on the other teachers' (gap, searched best beta) points; "
        "`constant` is the geometric mean of the other teachers' best betas (the same fit with its slope at 0, "
        "the baseline a useful gap must beat). Regret = top-1 at the searched best beta - top-1 of a full run "
        "at the predicted beta (same recipe, seed and epochs). Top-1 is the final test top-1 (%).",
        "",
        markdown_table(per_teacher_table(teachers, evaluation, artifacts)),
        "",
        "## Summary",
        "",
        summary_markdown(evaluation),
        "",
        *_fit_lines(teachers, context),
        "",
        "## Compute spent finding beta",
        "",
        "In trial-epochs: one epoch of DKD training of the student with the live teacher. The search's "
        "count is the sum of its trials' epochs (ASHA-stopped trials included); auto-beta's is one full run "
        "plus one teacher pass over the training set to measure the gap, converted by FLOPs per image "
        "(teacher forward / (student forward+backward + teacher forward)). Teacher training is needed by "
        "both and not counted. Auto-beta also needs a calibration: here the other teachers' searches, "
        "made once per dataset family and reused for every new teacher.",
        "",
        markdown_table(_compute_shown(compute)),
        "",
        "## Where the time went",
        "",
        "Training seconds are the sum of the measured epoch times (training only: no evaluation, start-up or "
        "logging), each on one core; two trials ran at once. The fastest epoch of each kind shows the speed "
        "when the shared machine disturbed it least.",
        "",
        markdown_table(timing),
        "",
        "## Limits of this evidence",
        "",
        *[f"- {line}" for line in limitations(teachers, evaluation, search_frame, context)],
        "",
        f"![best beta vs gap]({BETA_VS_GAP_FIGURE})",
        "",
        f"![top-1 vs beta]({ACCURACY_FIGURE})",
        "",
    ]
    return "\n".join(lines)


def training_time_table(
    artifacts: dict[str, Any],
    histories: pd.DataFrame,
    runs_histories: pd.DataFrame,
    search_frame: pd.DataFrame,
    runs_frame: pd.DataFrame,
) -> pd.DataFrame:
    """Per teacher: epochs and training seconds of the teacher, its search's trials and the full runs."""
    from dkd_tune.checkpoint import load_checkpoint
    from dkd_tune.errors import UserInputError
    from dkd_tune.train import LAST_CHECKPOINT

    rows = []
    for label, artifact in artifacts.items():
        row: dict[str, Any] = {"teacher": label}
        last = Path(artifact["checkpoint"]).parent / LAST_CHECKPOINT
        teacher_epochs: list[float] = []
        if last.is_file():
            try:
                teacher_epochs = [float(h["epoch_time_s"]) for h in load_checkpoint(last).get("history", [])]
            except (UserInputError, KeyError, TypeError):
                teacher_epochs = []
        for prefix, times in (
            ("teacher", teacher_epochs),
            ("search", _epoch_times(histories, search_frame, label)),
            ("full runs", _epoch_times(runs_histories, runs_frame, label)),
        ):
            row[f"{prefix} epochs"] = len(times)
            row[f"{prefix} training s"] = sum(times) if times else math.nan
            row[f"{prefix} fastest epoch s"] = min(times) if times else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        total = {
            "teacher": "all",
            **{c: table[c].sum() for c in table.columns if "fastest" not in c and c != "teacher"},
        }
        table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    return table


def _epoch_times(histories: pd.DataFrame, frame: pd.DataFrame, teacher: str) -> list[float]:
    if histories.empty or frame.empty or "epoch_time_s" not in histories:
        return []
    trials = frame[frame["teacher"] == teacher]
    mine = histories[
        histories["part"].isin(trials["part"].unique()) & histories["trial_id"].isin(trials["trial_id"])
    ]
    return [float(value) for value in mine["epoch_time_s"].dropna()]


def per_teacher_table(
    teachers: Sequence[TeacherBetas], evaluation: pd.DataFrame, artifacts: dict[str, Any]
) -> pd.DataFrame:
    rows = []
    for entry in teachers:
        gap = (artifacts.get(entry.teacher) or {}).get("gap") or {}
        row = {
            "teacher": entry.teacher,
            "model": entry.teacher_model,
            "gap": entry.gap,
            "teacher top-1": gap.get("test_acc"),
            "completed trials": entry.completed_trials,
            "searched best beta": entry.searched_beta,
            "top-1 at best": entry.searched_acc,
        }
        for predictor in TRAINED_PREDICTORS:
            found = evaluation[
                (evaluation["teacher"] == entry.teacher) & (evaluation["predictor"] == predictor)
            ]
            if found.empty:
                continue
            result = found.iloc[0]
            row[f"{predictor} beta"] = result["predicted_beta"]
            row[f"{predictor} top-1"] = result["accuracy"]
            row[f"{predictor} regret"] = result["regret"]
        rows.append(row)
    return pd.DataFrame(rows)


def summary_markdown(evaluation: pd.DataFrame) -> str:
    """Per predictor: teachers evaluated, mean and worst regret, mean |log2(predicted / searched beta)|."""
    rows = []
    for predictor in (*TRAINED_PREDICTORS, "in_sample", "cifar"):
        found = evaluation[evaluation["predictor"] == predictor]
        if found.empty:
            continue
        regrets = found["regret"].dropna()
        errors = found["log2_error"].dropna().abs()
        rows.append(
            {
                "predictor": PREDICTOR_NAMES[predictor],
                "teachers": len(found),
                "mean regret (points)": regrets.mean() if not regrets.empty else math.nan,
                "worst regret": regrets.max() if not regrets.empty else math.nan,
                "mean abs log2(beta / searched)": errors.mean() if not errors.empty else math.nan,
                "trained": "yes" if predictor in TRAINED_PREDICTORS else "no (reported only)",
            }
        )
    return markdown_table(pd.DataFrame(rows)) if rows else "(no predictions)"


def limitations(
    teachers: Sequence[TeacherBetas],
    evaluation: pd.DataFrame,
    search_frame: pd.DataFrame,
    context: ValidationContext,
) -> list[str]:
    """Facts that bound what the numbers can show, stated from the data."""
    lines = [
        f"{len(teachers)} teachers, one seed: each accuracy is a single training run, so a regret smaller than "
        "the run-to-run spread of this student is not distinguishable from zero.",
        "The searched best is the highest of several runs, so its accuracy is biased upwards (a winner's curse): "
        "regret overstates what a prediction loses, and a negative regret means the prediction's run beat every "
        "searched trial.",
    ]
    spread = _neighbour_spread(search_frame)
    if spread is not None:
        lines.append(
            f"Noise scale from the search itself: completed trials of one teacher whose betas differ by less than 25% differ in "
            f"top-1 by {spread:.2f} points (median over such pairs; beta itself contributes part of it)."
        )
    missing = [entry.teacher for entry in teachers if entry.searched_beta is None]
    if missing:
        lines.append(
            f"No completed search trial for {', '.join(missing)}: no searched best, no regret there."
        )
    warned = evaluation[(evaluation["predictor"] == "loo") & (evaluation["warnings"].str.len() > 0)]
    for _, row in warned.iterrows():
        lines.append(f"{row['teacher']} (loo): {row['warnings']}")
    if context.cifar is not None:
        cifar_low, cifar_high = context.cifar.gap_range
        lines.append(
            f"The shipped CIFAR calibration is shown for reference only: it was fitted on CIFAR-100 teachers with "
            f"gaps {cifar_low:.2f}-{cifar_high:.2f}; gaps of the {context.family} family are not comparable with "
            "them (another dataset, class count and recipe), so its betas here are not predictions."
        )
    return lines


def _fit_lines(teachers: Sequence[TeacherBetas], context: ValidationContext) -> list[str]:
    points = [
        CalibrationPoint(t.teacher, t.gap, t.searched_beta) for t in teachers if t.searched_beta is not None
    ]
    if len(points) < 2 or len({p.mean_logit_gap for p in points}) < 2:
        return []
    fit = fit_calibration(points, context.family, "in-sample fit on every teacher")
    doubling = (
        f"beta doubles every {math.log(2) / fit.slope:.2f} gap units" if fit.slope > 0 else "slope held at 0"
    )
    lines = [
        f"In-sample fit on all {len(points)} teachers: beta = {math.exp(fit.intercept):.3g} * exp({fit.slope:.3g} * gap) "
        f"({doubling}), RMSE {fit.rmse_log2:.2f} log2 units. This describes the searched points; it is not a "
        "held-out prediction."
    ]
    if context.calibration is not None:
        lines.append(
            f"Calibration evaluated: {context.calibration.name!r} ({len(context.calibration.points)} points)."
        )
    return lines


def _compute_shown(compute: pd.DataFrame) -> pd.DataFrame:
    shown = compute[
        [
            "teacher",
            "search_trials",
            "search_trial_epochs",
            "search_teacher_passes",
            "search_epoch_equivalents",
            "autobeta_epoch_equivalents",
            "search_over_autobeta",
            "search_wall_time_s",
            "autobeta_wall_time_s",
            "median_trial_epoch_s",
        ]
    ].copy()
    if not shown.empty:
        total = {
            "teacher": "all",
            **{column: shown[column].sum() for column in shown.columns if column not in ("teacher",)},
        }
        total["search_over_autobeta"] = (
            total["search_epoch_equivalents"] / total["autobeta_epoch_equivalents"]
        )
        total["median_trial_epoch_s"] = math.nan
        shown = pd.concat([shown, pd.DataFrame([total])], ignore_index=True)
    return shown.rename(
        columns={
            "search_trials": "search trials",
            "search_trial_epochs": "search trial-epochs",
            "search_teacher_passes": "search teacher passes",
            "search_epoch_equivalents": "search (trial-epochs)",
            "autobeta_epoch_equivalents": "auto-beta (trial-epochs)",
            "search_over_autobeta": "search / auto-beta",
            "search_wall_time_s": "search wall s (sum of trials)",
            "autobeta_wall_time_s": "full run wall s",
            "median_trial_epoch_s": "median s per training epoch",
        }
    )


def _beta_vs_gap_figure(teachers: Sequence[TeacherBetas], context: ValidationContext, path: Path) -> Path:
    points = [
        CalibrationPoint(t.teacher, t.gap, t.searched_beta) for t in teachers if t.searched_beta is not None
    ]
    curve = None
    if len(points) >= 2 and len({p.mean_logit_gap for p in points}) >= 2:
        curve = fit_calibration(points, context.family, "in-sample fit on every teacher", name="in-sample")
    marks = []
    for entry in teachers:
        for predictor, label in (
            ("loo", "auto-beta, teacher left out"),
            ("constant", "constant, teacher left out"),
        ):
            prediction = entry.predictions.get(predictor)
            if prediction is not None:
                marks.append(
                    PredictionMark(
                        entry.teacher,
                        entry.gap,
                        prediction.beta,
                        entry.searched_beta if predictor == "loo" else None,
                        label,
                        marker="X" if predictor == "loo" else "P",
                        color="tab:red" if predictor == "loo" else "tab:gray",
                    )
                )
    return plot_best_beta_vs_gap(
        points,
        path,
        calibration=curve,
        calibration_label="auto-beta fit on every teacher (in-sample)",
        predictions=marks,
    )


def _accuracy_figure(search_frame: pd.DataFrame, evaluation: pd.DataFrame, path: Path) -> Path:
    marks = []
    styles = {"loo": ("X", "run at auto-beta (teacher left out)"), "constant": ("P", "run at constant beta"),
              "calibration": ("D", "run at calibration's beta")}  # fmt: skip
    for _, row in evaluation.iterrows():
        if row["predictor"] in styles and pd.notna(row["accuracy"]):
            marker, label = styles[row["predictor"]]
            marks.append(BetaMark(row["teacher"], row["predicted_beta"], row["accuracy"], label, marker))
    return plot_accuracy_vs_beta(search_frame, path, marks=marks)


def _teacher_flops(student: str, model: str, artifact: dict[str, Any]) -> StepFlops:
    from dkd_tune.checkpoint import load_checkpoint

    payload = load_checkpoint(artifact["checkpoint"])
    return step_flops(student, model, int(artifact["num_classes"]), int(payload["input_size"]))


def _cache_views(space: SearchSpaceFile, artifact: dict[str, Any]) -> int:
    from dkd_tune.data import parse_data_spec
    from dkd_tune.data.views import num_views
    from dkd_tune.teacher import augmentation_views

    if not artifact.get("cache_path"):
        return 0
    views = augmentation_views(parse_data_spec(space.data_spec_value(), source="data").augment)
    return num_views(*views) if views else 0


def _primary(evaluation: pd.DataFrame) -> str:
    return "calibration" if (evaluation["predictor"] == "calibration").any() else "loo"


def _neighbour_spread(frame: pd.DataFrame) -> float | None:
    """Median |top-1 difference| between completed trials of one teacher whose betas are within 25%."""
    from analysis.tables import distillation_trials

    trials = distillation_trials(frame)
    completed = trials[(trials["status"] == "completed") & trials["final_test_acc"].notna()]
    differences = []
    for _, group in completed.groupby("teacher"):
        values = group[["beta", "final_test_acc"]].astype("float64").to_numpy()
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                if abs(math.log(values[i][0] / values[j][0])) < math.log(1.25):
                    differences.append(abs(values[i][1] - values[j][1]))
    return float(pd.Series(differences).median()) if differences else None


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_compact(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(item) for item in value) + "]"
    return format_cell(value) if isinstance(value, float) else str(value)
