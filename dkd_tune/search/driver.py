"""`dkd-tune run` and `dkd-tune resume`: teachers prepared once, then Optuna TPE + ASHA on Ray Tune, per teacher.

A search is a folder `<storage>/<name>/` holding the validated config (`search.yaml`), a small
state file (teachers' artifacts, MLflow parent run, which parts are done), one Ray Tune
experiment per part (the CE baseline and each teacher: TPE and ASHA compare trials of the same
teacher only, since the best beta differs by teacher) and, at the end, `results.parquet`.
Everything needed to finish an interrupted search is in that folder: `resume` reads it back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from analysis.trial_choice import best_trial
from dkd_tune.config.folders import CONFIG_FILE, PROBES_FILE, RESULTS_FILE, locate_search, resume_command
from dkd_tune.config.loading import check_storage, load_search_space
from dkd_tune.config.plan import BASELINE_PREFIX, rung_warnings, search_parts, trial_plan
from dkd_tune.config.schema import Distribution, SearchSpaceFile, TeacherConfig
from dkd_tune.config.search_state import SearchState
from dkd_tune.config.tracking_uri import check_tracking_uri
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_path, atomic_write_text
from dkd_tune.search.checkpoint_repair import restore_missing_checkpoints
from dkd_tune.search.interruption import (
    SearchInterrupted,
    as_interruption,
    interruption_guard,
    tune_experiment,
)
from dkd_tune.search.options import SearchOptions, SearchOutcome
from dkd_tune.search.parent_run import (
    announce_prior,
    check_tracking_store,
    child_runs,
    close_interrupted_runs,
    close_search_run,
    search_tracking_uri,
    start_parent_run,
    sync_trial_runs,
    tag_parent_with_teachers,
)
from dkd_tune.search.ray_runtime import start_ray
from dkd_tune.search.teacher_tasks import collect_teachers, launch_teacher_preparation, load_data
from dkd_tune.search.tuner import auto_beta_prior, expected_trials, new_tuner, trial_logger, trial_resources
from dkd_tune.search.verbosity import quiet_libraries
from dkd_tune.teacher.preparation import TeacherArtifacts

if TYPE_CHECKING:
    import pandas as pd
    import ray

    from dkd_tune.data.shared import TrialData
    from dkd_tune.data.spec import DataSpec
    from dkd_tune.tracking.store import TrackingStore

# ------------------------------------------------------------------------------------------------
# Entry points


def run_search(space: SearchSpaceFile, source: Path, options: SearchOptions) -> SearchOutcome:
    """Start a new search from a validated file."""
    quiet_libraries(options.verbosity)
    check_storage(options.storage, "--storage")
    check_tracking_uri(options.tracking_uri, "--tracking-uri")
    check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    storage = Path(options.storage or space.storage).expanduser().resolve()
    name = options.name or space.name
    experiment_dir = storage / name
    if experiment_dir.exists():
        if options.name:
            raise UserInputError(
                f"--name {name}: a search of that name already exists in {storage}; "
                f"use 'dkd-tune resume {name}' to continue it, or another --name"
            )
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        experiment_dir = storage / name
    data = load_data(space, options)  # an unreadable dataset fails here: nothing written, Ray not started
    check_tracking_store(search_tracking_uri(space, options))
    experiment_dir.mkdir(parents=True)
    atomic_write_text(
        experiment_dir / CONFIG_FILE,
        yaml.safe_dump(space.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False),
    )
    state = SearchState.new(name, source, search_tracking_uri(space, options))
    state.save(experiment_dir)
    options.log(f"dkd-tune: search '{name}' in {experiment_dir}")
    for warning in rung_warnings(space, str(source)):
        options.log(warning)
    return _execute(space, experiment_dir, state, options, data)


def resume_search(name_or_path: str, options: SearchOptions) -> SearchOutcome:
    """Finish an interrupted search: done parts kept, unfinished trials resumed from their checkpoints."""
    quiet_libraries(options.verbosity)
    check_tracking_uri(options.tracking_uri, "--tracking-uri")
    experiment_dir = locate_search(name_or_path, options.storage)
    state = SearchState.load(experiment_dir)
    space = load_search_space(experiment_dir / CONFIG_FILE)
    data = load_data(space, options)
    if options.tracking_uri:
        state.tracking_uri = options.tracking_uri
    check_tracking_store(state.tracking_uri)
    options.log(f"dkd-tune: resuming search '{state.name}' in {experiment_dir}")
    return _execute(space, experiment_dir, state, options, data)


# ------------------------------------------------------------------------------------------------
# The search itself


def _execute(
    space: SearchSpaceFile,
    experiment_dir: Path,
    state: SearchState,
    options: SearchOptions,
    data: tuple[DataSpec, TrialData],
) -> SearchOutcome:
    start_ray(options)
    import ray

    def save_state() -> None:
        state.save(experiment_dir)

    data_spec, shared = data
    try:
        # The guard also covers the clean-up after a first signal, Ray's shutdown included, so a
        # second one there is the "stop at once" the first one promised, not a bare KeyboardInterrupt.
        with interruption_guard(options.log) as guard:
            try:
                return _search_phases(space, experiment_dir, state, options, data_spec, shared, save_state)
            except BaseException as error:
                interruption = as_interruption(error, guard)
                if interruption is None:
                    raise
                # Whatever phase it hit, what is on disk is resumable; say so in the state and in MLflow.
                state.status = "interrupted"
                save_state()
                close_interrupted_runs(state, options)
                raise interruption from None
            finally:
                ray.shutdown()
    except SearchInterrupted as interruption:
        interruption.resume_command = interruption.resume_command or resume_command(experiment_dir)
        raise


def _search_phases(
    space: SearchSpaceFile,
    experiment_dir: Path,
    state: SearchState,
    options: SearchOptions,
    data_spec: DataSpec,
    shared: TrialData,
    save_state: Callable[[], None],
) -> SearchOutcome:
    import ray

    from analysis.results import load_search_results, results_table, write_results
    from dkd_tune.tracking.connect import open_store

    state.status = "running"
    save_state()
    shared_ref = ray.put(shared)
    parts = [part for part in search_parts(space) if part[0] not in state.parts_done]
    # Teachers are prepared in Ray tasks while the teacher-free baselines train beside them.
    baseline_cpus = sum(space.resources.cpu for name, teacher in parts if teacher is None)
    pending = launch_teacher_preparation(
        space, data_spec, shared_ref, experiment_dir, state, options, baseline_cpus
    )

    store = open_store(state.tracking_uri, short_retries=True)
    if state.parent_run_id is None:
        state.parent_run_id = start_parent_run(
            store, space, experiment_dir, state, data_spec, options.parent_run_id
        )
        save_state()
    else:
        store.reopen(state.parent_run_id)

    teachers: dict[str, TeacherArtifacts] | None = None
    for part_name, teacher in search_parts(space):
        if teacher is not None and teachers is None:
            teachers = collect_teachers(space, pending, data_spec, state, save_state, options)
            try:
                tag_parent_with_teachers(store, state.parent_run_id, teachers)
            except Exception as error:  # an unreachable store: tagged when the search's runs are synced
                if not store.unreachable(error):
                    raise
        if part_name in state.parts_done:
            options.log(f"dkd-tune: part '{part_name}' already finished, kept as is")
            continue
        _run_part(space, part_name, teacher, teachers or {}, shared_ref, experiment_dir, state, options)
        state.parts_done.append(part_name)
        save_state()
    if teachers is None:
        teachers = collect_teachers(space, pending, data_spec, state, save_state, options)

    options.log("dkd-tune: writing the results")
    frame = load_search_results(experiment_dir, space=space, teachers=teachers, state=state)
    results_path = write_results(frame, experiment_dir / RESULTS_FILE)
    best = best_trial(frame)
    tracked = sync_trial_runs(space, state, teachers, experiment_dir, frame, options)
    if space.probe is not None and not state.probes_done:
        if tracked:  # probe runs nest under the trials' runs
            _probe_best_trials(space, frame, store, experiment_dir, state, options)
            state.probes_done = True
        else:
            options.log(f"dkd-tune: the probes wait for MLflow: {resume_command(experiment_dir)} runs them")
    _write_analysis(state, experiment_dir, frame, options)
    tracked = tracked and close_search_run(state, experiment_dir, frame, best, space, options)
    state.tracking = "synced" if tracked else "pending"
    state.status = "done"
    save_state()
    headline = "final_test_ap" if space.data_spec.is_detection else "final_test_acc"
    references = {
        row["part"]: float(row[headline])
        for _, row in frame[frame["part"].str.startswith(BASELINE_PREFIX)].iterrows()
        if row["status"] == "completed"
    }
    return SearchOutcome(
        experiment_dir, results_path, best, results_table(frame, metric=space.metric), references
    )


# ------------------------------------------------------------------------------------------------
# One part: a Ray Tune experiment over one teacher (or a baseline)


def _run_part(
    space: SearchSpaceFile,
    part_name: str,
    teacher: TeacherConfig | None,
    teachers: dict[str, TeacherArtifacts],
    shared_ref: ray.ObjectRef,
    experiment_dir: Path,
    state: SearchState,
    options: SearchOptions,
) -> None:
    from ray import tune

    from dkd_tune.search.progress_view import TrialProgress
    from dkd_tune.search.study import study_storage_url
    from dkd_tune.search.tune_signals import StopOnSignal
    from dkd_tune.search.verbosity import NORMAL, VERBOSE
    from trainables import distillation_trainable

    plan = trial_plan(space, teacher, teachers.get(teacher.label) if teacher else None, part_name)
    function = options.trainable or distillation_trainable(
        space.resources.workers,
        use_gpu=space.resources.gpu > 0,
        cpus_per_worker=space.resources.cpu,
        max_failures=space.max_failures,
        storage_dir=str(experiment_dir / part_name),
    )
    trainable = tune.with_resources(
        tune.with_parameters(function, plan=plan, data=shared_ref), trial_resources(space)
    )
    part_dir = experiment_dir / part_name
    logger = trial_logger(space, part_name, teacher, plan, state)
    searched = [name for name, d in space.space_for(teacher).items() if d.kind != "fixed"] if teacher else []
    callbacks = [logger, StopOnSignal()]
    if options.verbosity == NORMAL:
        callbacks.append(
            TrialProgress(
                part_name,
                metric=space.metric,
                mode=space.mode,
                max_epochs=plan.max_epochs,
                expected_trials=expected_trials(space, teacher),
                searched=searched,
            )
        )
    verbose = options.verbosity >= VERBOSE
    run_config = tune.RunConfig(
        name=part_name,
        storage_path=str(experiment_dir),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=callbacks,
        progress_reporter=tune.CLIReporter(
            parameter_columns=searched,
            metric_columns={
                "epoch": "epoch",
                "train_loss": "loss",
                "test_acc": "test acc",
                "best_test_acc": "best",
            },
            max_report_frequency=20,
            sort_by_metric=True,
        )
        if verbose
        else None,
        verbose=1 if verbose else 0,
    )
    if part_dir.exists() and tune.Tuner.can_restore(str(part_dir)):
        options.log(f"dkd-tune: resuming part '{part_name}' from {part_dir}")
        for trial_id in restore_missing_checkpoints(part_dir):
            options.log(
                f"dkd-tune: trial {trial_id}: resumes from its newest checkpoint (the search was killed as it saved)"
            )
        tuner = tune.Tuner.restore(str(part_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        prior = None
        if teacher is not None and space.space_for(teacher).get("beta", Distribution(fixed=0)).kind == "auto":
            prior = auto_beta_prior(space, plan)
            announce_prior(prior, teacher.label, state, experiment_dir, options)
        tuner = new_tuner(
            space,
            part_name,
            teacher,
            plan,
            trainable,
            run_config,
            study_storage=study_storage_url(experiment_dir),
            prior=prior,
        )
        options.log(
            f"dkd-tune: part '{part_name}': starting ({plan.loss_mode}, up to {plan.max_epochs} epochs per trial)"
        )
    with tune_experiment():  # a signal stops Tune gracefully, then the search (the part is not done)
        tuner.fit()


# ------------------------------------------------------------------------------------------------
# MLflow parent run


def sync_search(name_or_path: str, options: SearchOptions) -> bool:
    """`dkd-tune sync`: fill MLflow from a finished search's folder (after the store was unreachable)."""
    import pandas as pd

    check_tracking_uri(options.tracking_uri, "--tracking-uri")
    experiment_dir = locate_search(name_or_path, options.storage)
    state = SearchState.load(experiment_dir)
    if state.status != "done" or not (experiment_dir / RESULTS_FILE).is_file():
        raise UserInputError(
            f"search {state.name!r} ({experiment_dir}): not finished (status {state.status!r}); "
            f"{resume_command(experiment_dir)} finishes it and fills MLflow"
        )
    if options.tracking_uri:
        state.tracking_uri = options.tracking_uri
    space = load_search_space(experiment_dir / CONFIG_FILE)
    frame = pd.read_parquet(experiment_dir / RESULTS_FILE)
    tracked = sync_trial_runs(space, state, state.teachers, experiment_dir, frame, options)
    tracked = tracked and close_search_run(state, experiment_dir, frame, best_trial(frame), space, options)
    state.tracking = "synced" if tracked else "pending"
    state.save(experiment_dir)
    if tracked and space.probe is not None and not state.probes_done:
        options.log(f"dkd-tune: the probes have not run yet: {resume_command(experiment_dir)} runs them")
    return tracked


def _probe_best_trials(
    space: SearchSpaceFile,
    frame: pd.DataFrame,
    store: TrackingStore,
    experiment_dir: Path,
    state: SearchState,
    options: SearchOptions,
) -> None:
    """Linear probes of the best trials (Ray tasks), each logged under its trial's run; probes.parquet."""
    from dkd_tune.search.transfer_probes import probe_best_trials
    from dkd_tune.tracking.runs import TAG_TRIAL_ID

    child_run_ids = {run.tags[TAG_TRIAL_ID]: run.run_id for run in child_runs(store, state.parent_run_id)}
    probes = probe_best_trials(
        frame,
        space.probe,
        tracking_uri=state.tracking_uri,
        experiment_name=space.name,
        child_run_ids=child_run_ids,
        resources=space.resources,
        log=options.log,
    )
    path = experiment_dir / PROBES_FILE
    with atomic_path(path) as tmp:
        probes.to_parquet(tmp, index=False)
    store.log_artifact(state.parent_run_id, path)


def _write_analysis(
    state: SearchState, experiment_dir: Path, frame: pd.DataFrame, options: SearchOptions
) -> None:
    """Tables and figures of the finished search in `analysis/` (logged to its MLflow run when it closes).

    A figure that cannot be drawn must not fail a search whose trials all finished: it is reported.
    """
    from analysis.results import load_trial_histories
    from analysis.search_analysis import MLFLOW_ARTIFACT_DIR, write_analysis

    try:
        write_analysis(
            frame,
            load_trial_histories(experiment_dir),
            experiment_dir / MLFLOW_ARTIFACT_DIR,
            title=f"Search {state.name}",
        )
    except Exception as error:  # any plotting failure is reported, not raised
        options.log(f"dkd-tune: warning: the analysis tables and figures were not written ({error!r})")
