"""A search's MLflow parent run: created, tagged, kept in step with Ray's results (child runs reconciled) and closed."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkd_tune.config.folders import (
    CONFIG_FILE,
    RESULTS_FILE,
    command_target,
)
from dkd_tune.config.plan import search_parts, trial_plan
from dkd_tune.config.schema import SearchSpaceFile
from dkd_tune.config.search_state import SearchState
from dkd_tune.search.options import SearchOptions
from dkd_tune.search.tuner import trial_logger
from dkd_tune.teacher.preparation import TeacherArtifacts

if TYPE_CHECKING:
    import pandas as pd

    from dkd_tune.data.spec import DataSpec
    from dkd_tune.teacher.auto_beta import BetaPrior
    from dkd_tune.tracking.mlflow_store import MlflowClient, Run


def check_tracking_store(uri: str) -> None:
    """The store must answer when a search starts (its run is created first); later it may come and go."""
    from dkd_tune.tracking import mlflow_store as tracking

    tracking.keep_http_retries_short()
    tracking.check_reachable(uri)


def close_interrupted_runs(state: SearchState, options: SearchOptions) -> None:
    """Mark the MLflow runs of the trials that did not finish, and the search's run, KILLED (not FINISHED).

    `resume` reopens a trial's run when the trial continues. A tracking store that cannot be reached
    now must not hide the interruption: it is reported, and the end of the resumed search reconciles.
    """
    if state.parent_run_id is None:
        return
    from dkd_tune.tracking import mlflow_store as tracking

    try:
        client = tracking.client_for(state.tracking_uri)
        for run in child_runs(client, state.parent_run_id):
            if run.info.status == "RUNNING":
                tracking.set_tags(client, run.info.run_id, {tracking.TAG_STATUS: "interrupted"})
                client.set_terminated(run.info.run_id, status="KILLED")
        client.set_terminated(state.parent_run_id, status="KILLED")
    except Exception as error:
        options.log(
            f"dkd-tune: warning: MLflow runs not marked as interrupted ({type(error).__name__}: {error})"
        )


def search_tracking_uri(space: SearchSpaceFile, options: SearchOptions) -> str:
    from dkd_tune.tracking.mlflow_store import absolute_tracking_uri

    # A relative SQLite path would change meaning if `resume` ran from another directory.
    return absolute_tracking_uri(options.tracking_uri or space.tracking_uri)


def start_parent_run(
    client: MlflowClient,
    space: SearchSpaceFile,
    experiment_dir: Path,
    state: SearchState,
    data_spec: DataSpec,
    nest_under: str | None,
) -> str:
    from dkd_tune.tracking import mlflow_store as tracking

    tags = {
        **tracking.standard_tags("search"),
        tracking.TAG_SEARCH: state.name,
        "student": space.student,
        "dataset": data_spec.name,
        "dataset_family": data_spec.family,
        "teachers": ", ".join(t.label for t in space.teachers) or "none",
        "loss": space.loss,
    }
    if nest_under:
        tags[tracking.TAG_PARENT] = nest_under
    experiment = tracking.experiment_id(client, space.name)
    run = client.create_run(experiment, run_name=state.name, tags=tags)
    tracking.log_params(
        client, run.info.run_id, space.model_dump(mode="json", by_alias=True, exclude_none=True)
    )
    client.log_artifact(run.info.run_id, str(experiment_dir / CONFIG_FILE))
    write_search_view(client, experiment, run.info.run_id, space)
    return run.info.run_id


def write_search_view(client: MlflowClient, experiment_id: str, run_id: str, space: SearchSpaceFile) -> None:
    """The MLflow UI's view of this search: its trials with what was searched and how they scored."""
    from dkd_tune.tracking.runs_view import write_search_view as write_view

    parameters = (["teacher"] if len(space.teachers) > 1 else []) + (["loss"] if space.baselines else [])
    parameters += list(dict.fromkeys([*space.space, *(key for t in space.teachers for key in t.space)]))
    # Chosen on validation, reported on test: both columns when the search's metric is a validation one.
    reported = [space.metric.replace("val_", "test_", 1)] if space.metric.startswith("val_") else []
    write_view(client, experiment_id, run_id, parameters, space.metric, space.mode, reported)


def tag_parent_with_teachers(
    client: MlflowClient, run_id: str, teachers: Mapping[str, TeacherArtifacts]
) -> None:
    """Teacher gap and auto-beta as tags of the search's run (per teacher, and plain when there is one)."""
    from dkd_tune.tracking import mlflow_store as tracking

    tags = {}
    for label, artifact in teachers.items():
        if artifact.gap is not None:
            tags[f"teacher_gap.{label}"] = f"{artifact.gap.mean:.4f}"
            if artifact.gap.background_samples:  # a detector: the gap over background proposals too
                tags[f"teacher_gap_background.{label}"] = f"{artifact.gap.background_mean:.4f}"
        if artifact.predicted_beta is not None:
            tags[f"predicted_beta.{label}"] = f"{artifact.predicted_beta:.3f}"
    if len(teachers) == 1:
        (only,) = teachers.values()
        tags["teacher"] = only.label
        if only.gap is not None:
            tags["teacher_gap"] = f"{only.gap.mean:.4f}"
        if only.predicted_beta is not None:
            tags["predicted_beta"] = f"{only.predicted_beta:.3f}"
    tracking.set_tags(client, run_id, tags)


def sync_trial_runs(
    space: SearchSpaceFile,
    state: SearchState,
    teachers: Mapping[str, Any],
    experiment_dir: Path,
    frame: pd.DataFrame,
    options: SearchOptions,
) -> bool:
    """Bring MLflow in line with Ray's record of every trial; False (said in one line) if it is unreachable.

    Each trial gets its run, with every epoch Ray saved (what the callback could not deliver while
    the store was away is filled in here), then `reconcile_child_runs` sets the statuses and
    repairs runs that disagree with Ray. Idempotent: `dkd-tune sync` and `resume` run it again.
    """
    from types import SimpleNamespace

    from analysis.results import read_trials, trial_histories

    def sync(client: MlflowClient) -> None:
        tag_parent_with_teachers(client, state.parent_run_id, teachers)
        for part_name, teacher in search_parts(space):
            part_dir = experiment_dir / part_name
            if not part_dir.is_dir():
                continue
            plan = trial_plan(space, teacher, teachers.get(teacher.label) if teacher else None, part_name)
            logger = trial_logger(space, part_name, teacher, plan, state)
            for record in read_trials(part_dir):
                trial = SimpleNamespace(
                    trial_id=record["trial_id"], config=record["config"], last_result=record["last_result"]
                )
                logger.run_for(trial)
                for result in record["history"]:
                    logger.log_result(trial, result)
        reconcile_child_runs(client, state.parent_run_id, frame, trial_histories(experiment_dir))

    return tracking_step(state, experiment_dir, options, sync)


def close_search_run(
    state: SearchState,
    experiment_dir: Path,
    frame: pd.DataFrame,
    best: dict[str, Any] | None,
    space: SearchSpaceFile,
    options: SearchOptions,
) -> bool:
    """The search's MLflow run: results, analysis and best trial logged, then FINISHED."""
    from analysis.search_analysis import MLFLOW_ARTIFACT_DIR, log_analysis

    def close(client: MlflowClient) -> None:
        if (experiment_dir / MLFLOW_ARTIFACT_DIR).is_dir():
            log_analysis(client, state.parent_run_id, experiment_dir / MLFLOW_ARTIFACT_DIR)
        if options.register_students:
            log_best_students(client, state, frame, space, options)
        finish_parent_run(client, state.parent_run_id, experiment_dir, frame, best, space)

    return tracking_step(state, experiment_dir, options, close)


def tracking_step(
    state: SearchState, experiment_dir: Path, options: SearchOptions, step: Callable[[Any], None]
) -> bool:
    """Run `step(client)` on the search's MLflow store; False, said in one line, if the store is unreachable."""
    from dkd_tune.tracking import mlflow_store as tracking

    try:
        step(tracking.client_for(state.tracking_uri))
    except Exception as error:
        if not tracking.store_unreachable(error):
            raise
        options.log(
            f"dkd-tune: MLflow store {state.tracking_uri} unreachable ({type(error).__name__}): the results "
            f"are complete in {experiment_dir}; when the store is back, run dkd-tune sync {command_target(experiment_dir)}"
        )
        return False
    return True


def child_runs(client: MlflowClient, parent_run_id: str) -> list[Run]:
    """The search's trial runs (children of its parent run that carry a trial id)."""
    from dkd_tune.tracking import mlflow_store as tracking

    children = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent_run_id}'",
        max_results=50000,
    )
    return [run for run in children if tracking.TAG_TRIAL_ID in run.data.tags]


def reconcile_child_runs(
    client: MlflowClient, parent_run_id: str, frame: pd.DataFrame, histories: Mapping[str, list[dict]]
) -> None:
    """Make MLflow's trial runs (children of `parent_run_id`) match Ray's trials after an interruption.

    A run whose logged epochs are not its trial's history in Ray (the driver died after logging an
    epoch that the resumed trial never reached again) is rebuilt from that history. A run left open
    gets the status Ray recorded. A run whose trial Ray never recorded (the driver died after the
    trial started but before Ray saved its state; Ray runs that sample again as a new trial) is
    ended as KILLED, tagged "lost" and moved to MLflow's trash, where it stays until `mlflow gc`:
    the search then has one run per trial of its results, none twice.
    """
    from dkd_tune.tracking import mlflow_store as tracking

    if frame.empty:
        return
    children = child_runs(client, parent_run_id)
    rows_by_trial = {row["trial_id"]: row for row in frame.to_dict("records")}
    for run in children:
        trial_id = run.data.tags.get(tracking.TAG_TRIAL_ID)
        if trial_id is None or run.data.tags.get(tracking.TAG_KIND) != "trial":
            continue  # not a trial's run (a probe run nests under its trial's run, not here)
        if trial_id not in rows_by_trial:
            tracking.set_tags(client, run.info.run_id, {tracking.TAG_STATUS: "lost"})
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
            client.delete_run(run.info.run_id)
            continue
        history = histories.get(trial_id, [])
        run_id, open_run = run.info.run_id, run.info.status == "RUNNING"
        if not tracking.logged_epochs_match(client, run_id, history):
            run_id, open_run = tracking.rebuild_trial_run(client, run, history), True
        if open_run:
            row = rows_by_trial[trial_id]
            tags = {tracking.TAG_STATUS: row["status"], tracking.TAG_STOP_EPOCH: int(row["stop_epoch"])}
            tracking.set_tags(client, run_id, tags)
            client.set_terminated(
                run_id,
                status="FAILED" if row["status"] in ("errored", "oom") else "FINISHED",
                end_time=tracking.trial_end_ms(history[-1] if history else {}, run.info.start_time),
            )


def log_best_students(
    client: MlflowClient,
    state: SearchState,
    frame: pd.DataFrame,
    space: SearchSpaceFile,
    options: SearchOptions,
) -> None:
    """Each teacher's best full-budget student (chosen on validation when there is one) as an MLflow model of
    its trial's run, registered as `<search>-<teacher>-student`, with its input example and normalisation."""
    from analysis.trial_choice import best_trials_per_teacher
    from dkd_tune.tracking import mlflow_store as tracking

    children = {
        run.data.tags.get(tracking.TAG_TRIAL_ID): run.info.run_id
        for run in child_runs(client, state.parent_run_id)
    }
    for row in best_trials_per_teacher(frame).to_dict("records"):
        checkpoint, run_id = row.get("checkpoint_path"), children.get(row["trial_id"])
        if not checkpoint or not os.path.exists(checkpoint) or run_id is None:
            continue
        model, example, metadata = student_for_serving(checkpoint, space.student)
        if model is None:
            continue  # a detector: no single-tensor input to log it with
        name = tracking.registered_model_name(state.name, row["teacher"])
        tracking.log_student_model(
            state.tracking_uri, run_id, model, name="best_student", registered_name=name,
            input_example=example, metadata={**metadata, "teacher": row["teacher"], "trial_id": row["trial_id"]},
        )  # fmt: skip
        options.log(f"dkd-tune: teacher '{row['teacher']}': best student registered in MLflow as {name!r}")


def student_for_serving(checkpoint: str, student: str):
    """(model in eval mode, a normalised input example, its normalisation) from a trial's checkpoint."""
    import numpy as np

    from dkd_tune.models import load_teacher, read_model_checkpoint
    from dkd_tune.models.detection import is_detector

    if is_detector(student):
        return None, None, {}
    record = read_model_checkpoint(checkpoint)
    model = load_teacher(student, checkpoint)  # strict load, eval mode: what serving runs
    size = int(record.input_size or 32)
    # Two images, not one: MLflow saves the model with torch.export (its "pt2" format, nothing unpickled
    # on load), which fixes a batch dimension of size 1; with two it stays dynamic.
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    metadata = {
        "input": f"float32 (N, 3, {size}, {size}) images normalised as (pixel / 255 - mean) / std",
        "mean": list(record.mean or ()),
        "std": list(record.std or ()),
        "classes": int(record.num_classes or 0),
        "architecture": student,
    }
    return model, example, metadata


def finish_parent_run(
    client: MlflowClient,
    run_id: str,
    experiment_dir: Path,
    frame: pd.DataFrame,
    best: dict[str, Any] | None,
    space: SearchSpaceFile,
) -> None:
    from dkd_tune.tracking import mlflow_store as tracking

    client.log_artifact(run_id, str(experiment_dir / RESULTS_FILE))
    if best is not None:
        tracking.log_metrics(
            client,
            run_id,
            tracking.numeric_metrics(
                {
                    "best_final_test_acc": best.get("final_test_acc"),
                    "best_final_test_ap": best.get("final_test_ap"),  # detection
                    "best_beta": best.get("beta"),
                }
            ),
            0,
            tracking.now_ms(),
        )
        checkpoint = best.get("checkpoint_path")
        if checkpoint and os.path.exists(checkpoint):
            client.log_artifact(run_id, checkpoint, artifact_path="best_checkpoint")
        tracking.set_tags(
            client, run_id, {"best_trial_id": best.get("trial_id"), "best_teacher": best.get("teacher")}
        )
    client.set_terminated(run_id, status="FINISHED")


def announce_prior(
    prior: BetaPrior, label: str, state: SearchState, experiment_dir: Path, options: SearchOptions
) -> None:
    """Say the prior `beta: auto` starts from, and tag it on the search's MLflow run."""
    for warning in prior.suggestion.warnings:
        options.log(f"dkd-tune: auto-beta: {warning}")
    options.log(f"dkd-tune: teacher '{label}': beta: auto: {prior.describe()}")
    options.log(f"dkd-tune: teacher '{label}': auto-beta trust: {prior.suggestion.trust}")
    s = prior.suggestion
    tags = {
        f"auto_beta.{label}.beta": f"{s.beta:.4g}",
        f"auto_beta.{label}.spread_octaves": f"{s.spread:.3g}",
        f"auto_beta.{label}.interval_80": f"[{s.low:.4g}, {s.high:.4g}]",
        f"auto_beta.{label}.calibration": s.calibration,
        f"auto_beta.{label}.first_trial": f"{prior.centre:.4g}",
    }

    def tag(client: MlflowClient) -> None:
        from dkd_tune.tracking import mlflow_store as tracking

        tracking.set_tags(client, state.parent_run_id, tags)

    tracking_step(state, experiment_dir, options, tag)
