"""MLflow naming and nesting: a parent run per search, a child run per trial, runs for single commands.

All logging of a search happens in the driver, through a Ray Tune callback: trials never open
the tracking store. One writer means no "database is locked" with MLflow's default SQLite store
however many trials run at once, it works on clusters whose workers cannot reach the store, and
a trial that crashes cannot leave a half-written run behind. The callback is idempotent: after
`dkd-tune resume` it re-attaches to the runs it created (found by their trial-id tag) and skips
metric steps it already logged, so no run or metric point is duplicated. When the search ends,
a run whose logged epochs are not its trial's history in Ray (the driver died between logging an
epoch and Ray saving it) is rebuilt from that history: MLflow and Ray always agree.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dkd_tune import __version__
from dkd_tune.core.errors import UserInputError

TAG_KIND = "dkd_tune.kind"  # search | trial | train-teacher | distill | suggest-beta | probe | validate-beta
TAG_SEARCH = "dkd_tune.search"
TAG_TRIAL_ID = "dkd_tune.trial_id"
TAG_TEACHER = "dkd_tune.teacher"
# running | completed | stopped | diverged | errored | oom; lost and superseded runs are deleted
TAG_STATUS = "dkd_tune.status"
TAG_STOP_EPOCH = "dkd_tune.stop_epoch"
TAG_PARENT = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000
BATCH_LIMIT = 100  # MLflow accepts at most this many params or tags per log_batch call
RETRY_INTERVAL_S = 10.0  # while the store is unreachable: one delivery attempt per interval, not per epoch
# What MLflow reports when a server cannot be reached or is overloaded (its REST client wraps
# connection errors as INTERNAL_ERROR); other codes are real errors and are raised.
UNREACHABLE_ERROR_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
# MLflow retries a failed HTTP call 7 times with exponential backoff by default (about 4 minutes):
# a search would stall that long per call while a server restarts. A few quick retries instead,
# unless the user set these variables; what is missed is delivered later from the queue or Ray.
SHORT_HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def store_unreachable(error: BaseException) -> bool:
    """Whether a tracking call failed because the store is away (retry later), not because it was wrong."""
    import requests

    if isinstance(error, (requests.RequestException, OSError)):
        return True
    return isinstance(error, MlflowException) and error.error_code in UNREACHABLE_ERROR_CODES


def check_reachable(uri: str) -> None:
    """One line, exit code 2, when the tracking store does not answer (a server that is not running)."""
    try:
        client_for(uri).search_experiments(max_results=1)
    except Exception as error:
        if not store_unreachable(error):
            raise
        raise UserInputError(
            f"MLflow store {uri}: unreachable ({type(error).__name__}); start its server, "
            "or pass another --tracking-uri"
        ) from None


def keep_http_retries_short() -> None:
    for name, value in SHORT_HTTP_RETRIES.items():
        os.environ.setdefault(name, value)


def resolve_tracking_uri(uri: str | None) -> str:
    """The URI to use: the user's, else MLFLOW_TRACKING_URI, else MLflow's own default (./mlflow.db)."""
    if uri:
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def absolute_tracking_uri(uri: str | None) -> str:
    """`resolve_tracking_uri`, with a relative SQLite path made absolute (a resume may run elsewhere)."""
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def client_for(uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


# MLflow 3 tells model-training experiments from GenAI ones by this tag; its UI opens the former on
# their runs (where the UI's own "Model training" / "GenAI" switch does not decide instead).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if needed (artifacts beside a SQLite store, not in the cwd)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    return client.create_experiment(
        name,
        artifact_location=default_artifact_location(client.tracking_uri, name),
        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
    )


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """For a SQLite store, `<store's folder>/mlruns/<experiment>`; otherwise the server's own default.

    MLflow would put a SQLite store's artifacts under ./mlruns of whichever directory the command
    ran in; keeping them beside the database keeps a search's store in one place.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (database.parent / "mlruns" / experiment_name).as_uri()


def git_commit() -> str | None:
    """The working directory's git commit, when there is one (no shell, no user input)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        if result.returncode == 0:
            return result.stdout.strip()
    return None


def standard_tags(kind: str) -> dict[str, str]:
    tags = {TAG_KIND: kind, "dkd_tune.version": __version__}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"}, the form MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            text = str(list(value) if isinstance(value, tuple) else value)
            flat[name] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return flat


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(key, value) for key, value in flatten(params).items()]
    for start in range(0, len(items), BATCH_LIMIT):
        client.log_batch(run_id, params=items[start : start + BATCH_LIMIT])


def tag_key(key: str) -> str:
    """`key` as MLflow accepts a tag name: characters other than letters, digits, `_-. :/` become `_`
    (a teacher named `resnet20-target+2` is tagged `teacher_gap.resnet20-target_2`)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(tag_key(key), str(value)) for key, value in tags.items() if value is not None]
    for start in range(0, len(items), BATCH_LIMIT):
        client.log_batch(run_id, tags=items[start : start + BATCH_LIMIT])


def numeric_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among a result dict (MLflow stores only those; NaN marks nothing useful)."""
    metrics = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            metrics[key] = float(value)
    return metrics


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int
) -> None:
    batch = [Metric(key, value, timestamp_ms, step) for key, value in metrics.items()]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start : start + 1000])


@contextlib.contextmanager
def command_run(
    kind: str,
    experiment: str,
    tracking_uri: str | None,
    *,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[tuple[MlflowClient, str]]:
    """A run for a single command (train-teacher, distill, suggest-beta, probe), ended FAILED on error."""
    client = client_for(tracking_uri)
    all_tags = {**standard_tags(kind), **(tags or {})}
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=all_tags)
    try:
        yield client, run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


_RAY_BOOKKEEPING = frozenset(
    {
        "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "time_since_restore",
        "iterations_since_restore", "timesteps_total", "episodes_total", "timesteps_since_restore",
        "pid", "done", "node_ip", "hostname", "date", "experiment_id", "trial_id",
    }
)  # fmt: skip


# Logged first: MLflow's compare view preselects a run's first metric for its parallel-coordinates plot.
LEADING_METRICS = ("test_acc", "val_acc", "test_ap", "val_ap")


def result_time_ms(result: Mapping[str, Any]) -> int:
    """When a trial reported `result` (Ray's `timestamp`, seconds), in ms; now when it carries none."""
    return int(1000 * float(result.get("timestamp", 0) or 0)) or now_ms()


def trial_end_ms(last_result: Mapping[str, Any], start_ms: int) -> int:
    """A trial run's end: its last result's time, never before its start (Ray's timestamp is whole
    seconds, so a trial shorter than a second would otherwise show a negative duration)."""
    return max(result_time_ms(last_result), start_ms)


def epoch_metrics(result: Mapping[str, Any]) -> tuple[int, dict[str, float], int]:
    """A trial's result as MLflow takes it: (step = epoch, its finite metrics, timestamp in ms)."""
    step = int(result.get("epoch", result.get("training_iteration", 0)))
    timestamp_ms = result_time_ms(result)
    metrics = numeric_metrics({k: v for k, v in result.items() if k not in _RAY_BOOKKEEPING})
    leading = {key: metrics[key] for key in LEADING_METRICS if key in metrics}
    return step, {**leading, **metrics}, timestamp_ms


def logged_epochs_match(client: MlflowClient, run_id: str, history: list[Mapping[str, Any]]) -> bool:
    """Whether the run's test_acc points are, epoch for epoch, those of the trial's history in Ray."""
    logged = {point.step: point.value for point in client.get_metric_history(run_id, "test_acc")}
    expected = {}
    for result in history:
        step, metrics, _ = epoch_metrics(result)
        if "test_acc" in metrics:
            expected[step] = metrics["test_acc"]
    return logged.keys() == expected.keys() and all(
        math.isclose(logged[step], expected[step], rel_tol=1e-9, abs_tol=1e-12) for step in expected
    )


def rebuild_trial_run(client: MlflowClient, run: Run, history: list[Mapping[str, Any]]) -> str:
    """A fresh run for a trial whose logged epochs are not Ray's: same tags and params, Ray's history.

    After the driver is killed, MLflow may hold epochs the resumed trial never reached again (Ray
    restarted it from an older checkpoint and ASHA stopped it sooner) or replayed with other values
    (GPU kernels are not bit-reproducible). MLflow cannot delete metric points, so the run is
    rebuilt from Ray's result history, and the old one goes to the trash tagged "superseded".
    The new run is left open: the caller ends it with the trial's status and stop epoch.
    """
    new_run = client.create_run(
        run.info.experiment_id, start_time=run.info.start_time, tags=dict(run.data.tags)
    )
    new_run_id = new_run.info.run_id
    log_params(client, new_run_id, run.data.params)
    for result in history:
        step, metrics, timestamp_ms = epoch_metrics(result)
        log_metrics(client, new_run_id, metrics, step, timestamp_ms)
    set_tags(client, run.info.run_id, {TAG_STATUS: "superseded", "dkd_tune.superseded_by": new_run_id})
    if run.info.status == "RUNNING":
        client.set_terminated(run.info.run_id, status="KILLED")
    client.delete_run(run.info.run_id)
    return new_run_id


def trial_error_text(trial: Any) -> str:
    """The last line of a failed trial's error (Ray keeps the traceback in the trial's error file)."""
    with contextlib.suppress(Exception):
        error = trial.get_error()
        if error is not None:
            return _last_meaningful_line(str(error))
    with contextlib.suppress(Exception):
        if trial.error_file and Path(trial.error_file).exists():
            return _last_meaningful_line(Path(trial.error_file).read_text())
    return "error"


def _last_meaningful_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "error"


def now_ms() -> int:
    return int(time.time() * 1000)


def log_student_model(
    tracking_uri: str,
    run_id: str,
    model: Any,
    *,
    name: str,
    registered_name: str,
    input_example: Any,
    metadata: Mapping[str, Any],
) -> str:
    """`model` (a torch module) as an MLflow PyTorch model of run `run_id`, registered as `registered_name`;
    returns the model's URI. Its requirements are torch and dkd-tune (the classes it pickles), given, not
    inferred (inference loads the model in a subprocess)."""
    import mlflow
    import mlflow.pytorch
    import torch

    from dkd_tune import __version__

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    before = client.get_run(run_id).info
    with mlflow.start_run(run_id=run_id), _quiet_model_logging():
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            registered_model_name=registered_name,
            input_example=input_example,
            metadata=dict(metadata),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"dkd-tune=={__version__}"],
            await_registration_for=0,
        )
    if before.end_time:  # reopening the run ended it anew: its end stays the trial's own
        client.set_terminated(run_id, status=before.status, end_time=before.end_time)
    return info.model_uri


@contextlib.contextmanager
def _quiet_model_logging() -> Iterator[None]:
    """Silence what logging a model prints on its own: MLflow's registration lines (written straight to
    stderr) and torch.export's notes on the example's batch dimension. The search prints its own line."""
    import io
    import logging

    export_logger = logging.getLogger("torch._export")
    level = export_logger.level
    export_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        export_logger.setLevel(level)


def registered_model_name(search: str, teacher: str) -> str:
    """The Model Registry name of a search's best student for one teacher."""
    return tag_key(f"{search}-{teacher}-student").replace(" ", "_")
