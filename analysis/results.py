"""A finished (or interrupted) search as a tidy DataFrame, one row per trial, with a stable Parquet schema.

Reads what Ray Tune wrote under the search folder (each part's `experiment_state-*.json` and each
trial's `result.json`) without starting Ray, plus the search's `state.json` and `search.yaml` for
what is fixed per teacher. The schema (`RESULT_COLUMNS`) is documented in docs/analysis.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dkd_tune.core.files import atomic_path
from dkd_tune.tracking.status import trial_status

if TYPE_CHECKING:
    from dkd_tune.config.search_state import SearchState

# name -> pandas dtype; the order is the Parquet column order.
RESULT_COLUMNS: dict[str, str] = {
    "search": "string",
    "part": "string",
    "teacher": "string",
    "teacher_model": "string",
    "teacher_gap": "float64",
    "teacher_gap_background": "float64",  # detection teachers: the gap over background proposals
    "predicted_beta": "float64",
    "dataset": "string",
    "dataset_family": "string",
    "student": "string",
    "loss": "string",
    "trial_id": "string",
    "status": "string",
    "stop_epoch": "int64",
    "max_epochs": "int64",
    "beta": "float64",
    "alpha": "float64",
    "temperature": "float64",
    "warmup_epochs": "int64",
    "lr": "float64",
    "weight_decay": "float64",
    "batch_size": "int64",
    "epochs": "int64",
    "seed": "int64",
    "ce_weight": "float64",
    "kd_weight": "float64",
    "final_test_acc": "float64",
    "best_test_acc": "float64",
    "final_test_acc_top5": "float64",
    "final_test_ap": "float64",
    "best_test_ap": "float64",
    "final_test_ap50": "float64",
    "final_test_ap75": "float64",
    "final_val_ap": "float64",
    "final_val_acc": "float64",
    "final_val_loss": "float64",
    "final_train_acc": "float64",
    "final_train_loss": "float64",
    "wall_time_s": "float64",
    "num_failures": "int64",
    "error": "string",
    "checkpoint_path": "string",
    "config_json": "string",
}
RECIPE_COLUMNS = (
    "beta",
    "alpha",
    "temperature",
    "warmup_epochs",
    "lr",
    "weight_decay",
    "batch_size",
    "epochs",
    "seed",
    "ce_weight",
    "kd_weight",
)


def empty_results() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in RESULT_COLUMNS.items()})


def load_search_results(
    experiment_dir: str | Path,
    *,
    space: Any = None,
    teachers: Mapping[str, Any] | None = None,
    state: SearchState | None = None,
) -> pd.DataFrame:
    """One row per trial of every part of the search in `experiment_dir` (schema: RESULT_COLUMNS)."""
    from dkd_tune.config.search_state import SearchState

    experiment_dir = Path(experiment_dir)
    state = state if state is not None else SearchState.load(experiment_dir)
    if space is None:
        from dkd_tune.config.loading import load_search_space

        space = load_search_space(experiment_dir / "search.yaml")
    from dkd_tune.config.plan import BASELINE_PREFIX, search_parts, trial_plan

    if teachers is None:
        teachers = state.teachers
    data_spec = space.data_spec
    rows = []
    for part_name, teacher in search_parts(space):
        part_dir = experiment_dir / part_name
        if not part_dir.is_dir():
            continue
        artifacts = teachers.get(teacher.label) if teacher else None
        plan = trial_plan(space, teacher, artifacts, part_name)
        fixed = {
            "search": state.name,
            "part": part_name,
            "teacher": teacher.label if teacher else "none",
            "teacher_model": teacher.model if teacher else "none",
            "teacher_gap": artifacts.gap.mean
            if artifacts is not None and artifacts.gap is not None
            else None,
            "teacher_gap_background": artifacts.gap.background_mean
            if artifacts is not None and artifacts.gap is not None and artifacts.gap.background_samples
            else None,
            "predicted_beta": getattr(artifacts, "predicted_beta", None) if artifacts is not None else None,
            "dataset": data_spec.name,
            "dataset_family": data_spec.family,
            "student": space.student,
            "loss": plan.loss_mode
            if not part_name.startswith(BASELINE_PREFIX)
            else part_name.removeprefix(BASELINE_PREFIX),
            "max_epochs": plan.max_epochs,
            **{name: getattr(plan.base_recipe, name) for name in RECIPE_COLUMNS},
        }
        rows.extend(
            {**fixed, **trial_row(trial, part_dir, plan.max_epochs)} for trial in read_trials(part_dir)
        )
    if not rows:
        return empty_results()
    return typed_results(pd.DataFrame(rows))


def typed_results(frame: pd.DataFrame) -> pd.DataFrame:
    """Exactly RESULT_COLUMNS, in order, with their dtypes (missing columns filled with nulls)."""
    return typed_frame(frame, RESULT_COLUMNS)


def typed_frame(frame: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Exactly `columns` (name -> "int64", "float64" or "string"), in order; missing ones are nulls."""
    typed = {}
    for name, dtype in columns.items():
        column = frame[name] if name in frame else pd.Series([None] * len(frame), dtype="object")
        if dtype == "int64":
            typed[name] = pd.to_numeric(column, errors="coerce").fillna(0).astype("int64")
        elif dtype == "float64":
            typed[name] = pd.to_numeric(column, errors="coerce").astype("float64")
        else:
            typed[name] = column.astype("string")
    return pd.DataFrame(typed)


def read_trials(part_dir: Path) -> list[dict[str, Any]]:
    """Each trial of a Ray Tune experiment folder: its id, status, config, last result, error, folder."""
    states = sorted(part_dir.glob("experiment_state-*.json"))
    if not states:
        return []
    trial_data = json.loads(states[-1].read_text()).get("trial_data", [])
    trials = []
    for trial_json, metadata_json in trial_data:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        metadata = json.loads(metadata_json) if isinstance(metadata_json, str) else metadata_json
        config = trial.get("config", {})
        if isinstance(config, str):
            config = json.loads(config)
        trial_dir = part_dir / trial.get("relative_logdir", "")
        history = read_history(trial_dir)
        last_result = history[-1] if history else (metadata.get("last_result") or {})
        trials.append(
            {
                "trial_id": trial["trial_id"],
                "ray_status": trial.get("status", "PENDING"),
                "config": config,
                "history": history,
                "last_result": last_result,
                "num_failures": metadata.get("num_failures", 0),
                "error_file": metadata.get("error_filename"),
                "trial_dir": trial_dir,
            }
        )
    return trials


def read_history(trial_dir: Path) -> list[dict[str, Any]]:
    """Every result the trial reported, oldest first, one per epoch (replays after a restore collapsed)."""
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        by_epoch[int(result.get("epoch", result.get("training_iteration", 0)))] = result
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def trial_row(trial: Mapping[str, Any], part_dir: Path, max_epochs: int) -> dict[str, Any]:
    last = trial["last_result"] or {}
    errored = trial["ray_status"] == "ERROR"
    error_text = _error_text(trial) if errored else ""
    finished = trial["ray_status"] in ("TERMINATED", "ERROR")
    history = trial["history"]
    row = {
        "trial_id": trial["trial_id"],
        "status": trial_status(last, max_epochs, errored=errored, error_text=error_text, finished=finished),
        "stop_epoch": int(last.get("epoch", 0) or 0),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max((r.get("test_acc", float("-inf")) for r in history), default=None)
        if history
        else None,
        "final_test_acc_top5": last.get("test_acc_top5"),
        # Detection trials (COCO AP, %); NaN for classifiers.
        "final_test_ap": last.get("test_ap"),
        "best_test_ap": max((r.get("test_ap", float("-inf")) for r in history), default=None)
        if history and "test_ap" in last
        else None,
        "final_test_ap50": last.get("test_ap50"),
        "final_test_ap75": last.get("test_ap75"),
        "final_val_ap": last.get("val_ap"),
        "final_val_acc": last.get("val_acc"),
        "final_val_loss": last.get("val_loss"),
        "final_train_acc": last.get("train_acc"),
        "final_train_loss": last.get("train_loss"),
        "wall_time_s": last.get("time_total_s"),
        "num_failures": trial["num_failures"],
        "error": error_text or None,
        "checkpoint_path": _latest_checkpoint_file(trial["trial_dir"]),
        "config_json": json.dumps(trial["config"], sort_keys=True, default=str),
    }
    for name, value in trial["config"].items():
        if name in (*RECIPE_COLUMNS, "loss"):
            row[name] = value
    return row


def iter_trials(experiment_dir: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(part name, trial) for every trial of every part of a search folder."""
    experiment_dir = Path(experiment_dir)
    for part_dir in sorted(p for p in experiment_dir.iterdir() if p.is_dir()):
        for trial in read_trials(part_dir):
            yield part_dir.name, trial


def trial_histories(experiment_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Trial id -> the results it reported, one per epoch, oldest first."""
    return {trial["trial_id"]: trial["history"] for _, trial in iter_trials(experiment_dir)}


def load_trial_histories(experiment_dir: str | Path) -> pd.DataFrame:
    """Long format: one row per (trial, epoch) with every numeric metric; for learning curves."""
    rows = []
    for part, trial in iter_trials(experiment_dir):
        for result in trial["history"]:
            numbers = {
                k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            rows.append({"part": part, "trial_id": trial["trial_id"], **numbers})
    return pd.DataFrame(rows)


def results_schema() -> pa.Schema:
    """The Parquet schema of RESULT_COLUMNS, fixed here so it does not follow pandas' own string mapping."""
    arrow_types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64()}
    return pa.schema([pa.field(name, arrow_types[dtype]) for name, dtype in RESULT_COLUMNS.items()])


def write_results(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the results Parquet atomically with the stable schema."""
    path = Path(path)
    table = pa.Table.from_pandas(typed_results(frame), schema=results_schema(), preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def results_table(frame: pd.DataFrame, metric: str = "test_acc", limit: int = 20) -> str:
    """A Markdown table of the best trials per teacher (final test top-1, or AP), for the terminal and reports."""
    from analysis.tables import markdown_table

    if frame.empty:
        return "(no trials)"
    if frame["final_test_ap"].notna().any():  # detection
        columns = ["teacher", "trial_id", "status", "stop_epoch", "beta", "temperature", "final_test_ap",
                   "final_test_ap50", "final_val_ap"]  # fmt: skip
        shown = frame.sort_values(["teacher", "final_test_ap"], ascending=[True, False]).head(limit)[columns]
        return markdown_table(shown)
    columns = [
        "teacher",
        "trial_id",
        "loss",
        "status",
        "stop_epoch",
        "beta",
        "alpha",
        "temperature",
        "warmup_epochs",
    ]
    from analysis.trial_choice import selection_column

    # Ranked as the search ranks them: on the validation split when there is one; the test split reports.
    ranked_by = selection_column(frame)
    columns += (["final_val_acc"] if ranked_by == "final_val_acc" else []) + [
        "final_test_acc",
        "best_test_acc",
    ]
    shown = frame.sort_values(["teacher", ranked_by], ascending=[True, False]).head(limit)[columns].copy()
    # A trial without distillation (the CE baseline) has no beta, alpha, T or warm-up: show none.
    no_teacher = shown["loss"] == "ce"
    for column in ("beta", "alpha", "temperature", "warmup_epochs"):
        shown[column] = shown[column].astype(object).where(~no_teacher, None)
    return markdown_table(shown)


def _latest_checkpoint_file(trial_dir: Path) -> str | None:
    """The newest checkpoint's best.pt (or last.pt): Tune's checkpoint_* folders, or Ray Train's for DDP trials."""
    checkpoints = sorted(trial_dir.rglob("checkpoint_*"), key=lambda path: path.stat().st_mtime)
    for directory in reversed(checkpoints):
        for name in ("best.pt", "last.pt"):
            if (directory / name).is_file():
                return str(directory / name)
    return None


def _error_text(trial: Mapping[str, Any]) -> str:
    trial_dir = Path(trial["trial_dir"])
    for candidate in (trial_dir / (trial.get("error_file") or "error.txt"), trial_dir / "error.txt"):
        if candidate.is_file():
            lines = [
                line.strip() for line in candidate.read_text(errors="replace").splitlines() if line.strip()
            ]
            if lines:
                return lines[-1][:2000]
    return "error"
