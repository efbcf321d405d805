"""Probe runs: linear probes logged to MLflow, from `dkd-tune probe` or for a search's best trials as Ray tasks.

A probe run (kind "probe") holds the protocol as params, the head's per-epoch train loss, train
and test top-1 and learning rate with the epoch as step, and the final accuracies. It is linked
to the student's run twice: nested under it (`mlflow.parentRunId`, so MLflow's UI shows it
inside that run) and tagged `dkd_tune.student_run_id` (for queries). The student's run also gets
the probe's final top-1 as `probe_<dataset>_test_acc` / `probe_<dataset>_train_acc`, so trials
can be compared on transfer in MLflow's compare view.

After a search, `probe_best_trials` probes its best k completed trials: each student and each
probe dataset are read once, in the driver (a dataset once per input size and normalisation), one
Ray task per (trial, dataset) runs the probe on the cluster's resources, and the driver logs the
results, as it logs everything else of a search. A (trial, dataset) that already has a finished
probe run under its trial's run is not probed again, so a resumed search adds no duplicate.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.results import typed_frame
from dkd_tune.core.errors import UserInputError
from dkd_tune.data import ImageDataset
from dkd_tune.engine.devices import training_device
from dkd_tune.probe import (
    PAPER_PROTOCOL,
    ProbeProtocol,
    ProbeResult,
    Student,
    load_probe_splits,
    load_student,
    probe_checkpoint,
    probe_model,
)

TAG_STUDENT_RUN = "dkd_tune.student_run_id"
TAG_STUDENT_TRIAL = "dkd_tune.student_trial_id"
TAG_PROBE_DATASET = "dkd_tune.probe_dataset"
DEFAULT_EXPERIMENT = "probe"
AUGMENTATION = "none (features of the resized images, computed once)"

# name -> pandas dtype: one row per (trial, probe dataset).
PROBE_COLUMNS: dict[str, str] = {
    "trial_id": "string",
    "teacher": "string",
    "rank": "int64",
    "student_test_acc": "float64",
    "dataset": "string",
    "status": "string",  # completed | errored
    "probe_train_acc": "float64",
    "probe_test_acc": "float64",
    "feature_dim": "int64",
    "num_train": "int64",
    "num_test": "int64",
    "extract_s": "float64",
    "train_s": "float64",
    "probe_run_id": "string",
    "student_run_id": "string",
    "checkpoint_path": "string",
    "error": "string",
}


# ------------------------------------------------------------------------------------------------
# dkd-tune probe


def probe_command(
    checkpoint: str | os.PathLike,
    dataset: str,
    data_root: str | os.PathLike,
    *,
    model_name: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[ProbeResult, str | None]:
    """Probe one checkpoint; log an MLflow run when a store is set (flag, else MLFLOW_TRACKING_URI).

    Returns the result and the probe run's id (None without a store). With `parent_run_id` the
    run is nested under that (student) run and, unless `experiment` says otherwise, in its experiment.
    """
    from dkd_tune.config.tracking_uri import check_tracking_uri

    _check_device(device)
    check_tracking_uri(tracking_uri, "--tracking-uri")
    check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if parent_run_id and not uri:
        raise UserInputError(
            f"--parent-run-id {parent_run_id}: needs an MLflow store; pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    experiment_name = experiment or DEFAULT_EXPERIMENT
    if uri and parent_run_id:
        # Checked before the probe runs, so a mistyped id costs nothing.
        parent_experiment = _run_experiment_name(uri, parent_run_id)
        experiment_name = experiment or parent_experiment
    result = probe_checkpoint(
        checkpoint, dataset, data_root, model_name=model_name, device=device, seed=seed, progress=progress
    )
    if not uri:
        return result, None
    run_id = log_probe_run(uri, experiment_name, result, student_run_id=parent_run_id)
    return result, run_id


def _check_device(device: str | None) -> None:
    from dkd_tune.engine.devices import chosen_device

    if device is not None:
        chosen_device(device)


def _run_experiment_name(uri: str, run_id: str) -> str:
    from dkd_tune.tracking.connect import open_store

    store = open_store(uri)
    run = store.run(run_id)
    if run is None:
        raise UserInputError(f"--parent-run-id {run_id}: no such run in the MLflow store {uri}")
    return store.experiment_name(run.experiment_id)


# ------------------------------------------------------------------------------------------------
# Logging


def log_probe_run(
    tracking_uri: str,
    experiment_name: str,
    result: ProbeResult,
    *,
    student_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """One finished probe as an MLflow run, nested under and tagged with the student's run; returns its id."""
    from dkd_tune.tracking.runs import command_run, now_ms, numeric_metrics

    run_tags = {TAG_PROBE_DATASET: result.dataset, **(tags or {})}
    if student_run_id:
        run_tags[TAG_STUDENT_RUN] = student_run_id
    with command_run(
        "probe",
        experiment_name,
        tracking_uri,
        run_name=f"probe-{result.dataset}-{result.arch or 'student'}",
        parent_run_id=student_run_id,
        tags=run_tags,
    ) as (store, run_id):
        store.log_params(run_id, probe_params(result))
        for epoch in result.history:
            metrics = {
                "train_loss": epoch.train_loss,
                "train_acc": epoch.train_acc,
                "test_acc": epoch.test_acc,
                "lr": epoch.lr,
            }
            store.log_metrics(run_id, numeric_metrics(metrics), epoch.epoch, now_ms())
        final = {
            "final_train_acc": result.train_acc,
            "final_test_acc": result.test_acc,
            "extract_s": result.extract_seconds,
            "train_s": result.train_seconds,
        }
        store.log_metrics(run_id, final, result.protocol.epochs, now_ms())
        if student_run_id:
            prefix = f"probe_{result.dataset.replace('-', '_')}"
            summary = {f"{prefix}_train_acc": result.train_acc, f"{prefix}_test_acc": result.test_acc}
            store.log_metrics(student_run_id, summary, 0, now_ms())
    return run_id


def log_failed_probe(
    tracking_uri: str,
    experiment_name: str,
    dataset: str,
    error: str,
    *,
    student_run_id: str | None,
    tags: Mapping[str, Any],
) -> str:
    """A probe that could not run, as a FAILED run with the reason in `dkd_tune.error`."""
    from dkd_tune.tracking import runs
    from dkd_tune.tracking.connect import open_store
    from dkd_tune.tracking.store import FAILED

    store = open_store(tracking_uri)
    run_tags = {
        **runs.standard_tags("probe"),
        **tags,
        TAG_PROBE_DATASET: dataset,
        runs.TAG_ERROR: error[-4000:],
    }
    if student_run_id:
        run_tags.update({runs.TAG_PARENT: student_run_id, TAG_STUDENT_RUN: student_run_id})
    run_id = store.start_run(store.experiment(experiment_name), name=f"probe-{dataset}", tags=run_tags)
    store.end_run(run_id, FAILED)
    return run_id


def probe_params(result: ProbeResult) -> dict[str, Any]:
    return {
        "checkpoint": result.checkpoint,
        "arch": result.arch,
        "dataset": result.dataset,
        "input_size": result.input_size,
        "features": "global average pool, frozen, eval mode",
        "augmentation": AUGMENTATION,
        "seed": result.seed,
        "num_train": result.num_train,
        "num_test": result.num_test,
        "num_classes": result.num_classes,
        "feature_dim": result.feature_dim,
        "device": result.device,
        "protocol": dataclasses.asdict(result.protocol),
    }


# ------------------------------------------------------------------------------------------------
# A search's best trials


def probe_best_trials(
    results: pd.DataFrame,
    probe_config: Any,
    *,
    tracking_uri: str,
    experiment_name: str,
    child_run_ids: Mapping[str, str],
    resources: Any,
    run_tasks: bool = True,
    model_name: str | None = None,
    seed: int = 0,
    protocol: ProbeProtocol = PAPER_PROTOCOL,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Probe the best `probe_config.top_k` completed trials on each of `probe_config.datasets`.

    `results` is the search's results frame (`trial_id`, `status`, `final_test_acc`,
    `checkpoint_path`, `teacher`); `child_run_ids` maps a trial id to its MLflow run, under which
    its probe runs are nested; `resources` (the search's, with `cpu` and `gpu`) sizes each Ray
    task (at most one GPU: a probe is light). `run_tasks=False` runs the probes one after another
    in this process, without Ray. Returns one row per (trial, dataset) (schema: PROBE_COLUMNS);
    a probe that fails is an "errored" row and a FAILED run, and does not stop the others.
    """
    from dkd_tune.tracking.runs import TAG_TEACHER

    chosen = best_trials(results, probe_config.top_k)
    if chosen.empty:
        log("dkd-tune: probe: no completed trial with a checkpoint to probe")
        return typed_frame(pd.DataFrame([]), PROBE_COLUMNS)
    datasets = list(probe_config.datasets)
    log(
        f"dkd-tune: probe: the best {len(chosen)} trial(s) ({', '.join(chosen['trial_id'])}) "
        f"on {', '.join(datasets)}"
    )
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for rank, row in enumerate(chosen.itertuples(index=False), start=1):
        teacher = getattr(row, "teacher", None)
        for dataset in datasets:
            rows[(row.trial_id, dataset)] = {
                "trial_id": row.trial_id,
                "teacher": teacher if isinstance(teacher, str) else None,
                "rank": rank,
                "student_test_acc": row.final_test_acc,
                "dataset": dataset,
                "student_run_id": child_run_ids.get(row.trial_id),
                "checkpoint_path": row.checkpoint_path,
            }
    _reuse_finished_probes(rows, tracking_uri)
    todo = [key for key, row in rows.items() if row.get("status") is None]

    students: dict[str, Student] = {}
    problems: dict[tuple[str, str], str] = {}
    for trial_id in dict.fromkeys(trial_id for trial_id, _ in todo):
        try:
            students[trial_id] = load_student(rows[(trial_id, datasets[0])]["checkpoint_path"], model_name)
        except UserInputError as error:
            for dataset in datasets:
                problems[(trial_id, dataset)] = str(error)
    splits: dict[tuple, Any] = {}
    for trial_id, dataset in todo:
        if (trial_id, dataset) in problems:
            continue
        key = _split_key(dataset, students[trial_id])
        if key not in splits:
            try:
                splits[key] = _shared_splits(dataset, probe_config.data_root, students[trial_id])
            except UserInputError as error:
                splits[key] = error
        if isinstance(splits[key], UserInputError):
            problems[(trial_id, dataset)] = str(splits[key])

    runnable = [key for key in todo if key not in problems]
    outcomes = _run_probes(runnable, students, splits, resources, run_tasks, seed, protocol, log)
    outcomes.update(problems)

    for (trial_id, dataset), outcome in outcomes.items():
        row = rows[(trial_id, dataset)]
        tags = {TAG_STUDENT_TRIAL: trial_id}
        if row["teacher"] is not None:
            tags[TAG_TEACHER] = row["teacher"]
        if isinstance(outcome, ProbeResult):
            student = students[trial_id]
            result = dataclasses.replace(outcome, arch=student.arch, checkpoint=str(student.path))
            row.update(
                status="completed",
                probe_train_acc=result.train_acc,
                probe_test_acc=result.test_acc,
                feature_dim=result.feature_dim,
                num_train=result.num_train,
                num_test=result.num_test,
                extract_s=result.extract_seconds,
                train_s=result.train_seconds,
                probe_run_id=log_probe_run(
                    tracking_uri, experiment_name, result, student_run_id=row["student_run_id"], tags=tags
                ),
            )
            log(
                f"dkd-tune: probe: trial {trial_id} on {dataset}: train top-1 {result.train_acc:.2f}%, "
                f"test top-1 {result.test_acc:.2f}%"
            )
        else:
            row.update(
                status="errored",
                error=outcome,
                probe_run_id=log_failed_probe(
                    tracking_uri,
                    experiment_name,
                    dataset,
                    outcome,
                    student_run_id=row["student_run_id"],
                    tags=tags,
                ),
            )
            log(f"dkd-tune: probe: trial {trial_id} on {dataset} failed: {outcome}")
    return typed_frame(pd.DataFrame(list(rows.values())), PROBE_COLUMNS)


def best_trials(results: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The `top_k` completed trials with a checkpoint, best first (ties: trial id).

    Ranked by final validation top-1 when the search held a validation split out, else by final
    test top-1: the probes then report on other datasets, not on the split the trials were chosen on.
    """
    from analysis.trial_choice import ranked

    if results.empty:
        return results
    ordered = ranked(results)
    return ordered[ordered["checkpoint_path"].notna()].head(top_k).reset_index(drop=True)


def run_probe_task(
    model: Any,
    splits: tuple[Mapping[str, Any], Mapping[str, Any]],
    seed: int,
    protocol: ProbeProtocol,
    threads: int | None,
    use_gpu: bool,
) -> ProbeResult:
    """One probe where it is scheduled (a Ray task, or inline): features once, then the head."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = training_device(prefer_cuda=use_gpu)
    train_set, test_set = (_restored(fields) for fields in splits)
    return probe_model(model, train_set, test_set, device=device, seed=seed, protocol=protocol)


def _run_probes(runnable, students, splits, resources, run_tasks, seed, protocol, log) -> dict:
    """(trial, dataset) -> ProbeResult, or the one-line reason it failed."""
    outcomes: dict[tuple[str, str], Any] = {}
    if not runnable:
        return outcomes
    cpus, gpus = _task_resources(resources)
    if not run_tasks:
        for trial_id, dataset in runnable:
            started = time.perf_counter()
            shared = splits[_split_key(dataset, students[trial_id])]
            try:
                outcomes[(trial_id, dataset)] = run_probe_task(
                    students[trial_id].model, shared, seed, protocol, None, torch.cuda.is_available()
                )
            except Exception as error:  # one failed probe must not lose the others
                outcomes[(trial_id, dataset)] = _last_line(error)
            log(f"dkd-tune: probe: trial {trial_id} on {dataset} took {time.perf_counter() - started:.1f}s")
        return outcomes

    import ray

    task = ray.remote(run_probe_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    split_refs = {key: ray.put(value) for key, value in splits.items() if not isinstance(value, Exception)}
    model_refs = {trial_id: ray.put(student.model) for trial_id, student in students.items()}
    pending = {
        (trial_id, dataset): task.remote(
            model_refs[trial_id],
            split_refs[_split_key(dataset, students[trial_id])],
            seed,
            protocol,
            max(1, int(cpus)),
            gpus > 0,
        )
        for trial_id, dataset in runnable
    }
    log(f"dkd-tune: probe: {len(pending)} Ray task(s), {cpus} CPU and {gpus} GPU each")
    for key, ref in pending.items():
        try:
            outcomes[key] = ray.get(ref)
        except Exception as error:  # a RayTaskError wraps the probe's own exception
            outcomes[key] = _last_line(error)
    return outcomes


def _task_resources(resources: Any) -> tuple[float, float]:
    """(CPUs, GPUs) per probe task from the search's per-trial resources; at most one GPU."""
    if isinstance(resources, Mapping):
        cpu, gpu = resources.get("cpu", 1), resources.get("gpu", 0)
    else:
        cpu, gpu = getattr(resources, "cpu", 1), getattr(resources, "gpu", 0)
    return max(float(cpu or 1), 1.0), min(float(gpu or 0), 1.0)


def _split_key(dataset: str, student: Student) -> tuple:
    return (dataset, student.input_size, tuple(student.mean), tuple(student.std))


def _shared_splits(dataset: str, data_root: str, student: Student) -> tuple[dict[str, Any], dict[str, Any]]:
    train_set, test_set = load_probe_splits(
        dataset, os.path.expanduser(data_root), student.input_size, mean=student.mean, std=student.std
    )
    return _portable(train_set), _portable(test_set)


def _portable(dataset: ImageDataset) -> dict[str, Any]:
    """The dataset's fields, tensors as numpy arrays: Ray's object store hands those to tasks without a copy."""
    fields = {field.name: getattr(dataset, field.name) for field in dataclasses.fields(dataset)}
    return {name: v.numpy() if isinstance(v, torch.Tensor) else v for name, v in fields.items()}


def _restored(fields: Mapping[str, Any]) -> ImageDataset:
    with warnings.catch_warnings():
        # Object-store arrays are read-only; the probe only reads them.
        warnings.simplefilter("ignore", UserWarning)
        return ImageDataset(
            **{name: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for name, v in fields.items()}
        )


def _reuse_finished_probes(rows: dict[tuple[str, str], dict[str, Any]], tracking_uri: str) -> None:
    """Fill the rows whose trial already has a FINISHED probe run for that dataset (a resumed search)."""
    from dkd_tune.tracking.connect import open_store
    from dkd_tune.tracking.runs import TAG_KIND, TAG_PARENT
    from dkd_tune.tracking.store import FINISHED

    linked = [row for row in rows.values() if row["student_run_id"]]
    if not linked:
        return
    store = open_store(tracking_uri)
    for row in linked:
        student_run = store.run(row["student_run_id"])
        if student_run is None:
            continue  # the trial's run is gone: probe it again, unlinked runs are not matched
        found = store.find_runs(
            [student_run.experiment_id],
            tags={TAG_PARENT: row["student_run_id"], TAG_KIND: "probe", TAG_PROBE_DATASET: row["dataset"]},
            status=FINISHED,
            newest_first=True,
            limit=1,
        )
        if not found:
            continue
        run = found[0]
        metrics, params = run.metrics, run.params
        row.update(
            status="completed",
            probe_train_acc=metrics.get("final_train_acc"),
            probe_test_acc=metrics.get("final_test_acc"),
            feature_dim=params.get("feature_dim"),
            num_train=params.get("num_train"),
            num_test=params.get("num_test"),
            extract_s=metrics.get("extract_s"),
            train_s=metrics.get("train_s"),
            probe_run_id=run.run_id,
        )


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
