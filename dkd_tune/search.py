"""`dkd-tune run` and `dkd-tune resume`: teachers prepared once, then Optuna TPE + ASHA on Ray Tune, per teacher.

A search is a folder `<storage>/<name>/` holding the validated config (`search.yaml`), a small
state file (teachers' artifacts, MLflow parent run, which parts are done), one Ray Tune
experiment per part (the CE baseline and each teacher: TPE and ASHA compare trials of the same
teacher only, since the best beta differs by teacher) and, at the end, `results.parquet`.
Everything needed to finish an interrupted search is in that folder: `resume` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dkd_tune.config import (
    Distribution,
    SearchSpaceFile,
    check_storage,
    check_tracking_uri,
    load_search_space,
)
from dkd_tune.errors import UserInputError
from dkd_tune.interruption import SearchInterrupted, as_interruption, interruption_guard, tune_experiment
from dkd_tune.search_plan import BASELINE_PREFIX, rung_warnings, search_parts, trial_plan
from dkd_tune.storage import atomic_path, atomic_write_json, atomic_write_text

STATE_FILE = "state.json"
CONFIG_FILE = "search.yaml"
RESULTS_FILE = "results.parquet"
PROBES_FILE = "probes.parquet"
# TPE needs a few random trials before its model is worth anything; a third of the budget, 2..10.
MIN_STARTUP_TRIALS, MAX_STARTUP_TRIALS = 2, 10
STATE_KEYS = ("name", "tracking_uri", "teachers", "parts_done")
# Ray replaces a local node's 127.0.0.1 by the machine's network address, and its servers then listen
# on every interface, unless this variable (read when Ray is imported) turns off multi-node clusters.
RAY_LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class SearchOptions:
    """Command-line choices that are not part of the search-space file."""

    name: str | None = None
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    dashboard: bool = False
    log: Callable[[str], None] = print
    # A function trainable `(config, plan, data)` to run instead of dkd-tune's own: for custom training
    # code, and for the tests that inject faults or measure the search machinery with a fast trainable.
    trainable: Callable[..., None] | None = None
    # An MLflow run to nest the search's parent run under (`dkd-tune validate-beta` runs two searches).
    parent_run_id: str | None = None


@dataclass
class SearchOutcome:
    experiment_dir: Path
    results_path: Path
    best: dict[str, Any] | None
    table: str
    references: dict[str, float]  # baseline part -> its final test top-1, for comparison with the best


# ------------------------------------------------------------------------------------------------
# Entry points


def run_search(space: SearchSpaceFile, source: Path, options: SearchOptions) -> SearchOutcome:
    """Start a new search from a validated file."""
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
    data = _load_data(space, options)  # an unreadable dataset fails here: nothing written, Ray not started
    _check_tracking_store(_tracking_uri(space, options))
    experiment_dir.mkdir(parents=True)
    atomic_write_text(
        experiment_dir / CONFIG_FILE,
        yaml.safe_dump(space.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False),
    )
    state = {
        "name": name,
        "source": str(source),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tracking_uri": _tracking_uri(space, options),
        "teachers": {},
        "parts_done": [],
        "parent_run_id": None,
        "status": "running",
    }
    atomic_write_json(experiment_dir / STATE_FILE, state)
    options.log(f"dkd-tune: search '{name}' in {experiment_dir}")
    for warning in rung_warnings(space, str(source)):
        options.log(warning)
    return _execute(space, experiment_dir, state, options, data)


def resume_search(name_or_path: str, options: SearchOptions) -> SearchOutcome:
    """Finish an interrupted search: done parts kept, unfinished trials resumed from their checkpoints."""
    check_tracking_uri(options.tracking_uri, "--tracking-uri")
    experiment_dir = locate_search(name_or_path, options.storage)
    state = read_state(experiment_dir / STATE_FILE)
    space = load_search_space(experiment_dir / CONFIG_FILE)
    data = _load_data(space, options)
    if options.tracking_uri:
        state["tracking_uri"] = options.tracking_uri
    _check_tracking_store(state["tracking_uri"])
    options.log(f"dkd-tune: resuming search '{state['name']}' in {experiment_dir}")
    return _execute(space, experiment_dir, state, options, data)


def _check_tracking_store(uri: str) -> None:
    """The store must answer when a search starts (its run is created first); later it may come and go."""
    from dkd_tune import tracking

    tracking.keep_http_retries_short()
    tracking.check_reachable(uri)


def locate_search(name_or_path: str, storage: str | None) -> Path:
    candidates = [Path(name_or_path).expanduser()]
    candidates.append(Path(storage or "./dkd_runs").expanduser() / name_or_path)
    for candidate in candidates:
        if (candidate / STATE_FILE).is_file() and (candidate / CONFIG_FILE).is_file():
            return candidate.resolve()
    raise UserInputError(
        f"search {name_or_path!r}: not found (looked for {STATE_FILE} in "
        f"{' and '.join(str(c) for c in candidates)}); pass the search's folder or --storage"
    )


def read_state(path: Path) -> dict[str, Any]:
    """A search's state file, or one line saying why it cannot be used to resume."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else " ".join(str(error).split())
        raise UserInputError(
            f"{path}: cannot read the search's state ({reason}); expected the JSON file dkd-tune wrote"
        ) from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserInputError(
            f"{path}: not a search state file (missing {', '.join(missing)}); expected the JSON file dkd-tune wrote"
        )
    return state


# ------------------------------------------------------------------------------------------------
# The search itself


def _load_data(space: SearchSpaceFile, options: SearchOptions):
    """(data spec, what the trials share) of the search, read before anything is written or started."""
    from dkd_tune.data import parse_data_spec

    data_spec = parse_data_spec(space.data_spec_value(), source="data")
    return data_spec, shared_data(data_spec, space, options)


def _execute(
    space: SearchSpaceFile, experiment_dir: Path, state: dict[str, Any], options: SearchOptions, data
) -> SearchOutcome:
    _start_ray(options)
    import ray

    def save_state() -> None:
        atomic_write_json(experiment_dir / STATE_FILE, state)

    data_spec, shared = data
    try:
        with interruption_guard(options.log):
            return _search_phases(space, experiment_dir, state, options, data_spec, shared, save_state)
    except (SearchInterrupted, KeyboardInterrupt) as error:
        # Whatever phase it hit, what is on disk is resumable; say so in the state and in MLflow.
        interruption = as_interruption(error)
        state["status"] = "interrupted"
        save_state()
        _close_interrupted_runs(state, options)
        interruption.resume_command = interruption.resume_command or resume_command(experiment_dir)
        raise interruption from None
    finally:
        ray.shutdown()


def _search_phases(space, experiment_dir, state, options, data_spec, shared, save_state) -> SearchOutcome:
    import ray

    from analysis.results import load_search_results, results_table, write_results
    from dkd_tune import tracking

    state["status"] = "running"
    save_state()
    shared_ref = ray.put(shared)
    parts = [part for part in search_parts(space) if part[0] not in state["parts_done"]]
    # Teachers are prepared in Ray tasks while the teacher-free baselines train beside them.
    baseline_cpus = sum(space.resources.cpu for name, teacher in parts if teacher is None)
    pending = _launch_teacher_preparation(
        space, data_spec, shared_ref, experiment_dir, state, options, baseline_cpus
    )

    client = tracking.client_for(state["tracking_uri"])
    if state.get("parent_run_id") is None:
        state["parent_run_id"] = _start_parent_run(
            client, space, experiment_dir, state, data_spec, options.parent_run_id
        )
        save_state()
    else:
        client.update_run(state["parent_run_id"], status="RUNNING")

    teachers: dict[str, Any] | None = None
    for part_name, teacher in search_parts(space):
        if teacher is not None and teachers is None:
            teachers = _collect_teachers(space, pending, data_spec, state, save_state, options)
            try:
                _tag_parent_with_teachers(client, state["parent_run_id"], teachers)
            except Exception as error:  # an unreachable store: tagged when the search's runs are synced
                if not tracking.store_unreachable(error):
                    raise
        if part_name in state["parts_done"]:
            options.log(f"dkd-tune: part '{part_name}' already finished, kept as is")
            continue
        _run_part(space, part_name, teacher, teachers or {}, shared_ref, experiment_dir, state, options)
        state["parts_done"].append(part_name)
        save_state()
    if teachers is None:
        teachers = _collect_teachers(space, pending, data_spec, state, save_state, options)

    options.log("dkd-tune: writing the results")
    frame = load_search_results(experiment_dir, space=space, teachers=teachers, state=state)
    results_path = write_results(frame, experiment_dir / RESULTS_FILE)
    best = _best_row(frame, space)
    tracked = _sync_trial_runs(space, state, teachers, experiment_dir, frame, options)
    if space.probe is not None and not state.get("probes_done"):
        if tracked:  # probe runs nest under the trials' runs
            _probe_best_trials(space, frame, client, experiment_dir, state, options)
            state["probes_done"] = True
        else:
            options.log(f"dkd-tune: the probes wait for MLflow: {resume_command(experiment_dir)} runs them")
    _write_analysis(state, experiment_dir, frame, options)
    tracked = tracked and _close_search_run(state, experiment_dir, frame, best, space, options)
    state["tracking"] = "synced" if tracked else "pending"
    state["status"] = "done"
    save_state()
    references = {
        row["part"]: float(row["final_test_acc"])
        for _, row in frame[frame["part"].str.startswith(BASELINE_PREFIX)].iterrows()
        if row["status"] == "completed"
    }
    return SearchOutcome(
        experiment_dir, results_path, best, results_table(frame, metric=space.metric), references
    )


def resume_command(experiment_dir: Path) -> str:
    """The exact command that continues the search in `experiment_dir`, from the current directory."""
    return f"dkd-tune resume {_command_target(experiment_dir)}"


def _command_target(experiment_dir: Path) -> str:
    """How a command names the search: its name under the default storage, else its folder."""
    return (
        experiment_dir.name if experiment_dir.parent == Path("./dkd_runs").resolve() else str(experiment_dir)
    )


def _close_interrupted_runs(state: dict[str, Any], options: SearchOptions) -> None:
    """Mark the MLflow runs of the trials that did not finish, and the search's run, KILLED (not FINISHED).

    `resume` reopens a trial's run when the trial continues. A tracking store that cannot be reached
    now must not hide the interruption: it is reported, and the end of the resumed search reconciles.
    """
    if state.get("parent_run_id") is None:
        return
    from dkd_tune import tracking

    try:
        client = tracking.client_for(state["tracking_uri"])
        for run in _trial_runs(client, state["parent_run_id"]):
            if run.info.status == "RUNNING":
                tracking.set_tags(client, run.info.run_id, {tracking.TAG_STATUS: "interrupted"})
                client.set_terminated(run.info.run_id, status="KILLED")
        client.set_terminated(state["parent_run_id"], status="KILLED")
    except Exception as error:
        options.log(
            f"dkd-tune: warning: MLflow runs not marked as interrupted ({type(error).__name__}: {error})"
        )


def _tracking_uri(space: SearchSpaceFile, options: SearchOptions) -> str:
    from dkd_tune.tracking import absolute_tracking_uri

    # A relative SQLite path would change meaning if `resume` ran from another directory.
    return absolute_tracking_uri(options.tracking_uri or space.tracking_uri)


def _start_ray(options: SearchOptions) -> None:
    if not options.address:
        keep_local_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray.tune.tune").addFilter(_hide_tune_resume_hints)
    # Ray's per-checkpoint INFO lines and snapshot warnings drown the progress table; keep warnings.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic progress table, with our columns
    settings: dict[str, Any] = {
        "log_to_driver": True,
        "logging_level": "WARNING",
        "logging_config": ray.LoggingConfig(log_level="WARNING"),
    }
    if options.address:
        ray.init(address=options.address, **settings)
    else:
        # Local Ray: every server on 127.0.0.1 only; the dashboard only when asked for.
        ray.init(
            include_dashboard=options.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            **settings,
        )


def _hide_tune_resume_hints(record: logging.LogRecord) -> bool:
    """Tune's own stop notice, "Tuner.restore(...)" hint and trial list: dkd-tune says these its own way."""
    message = record.getMessage()
    return not any(
        text in message for text in ("Tuner.restore", "Trials did not complete", "Stop signal received")
    )


def keep_local_ray_on_loopback() -> None:
    """Make a local Ray started by this process listen on 127.0.0.1 only, not on every interface."""
    os.environ[RAY_LOOPBACK_VARIABLE] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray was imported before the variable was set (a library caller)
        constants.ENABLE_RAY_CLUSTER = False


# ------------------------------------------------------------------------------------------------
# Teachers: loaded or trained, gap measured, logit cache built, once per search


def _launch_teacher_preparation(space, data_spec, shared_ref, experiment_dir, state, options, baseline_cpus):
    """Start one Ray task per teacher not prepared yet (load or train, gap, cache); returns their refs."""
    import ray

    pending = {}
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    for teacher in space.teachers:
        if teacher.label in state["teachers"]:
            continue
        cache_dir, cache_note = _cache_decision(space, data_spec, experiment_dir)
        gpu = 1 if space.resources.gpu > 0 else 0
        cpus = max(1, int(space.resources.cpu)) if gpu else max(1, total_cpus - int(baseline_cpus))
        options.log(
            f"dkd-tune: preparing teacher '{teacher.label}' ({teacher.model}); logit cache: {cache_note}"
        )
        task = ray.remote(_prepare_teacher_task).options(num_cpus=cpus, num_gpus=gpu, max_retries=0)
        pending[teacher.label] = task.remote(
            teacher,
            space.student,
            data_spec,
            shared_ref,
            str(_teachers_dir(space, experiment_dir)),
            cache_dir,
            cache_note,
            cpus,
        )
    return pending


def _collect_teachers(space, pending, data_spec, state, save_state, options) -> dict[str, Any]:
    """Wait for the teacher tasks; record each teacher's artifacts, gap and auto-beta in the state."""
    import ray

    from dkd_tune.teacher import TeacherArtifacts

    artifacts: dict[str, TeacherArtifacts] = {}
    for teacher in space.teachers:
        if teacher.label not in pending:
            artifacts[teacher.label] = TeacherArtifacts.from_dict(state["teachers"][teacher.label])
            continue
        prepared = ray.get(pending[teacher.label])
        prepared = dataclasses.replace(
            prepared,
            predicted_beta=_predict_beta(prepared, data_spec, options),
            non_target=teacher.non_target,
        )
        artifacts[teacher.label] = prepared
        state["teachers"][teacher.label] = prepared.to_dict()
        save_state()
        gap = prepared.gap
        options.log(
            f"dkd-tune: teacher '{teacher.label}': train top-1 {gap.train_acc:.2f}%, test top-1 {gap.test_acc:.2f}%, "
            f"mean logit gap {gap.mean:.3f}"
            + (f", auto-beta {prepared.predicted_beta:.2f}" if prepared.predicted_beta else "")
        )
    return artifacts


def shared_data(data_spec, space: SearchSpaceFile, options: SearchOptions):
    """What the trials share: the decoded dataset (read once, here), or for ImageNet its folders."""
    from dkd_tune.data import ImageFolderData, dataset_num_classes, load_splits
    from dkd_tune.trial import SharedDataset

    if data_spec.name == "imagenet":
        # Folder data is read by each trial's DataLoader workers, one per CPU the trial asks for.
        return ImageFolderData(
            data_spec.root, dataset_num_classes(data_spec), workers=max(1, int(space.resources.cpu))
        )
    options.log(f"dkd-tune: loading {data_spec.name} from {data_spec.root}")
    train, validation, test = load_splits(data_spec)
    return SharedDataset.from_datasets(train, test, validation)


def _prepare_teacher_task(teacher, student, data_spec, shared, teachers_dir, cache_dir, cache_note, cpus):
    import torch

    from dkd_tune.data import ImageFolderData
    from dkd_tune.recipes import resolve_recipe
    from dkd_tune.teacher import prepare_folder_teacher, prepare_teacher
    from dkd_tune.trial import training_device

    torch.set_num_threads(cpus)
    if isinstance(shared, ImageFolderData):
        return prepare_folder_teacher(
            label=teacher.label,
            model=teacher.model,
            checkpoint=teacher.checkpoint,
            data=shared,
            device=training_device(),
        )
    train_set, test_set = shared.datasets()
    train_recipe = None
    if teacher.train is not None:
        train_recipe = resolve_recipe(
            teacher.train.recipe, student=teacher.model, overrides=teacher.train.overrides
        )
    return prepare_teacher(
        label=teacher.label,
        model=teacher.model,
        checkpoint=teacher.checkpoint,
        train_recipe=train_recipe,
        train_set=train_set,
        test_set=test_set,
        augment=data_spec.augment,
        teachers_dir=Path(teachers_dir),
        cache_dir=Path(cache_dir) if cache_dir else None,
        cache_note=cache_note,
        device=training_device(),
    )


def _teachers_dir(space: SearchSpaceFile, experiment_dir: Path) -> Path:
    return experiment_dir.parent / "teachers"


def _cache_decision(space: SearchSpaceFile, data_spec, experiment_dir: Path) -> tuple[str | None, str]:
    """Where to build the exact teacher-logit cache, or None, and why (for the log)."""
    from dkd_tune.data.train_loader import CIFAR_PADDING
    from dkd_tune.data.views import num_views

    mode = space.cache.teacher_logits
    if mode == "off":
        return None, "off (disabled in the file)"
    if data_spec.augment == "autoaugment" or data_spec.name == "imagenet":
        return (
            None,
            f"off (views are unbounded with {'AutoAugment' if data_spec.augment == 'autoaugment' else 'ImageNet crops'})",
        )
    if space.loss == "ce":
        return None, "off (no teacher in CE-only trials)"
    directory = (
        Path(space.cache.dir).expanduser() if space.cache.dir else experiment_dir.parent / "teacher_logits"
    )
    views = num_views(CIFAR_PADDING, flip=True) if data_spec.augment == "standard" else 1
    # Building costs one teacher pass per view; trials without it cost one per trial-epoch.
    trial_epochs = space.search.num_samples * space.max_epochs()
    if mode == "auto" and trial_epochs < views:
        return (
            None,
            f"off (auto: {views} views cost more teacher passes than at most {trial_epochs} trial-epochs)",
        )
    return str(directory), f"on ({views} views per image, in {directory})"


def _predict_beta(prepared, data_spec, options) -> float | None:
    from dkd_tune.auto_beta import default_calibration_or_none

    calibration = default_calibration_or_none(data_spec.family)
    if calibration is None or prepared.gap is None:
        return None
    suggestion = calibration.predict(prepared.gap.mean)
    for warning in suggestion.warnings:
        options.log(f"dkd-tune: auto-beta: {warning}")
    return float(suggestion.beta)


# ------------------------------------------------------------------------------------------------
# One part: a Ray Tune experiment over one teacher (or a baseline)


def _run_part(space, part_name, teacher, teachers, shared_ref, experiment_dir, state, options) -> None:
    from ray import tune

    from dkd_tune.study import study_storage_url
    from dkd_tune.tune_signals import StopOnSignal
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
        tune.with_parameters(function, plan=plan, data=shared_ref), _resources(space)
    )
    part_dir = experiment_dir / part_name
    logger = _trial_logger(space, part_name, teacher, teachers, state)
    searched = [name for name, d in space.space_for(teacher).items() if d.kind != "fixed"] if teacher else []
    run_config = tune.RunConfig(
        name=part_name,
        storage_path=str(experiment_dir),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[logger, StopOnSignal()],
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
        ),
        verbose=1,
    )
    if part_dir.exists() and tune.Tuner.can_restore(str(part_dir)):
        options.log(f"dkd-tune: resuming part '{part_name}' from {part_dir}")
        tuner = tune.Tuner.restore(str(part_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        prior = None
        if teacher is not None and space.space_for(teacher).get("beta", Distribution(fixed=0)).kind == "auto":
            prior = auto_beta_prior(space, plan)
            _announce_prior(prior, teacher.label, state, experiment_dir, options)
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


def _trial_logger(space, part_name, teacher, teachers, state):
    """The MLflow callback of one part: a child run per trial under the search's run."""
    from dkd_tune import tracking

    plan = trial_plan(space, teacher, teachers.get(teacher.label) if teacher else None, part_name)
    return tracking.MLflowTrialLogger(
        state["tracking_uri"],
        space.name,
        state["parent_run_id"],
        teacher_label=teacher.label if teacher else part_name,
        max_epochs=plan.max_epochs,
        fixed_params=_fixed_params(space, plan, teacher, teachers),
        extra_tags={tracking.TAG_SEARCH: state["name"]},
    )


def new_tuner(
    space: SearchSpaceFile,
    part_name: str,
    teacher,
    plan,
    trainable,
    run_config,
    *,
    study_storage=None,
    prior=None,
):
    """The Ray Tune Tuner of one part: its searcher, ASHA and budget (a baseline runs once, unpruned).

    `study_storage` is the Optuna storage URL where the part's study persists (in memory if None).
    """
    from ray import tune
    from ray.tune.search import Searcher

    from dkd_tune.study import study_name

    is_baseline = part_name.startswith(BASELINE_PREFIX)
    searched = {} if is_baseline else space.space_for(teacher)
    if prior is None and "beta" in searched and searched["beta"].kind == "auto":
        prior = auto_beta_prior(space, plan)  # `beta: auto`; the caller may pass the prior it announced
    if prior is not None:
        searched = {**searched, "beta": Distribution(loguniform=prior.beta_range)}
    searcher, param_space, num_samples = search_algorithm(
        space,
        searched,
        max_epochs=plan.max_epochs,
        study=(study_storage, study_name(space.name, part_name)) if study_storage else None,
        first_points=first_points(prior, searched, plan.base_recipe) if prior is not None else None,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=None if is_baseline else asha_scheduler(space, plan.max_epochs),
            num_samples=num_samples,
            max_concurrent_trials=space.search.max_concurrent_trials
            if isinstance(searcher, Searcher)
            else None,
            reuse_actors=True,  # a new trial reuses a finished trial's process: no Python + torch start-up
            trial_name_creator=TrialName(part_name),
            trial_dirname_creator=TrialName(part_name),
        ),
        run_config=run_config,
    )


class TrialName:
    """Trial names and folders `<part>-<trial id>` (picklable, so a restored Tuner keeps them)."""

    def __init__(self, part_name: str):
        self.part_name = part_name

    def __call__(self, trial) -> str:
        return f"{self.part_name}-{trial.trial_id}"


def _resources(space: SearchSpaceFile) -> dict[str, float]:
    if space.resources.workers > 1:
        # The trial itself only coordinates; its DDP workers ask Ray Train for CPUs and GPUs. A trial
        # must reserve something, and any CPU share would leave too little for the workers' whole CPUs.
        return {"cpu": 0, "memory": 1}
    return {"cpu": space.resources.cpu, "gpu": space.resources.gpu}


def _fixed_params(space, plan, teacher, teachers) -> dict[str, Any]:
    params: dict[str, Any] = dict(plan.base_recipe.to_dict())
    params.update(
        loss=plan.loss_mode,
        student=space.student,
        teacher=teacher.label if teacher else "none",
        teacher_model=teacher.model if teacher else "none",
        dataset=plan.dataset_name,
        augment=plan.augment,
        max_epochs=plan.max_epochs,
    )
    if teacher is not None and teacher.label in teachers and teachers[teacher.label].gap is not None:
        params["teacher_gap"] = round(teachers[teacher.label].gap.mean, 4)
    return params


def auto_beta_prior(space: SearchSpaceFile, plan):
    """`beta: auto`: the teacher's measured gap read through its dataset family's shipped calibration."""
    from dkd_tune.auto_beta import beta_prior, default_calibration
    from dkd_tune.data import parse_data_spec

    family = parse_data_spec(space.data_spec_value(), source="data").family
    if plan.teacher is None or plan.teacher.gap is None:
        raise ValueError("beta: auto needs the teacher's measured gap (prepare the teacher first)")
    gap = plan.teacher.gap
    return beta_prior(default_calibration(family), gap.mean, teacher_acc=gap.test_acc)


def _announce_prior(prior, label: str, state, experiment_dir: Path, options) -> None:
    """Say the prior `beta: auto` starts from, and tag it on the search's MLflow run."""
    for warning in prior.suggestion.warnings:
        options.log(f"dkd-tune: auto-beta: {warning}")
    options.log(f"dkd-tune: teacher '{label}': beta: auto: {prior.describe()}")
    s = prior.suggestion
    tags = {
        f"auto_beta.{label}.beta": f"{s.beta:.4g}",
        f"auto_beta.{label}.window": f"[{s.low:.4g}, {s.high:.4g}]",
        f"auto_beta.{label}.calibration": s.calibration,
        f"auto_beta.{label}.first_trials": ", ".join(f"{b:.4g}" for b in prior.first_betas()),
    }

    def tag(client) -> None:
        for key, value in tags.items():
            client.set_tag(state["parent_run_id"], key, value)

    _tracking_step(state, experiment_dir, options, tag)


def first_points(prior, searched: dict[str, Distribution], base) -> list[dict[str, Any]]:
    """Optuna's first trials for `beta: auto`: each of the prior's betas, the other searched values at the recipe's."""
    others = {}
    for name, distribution in searched.items():
        if name == "beta" or distribution.kind == "fixed":
            continue
        value = getattr(base, name, None)
        bounds = distribution.extremes()
        if distribution.kind in ("choice", "grid"):
            others[name] = value if value in bounds else bounds[0]
        else:
            inside = value is not None and bounds[0] <= value <= bounds[1]
            others[name] = value if inside else bounds[0]
    return [{"beta": beta, **others} for beta in prior.first_betas()]


def search_algorithm(
    space: SearchSpaceFile,
    searched: dict[str, Distribution],
    *,
    max_epochs: int | None = None,
    study: tuple[str, str] | None = None,
    first_points: list[dict[str, Any]] | None = None,
):
    """(search algorithm, Tuner param_space, num_samples) for one part.

    `study` is (Optuna storage URL, study name): where the part's TPE study persists (in memory if None).
    `first_points` are Optuna's first trials (`beta: auto`'s prior), TPE's own suggestions after them.
    """
    from ray.tune.search import BasicVariantGenerator

    variable = {name: d for name, d in searched.items() if d.kind != "fixed"}
    if any(d.kind == "auto" for d in variable.values()):
        raise ValueError(
            "beta: auto is resolved to a range and first trials (new_tuner) before the searcher is built"
        )
    settings = space.search
    # BasicVariantGenerator limits concurrency itself (TuneConfig's limit only applies to Searchers).
    concurrency = settings.max_concurrent_trials or 0
    if not variable:
        return BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency), {}, 1
    if settings.algorithm == "optuna":
        import optuna

        from dkd_tune.study import TruthfulOptunaSearch

        startup = max(MIN_STARTUP_TRIALS, min(MAX_STARTUP_TRIALS, settings.num_samples // 3))
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=startup, multivariate=True)
        distributions = {name: _optuna_distribution(d) for name, d in variable.items()}
        storage, name = study if study is not None else (None, None)
        searcher = TruthfulOptunaSearch(
            space=distributions,
            metric=space.metric,
            mode=space.mode,
            sampler=sampler,
            max_epochs=max_epochs or space.max_epochs(),
            storage=optuna.storages.RDBStorage(storage) if storage else None,
            study_name=name,
            points_to_evaluate=first_points,
        )
        return searcher, {}, settings.num_samples
    param_space = {name: _tune_distribution(d, settings.algorithm) for name, d in variable.items()}
    return (
        BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency),
        param_space,
        settings.num_samples,
    )


def _optuna_distribution(distribution: Distribution):
    import optuna

    if distribution.kind == "uniform":
        return optuna.distributions.FloatDistribution(*distribution.uniform)
    if distribution.kind == "loguniform":
        return optuna.distributions.FloatDistribution(*distribution.loguniform, log=True)
    if distribution.kind == "int":
        return optuna.distributions.IntDistribution(*distribution.int_range)
    return optuna.distributions.CategoricalDistribution(distribution.choice)


def _tune_distribution(distribution: Distribution, algorithm: str):
    from ray import tune

    kind = distribution.kind
    if kind == "grid" or (algorithm == "grid" and kind == "choice"):
        return tune.grid_search(list(distribution.grid or distribution.choice))
    if kind == "uniform":
        return tune.uniform(*distribution.uniform)
    if kind == "loguniform":
        return tune.loguniform(*distribution.loguniform)
    if kind == "int":
        low, high = distribution.int_range
        return tune.randint(low, high + 1)
    return tune.choice(list(distribution.choice))


def asha_scheduler(space: SearchSpaceFile, max_epochs: int):
    if space.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        max_t=max_epochs,
        grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
    )


# ------------------------------------------------------------------------------------------------
# MLflow parent run


def _start_parent_run(client, space, experiment_dir, state, data_spec, nest_under: str | None) -> str:
    from dkd_tune import tracking

    tags = {
        **tracking.standard_tags("search"),
        tracking.TAG_SEARCH: state["name"],
        "student": space.student,
        "dataset": data_spec.name,
        "dataset_family": data_spec.family,
        "teachers": ", ".join(t.label for t in space.teachers) or "none",
        "loss": space.loss,
    }
    if nest_under:
        tags[tracking.TAG_PARENT] = nest_under
    experiment = tracking.experiment_id(client, space.name)
    run = client.create_run(experiment, run_name=state["name"], tags=tags)
    tracking.log_params(
        client, run.info.run_id, space.model_dump(mode="json", by_alias=True, exclude_none=True)
    )
    client.log_artifact(run.info.run_id, str(experiment_dir / CONFIG_FILE))
    return run.info.run_id


def _tag_parent_with_teachers(client, run_id: str, teachers: dict[str, Any]) -> None:
    """Teacher gap and auto-beta as tags of the search's run (per teacher, and plain when there is one)."""
    from dkd_tune import tracking

    tags = {}
    for label, artifact in teachers.items():
        if artifact.gap is not None:
            tags[f"teacher_gap.{label}"] = f"{artifact.gap.mean:.4f}"
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


def _sync_trial_runs(space, state, teachers, experiment_dir: Path, frame, options) -> bool:
    """Bring MLflow in line with Ray's record of every trial; False (said in one line) if it is unreachable.

    Each trial gets its run, with every epoch Ray saved (what the callback could not deliver while
    the store was away is filled in here), then `_reconcile_child_runs` sets the statuses and
    repairs runs that disagree with Ray. Idempotent: `dkd-tune sync` and `resume` run it again.
    """
    from types import SimpleNamespace

    from analysis.results import read_trials, trial_histories

    def sync(client) -> None:
        _tag_parent_with_teachers(client, state["parent_run_id"], teachers)
        for part_name, teacher in search_parts(space):
            part_dir = experiment_dir / part_name
            if not part_dir.is_dir():
                continue
            logger = _trial_logger(space, part_name, teacher, teachers, state)
            for record in read_trials(part_dir):
                trial = SimpleNamespace(
                    trial_id=record["trial_id"], config=record["config"], last_result=record["last_result"]
                )
                logger.run_for(trial)
                for result in record["history"]:
                    logger.log_result(trial, result)
        _reconcile_child_runs(client, state, frame, trial_histories(experiment_dir))

    return _tracking_step(state, experiment_dir, options, sync)


def _close_search_run(state, experiment_dir: Path, frame, best, space, options) -> bool:
    """The search's MLflow run: results, analysis and best trial logged, then FINISHED."""
    from analysis.search_analysis import MLFLOW_ARTIFACT_DIR, log_analysis

    def close(client) -> None:
        if (experiment_dir / MLFLOW_ARTIFACT_DIR).is_dir():
            log_analysis(client, state["parent_run_id"], experiment_dir / MLFLOW_ARTIFACT_DIR)
        _finish_parent_run(client, state["parent_run_id"], experiment_dir, frame, best, space)

    return _tracking_step(state, experiment_dir, options, close)


def _tracking_step(state, experiment_dir: Path, options, step: Callable[[Any], None]) -> bool:
    """Run `step(client)` on the search's MLflow store; False, said in one line, if the store is unreachable."""
    from dkd_tune import tracking

    try:
        step(tracking.client_for(state["tracking_uri"]))
    except Exception as error:
        if not tracking.store_unreachable(error):
            raise
        options.log(
            f"dkd-tune: MLflow store {state['tracking_uri']} unreachable ({type(error).__name__}): the results "
            f"are complete in {experiment_dir}; when the store is back, run dkd-tune sync {_command_target(experiment_dir)}"
        )
        return False
    return True


def sync_search(name_or_path: str, options: SearchOptions) -> bool:
    """`dkd-tune sync`: fill MLflow from a finished search's folder (after the store was unreachable)."""
    import pandas as pd

    from dkd_tune import tracking
    from dkd_tune.teacher import TeacherArtifacts

    check_tracking_uri(options.tracking_uri, "--tracking-uri")
    tracking.keep_http_retries_short()
    experiment_dir = locate_search(name_or_path, options.storage)
    state = read_state(experiment_dir / STATE_FILE)
    if state.get("status") != "done" or not (experiment_dir / RESULTS_FILE).is_file():
        raise UserInputError(
            f"search {state['name']!r} ({experiment_dir}): not finished (status {state.get('status')!r}); "
            f"{resume_command(experiment_dir)} finishes it and fills MLflow"
        )
    if options.tracking_uri:
        state["tracking_uri"] = options.tracking_uri
    space = load_search_space(experiment_dir / CONFIG_FILE)
    teachers = {label: TeacherArtifacts.from_dict(entry) for label, entry in state["teachers"].items()}
    frame = pd.read_parquet(experiment_dir / RESULTS_FILE)
    tracked = _sync_trial_runs(space, state, teachers, experiment_dir, frame, options)
    tracked = tracked and _close_search_run(
        state, experiment_dir, frame, _best_row(frame, space), space, options
    )
    state["tracking"] = "synced" if tracked else "pending"
    atomic_write_json(experiment_dir / STATE_FILE, state)
    if tracked and space.probe is not None and not state.get("probes_done"):
        options.log(f"dkd-tune: the probes have not run yet: {resume_command(experiment_dir)} runs them")
    return tracked


def _trial_runs(client, parent_run_id: str) -> list:
    """The search's trial runs (children of its parent run that carry a trial id)."""
    from dkd_tune import tracking

    children = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent_run_id}'",
        max_results=50000,
    )
    return [run for run in children if tracking.TAG_TRIAL_ID in run.data.tags]


def _reconcile_child_runs(client, state, frame, histories: Mapping[str, list[dict]]) -> None:
    """Make MLflow's trial runs match Ray's trials after an interruption.

    A run whose logged epochs are not its trial's history in Ray (the driver died after logging an
    epoch that the resumed trial never reached again) is rebuilt from that history. A run left open
    gets the status Ray recorded. A run whose trial Ray never recorded (the driver died after the
    trial started but before Ray saved its state; Ray runs that sample again as a new trial) is
    ended as KILLED, tagged "lost" and moved to MLflow's trash, where it stays until `mlflow gc`:
    the search then has one run per trial of its results, none twice.
    """
    from dkd_tune import tracking

    if frame.empty:
        return
    children = _trial_runs(client, state["parent_run_id"])
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
                run_id, status="FAILED" if row["status"] in ("errored", "oom") else "FINISHED"
            )


def _probe_best_trials(space, frame, client, experiment_dir: Path, state, options) -> None:
    """Linear probes of the best trials (Ray tasks), each logged under its trial's run; probes.parquet."""
    from dkd_tune import tracking
    from dkd_tune.probe_runs import probe_best_trials

    child_run_ids = {
        run.data.tags[tracking.TAG_TRIAL_ID]: run.info.run_id
        for run in _trial_runs(client, state["parent_run_id"])
    }
    probes = probe_best_trials(
        frame,
        space.probe,
        tracking_uri=state["tracking_uri"],
        experiment_name=space.name,
        child_run_ids=child_run_ids,
        resources=space.resources,
        log=options.log,
    )
    path = experiment_dir / PROBES_FILE
    with atomic_path(path) as tmp:
        probes.to_parquet(tmp, index=False)
    client.log_artifact(state["parent_run_id"], str(path))


def _best_row(frame, space: SearchSpaceFile) -> dict[str, Any] | None:
    """The best searched trial that ran its full budget (baselines are references, not candidates)."""
    if frame.empty:
        return None
    candidates = frame[(frame["status"] == "completed") & ~frame["part"].str.startswith(BASELINE_PREFIX)]
    if candidates.empty:
        return None
    column = {"test_acc": "final_test_acc", "val_acc": "final_val_acc", "val_loss": "final_val_loss"}.get(
        space.metric, space.metric
    )
    if column not in candidates:
        column = "final_test_acc"
    index = candidates[column].idxmax() if space.mode == "max" else candidates[column].idxmin()
    return candidates.loc[index].to_dict()


def _write_analysis(state, experiment_dir, frame, options) -> None:
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
            title=f"Search {state['name']}",
        )
    except Exception as error:  # any plotting failure is reported, not raised
        options.log(f"dkd-tune: warning: the analysis tables and figures were not written ({error!r})")


def _finish_parent_run(client, run_id, experiment_dir, frame, best, space) -> None:
    from dkd_tune import tracking

    client.log_artifact(run_id, str(experiment_dir / RESULTS_FILE))
    if best is not None:
        tracking.log_metrics(
            client,
            run_id,
            tracking.numeric_metrics(
                {"best_final_test_acc": best.get("final_test_acc"), "best_beta": best.get("beta")}
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
