"""A search's parent run in the tracking store: created, tagged, kept in step with Ray's results (child runs reconciled) and closed."""

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
    from dkd_tune.tracking.store import RunRecord, TrackingStore


def check_tracking_store(uri: str) -> None:
    """The store must answer when a search starts (its run is created first); later it may come and go."""
    from dkd_tune.tracking.connect import open_store

    open_store(uri, short_retries=True).check_reachable()


def close_interrupted_runs(state: SearchState, options: SearchOptions) -> None:
    """Mark the MLflow runs of the trials that did not finish, and the search's run, KILLED (not FINISHED).

    `resume` reopens a trial's run when the trial continues. A tracking store that cannot be reached
    now must not hide the interruption: it is reported, and the end of the resumed search reconciles.
    """
    if state.parent_run_id is None:
        return
    from dkd_tune.tracking.connect import open_store
    from dkd_tune.tracking.runs import TAG_STATUS
    from dkd_tune.tracking.store import KILLED, RUNNING

    try:
        store = open_store(state.tracking_uri, short_retries=True)
        for run in child_runs(store, state.parent_run_id):
            if run.status == RUNNING:
                store.set_tags(run.run_id, {TAG_STATUS: "interrupted"})
                store.end_run(run.run_id, KILLED)
        store.end_run(state.parent_run_id, KILLED)
    except Exception as error:
        options.log(
            f"dkd-tune: warning: MLflow runs not marked as interrupted ({type(error).__name__}: {error})"
        )


def search_tracking_uri(space: SearchSpaceFile, options: SearchOptions) -> str:
    from dkd_tune.tracking.connect import absolute_tracking_uri

    # A relative SQLite path would change meaning if `resume` ran from another directory.
    return absolute_tracking_uri(options.tracking_uri or space.tracking_uri)


def start_parent_run(
    store: TrackingStore,
    space: SearchSpaceFile,
    experiment_dir: Path,
    state: SearchState,
    data_spec: DataSpec,
    nest_under: str | None,
) -> str:
    from dkd_tune.tracking import runs

    tags = {
        **runs.standard_tags("search"),
        runs.TAG_SEARCH: state.name,
        "student": space.student,
        "dataset": data_spec.name,
        "dataset_family": data_spec.family,
        "teachers": ", ".join(t.label for t in space.teachers) or "none",
        "loss": space.loss,
    }
    if nest_under:
        tags[runs.TAG_PARENT] = nest_under
    experiment = store.experiment(space.name)
    run_id = store.start_run(experiment, name=state.name, tags=tags)
    store.log_params(run_id, space.model_dump(mode="json", by_alias=True, exclude_none=True))
    store.log_artifact(run_id, experiment_dir / CONFIG_FILE)
    save_search_view(store, experiment, run_id, space)
    return run_id


def save_search_view(store: TrackingStore, experiment_id: str, run_id: str, space: SearchSpaceFile) -> None:
    """The store's view of this search: its trials with what was searched and how they scored."""
    parameters = (["teacher"] if len(space.teachers) > 1 else []) + (["loss"] if space.baselines else [])
    parameters += list(dict.fromkeys([*space.space, *(key for t in space.teachers for key in t.space)]))
    # Chosen on validation, reported on test: both columns when the search's metric is a validation one.
    reported = [space.metric.replace("val_", "test_", 1)] if space.metric.startswith("val_") else []
    store.save_search_view(experiment_id, run_id, parameters, space.metric, space.mode, reported)


def tag_parent_with_teachers(
    store: TrackingStore, run_id: str, teachers: Mapping[str, TeacherArtifacts]
) -> None:
    """Teacher gap and auto-beta as tags of the search's run (per teacher, and plain when there is one)."""
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
    store.set_tags(run_id, tags)


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

    def sync(store: TrackingStore) -> None:
        tag_parent_with_teachers(store, state.parent_run_id, teachers)
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
        reconcile_child_runs(store, state.parent_run_id, frame, trial_histories(experiment_dir))

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

    def close(store: TrackingStore) -> None:
        if (experiment_dir / MLFLOW_ARTIFACT_DIR).is_dir():
            log_analysis(store, state.parent_run_id, experiment_dir / MLFLOW_ARTIFACT_DIR)
        if options.register_students:
            log_best_students(store, state, frame, space, options)
        finish_parent_run(store, state.parent_run_id, experiment_dir, frame, best, space)

    return tracking_step(state, experiment_dir, options, close)


def tracking_step(
    state: SearchState, experiment_dir: Path, options: SearchOptions, step: Callable[[TrackingStore], None]
) -> bool:
    """Run `step(store)` on the search's tracking store; False, said in one line, if it is unreachable."""
    from dkd_tune.tracking.connect import open_store

    store = open_store(state.tracking_uri, short_retries=True)
    try:
        step(store)
    except Exception as error:
        if not store.unreachable(error):
            raise
        options.log(
            f"dkd-tune: MLflow store {state.tracking_uri} unreachable ({type(error).__name__}): the results "
            f"are complete in {experiment_dir}; when the store is back, run dkd-tune sync {command_target(experiment_dir)}"
        )
        return False
    return True


def child_runs(store: TrackingStore, parent_run_id: str) -> list[RunRecord]:
    """The search's trial runs (children of its parent run that carry a trial id)."""
    from dkd_tune.tracking.runs import TAG_PARENT, TAG_TRIAL_ID

    parent = store.run(parent_run_id)
    if parent is None:
        raise LookupError(f"the search's run {parent_run_id} is not in the tracking store {store.uri}")
    return store.find_runs([parent.experiment_id], tags={TAG_PARENT: parent_run_id}, with_tag=TAG_TRIAL_ID)


def reconcile_child_runs(
    store: TrackingStore, parent_run_id: str, frame: pd.DataFrame, histories: Mapping[str, list[dict]]
) -> None:
    """Make MLflow's trial runs (children of `parent_run_id`) match Ray's trials after an interruption.

    A run whose logged epochs are not its trial's history in Ray (the driver died after logging an
    epoch that the resumed trial never reached again) is rebuilt from that history. A run left open
    gets the status Ray recorded. A run whose trial Ray never recorded (the driver died after the
    trial started but before Ray saved its state; Ray runs that sample again as a new trial) is
    ended as KILLED, tagged "lost" and moved to MLflow's trash, where it stays until `mlflow gc`:
    the search then has one run per trial of its results, none twice.
    """
    from dkd_tune.tracking import runs
    from dkd_tune.tracking.store import FAILED, FINISHED, KILLED, RUNNING

    if frame.empty:
        return
    children = child_runs(store, parent_run_id)
    rows_by_trial = {row["trial_id"]: row for row in frame.to_dict("records")}
    for run in children:
        trial_id = run.tags.get(runs.TAG_TRIAL_ID)
        if trial_id is None or run.tags.get(runs.TAG_KIND) != "trial":
            continue  # not a trial's run (a probe run nests under its trial's run, not here)
        if trial_id not in rows_by_trial:
            store.set_tags(run.run_id, {runs.TAG_STATUS: "lost"})
            if run.status == RUNNING:
                store.end_run(run.run_id, KILLED)
            store.delete_run(run.run_id)
            continue
        history = histories.get(trial_id, [])
        run_id, open_run = run.run_id, run.status == RUNNING
        if not runs.logged_epochs_match(store, run_id, history):
            run_id, open_run = runs.rebuild_trial_run(store, run, history), True
        if open_run:
            row = rows_by_trial[trial_id]
            store.set_tags(
                run_id, {runs.TAG_STATUS: row["status"], runs.TAG_STOP_EPOCH: int(row["stop_epoch"])}
            )
            store.end_run(
                run_id,
                FAILED if row["status"] in ("errored", "oom") else FINISHED,
                end_time=runs.trial_end_ms(history[-1] if history else {}, run.start_time),
            )


def log_best_students(
    store: TrackingStore,
    state: SearchState,
    frame: pd.DataFrame,
    space: SearchSpaceFile,
    options: SearchOptions,
) -> None:
    """Each teacher's best full-budget student (chosen on validation when there is one) as an MLflow model of
    its trial's run, registered as `<search>-<teacher>-student`, with its input example and normalisation."""
    from analysis.trial_choice import best_trials_per_teacher
    from dkd_tune.tracking.runs import TAG_TRIAL_ID, registered_model_name

    children = {run.tags.get(TAG_TRIAL_ID): run.run_id for run in child_runs(store, state.parent_run_id)}
    for row in best_trials_per_teacher(frame).to_dict("records"):
        checkpoint, run_id = row.get("checkpoint_path"), children.get(row["trial_id"])
        if not checkpoint or not os.path.exists(checkpoint) or run_id is None:
            continue
        model, example, metadata = student_for_serving(checkpoint, space.student)
        if model is None:
            continue  # a detector: no single-tensor input to log it with
        name = registered_model_name(state.name, row["teacher"])
        store.log_model(
            run_id, model, name="best_student", registered_name=name,
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
    store: TrackingStore,
    run_id: str,
    experiment_dir: Path,
    frame: pd.DataFrame,
    best: dict[str, Any] | None,
    space: SearchSpaceFile,
) -> None:
    from dkd_tune.tracking.runs import now_ms, numeric_metrics
    from dkd_tune.tracking.store import FINISHED

    store.log_artifact(run_id, experiment_dir / RESULTS_FILE)
    if best is not None:
        store.log_metrics(
            run_id,
            numeric_metrics(
                {
                    "best_final_test_acc": best.get("final_test_acc"),
                    "best_final_test_ap": best.get("final_test_ap"),  # detection
                    "best_beta": best.get("beta"),
                }
            ),
            0,
            now_ms(),
        )
        checkpoint = best.get("checkpoint_path")
        if checkpoint and os.path.exists(checkpoint):
            store.log_artifact(run_id, checkpoint, folder="best_checkpoint")
        store.set_tags(run_id, {"best_trial_id": best.get("trial_id"), "best_teacher": best.get("teacher")})
    store.end_run(run_id, FINISHED)


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

    def tag(store: TrackingStore) -> None:
        store.set_tags(state.parent_run_id, tags)

    tracking_step(state, experiment_dir, options, tag)
