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
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from analysis.status import trial_status
from dkd_tune import __version__
from dkd_tune.errors import UserInputError

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
    from mlflow.exceptions import MlflowException

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


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if needed (artifacts beside a SQLite store, not in the cwd)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(
        name, artifact_location=default_artifact_location(client.tracking_uri, name)
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


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(key, str(value)) for key, value in tags.items() if value is not None]
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


class MLflowTrialLogger(Callback):
    """Ray Tune callback: a child run per trial under the search's parent run, every epoch's metrics."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        parent_run_id: str,
        *,
        teacher_label: str,
        max_epochs: int,
        fixed_params: Mapping[str, Any],
        extra_tags: Mapping[str, Any] | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.parent_run_id = parent_run_id
        self.teacher_label = teacher_label
        self.max_epochs = max_epochs
        self.fixed_params = dict(fixed_params)
        self.extra_tags = dict(extra_tags or {})
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._run_ids: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._pending: list[tuple[str, Any, Any]] = []
        self._unreachable_since: float | None = None
        self._last_attempt = 0.0

    # Ray pickles callbacks with the experiment state: keep the client out of it.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(
            _client=None,
            _experiment_id=None,
            _run_ids={},
            _last_step={},
            _pending=[],
            _unreachable_since=None,
        )
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            self._experiment_id = experiment_id(self._client, self.experiment_name)
        return self._client

    def run_for(self, trial: Any) -> str:
        """The child run of `trial`, created on first sight or found again after a resume."""
        trial_id = str(trial.trial_id)
        if trial_id in self._run_ids:
            return self._run_ids[trial_id]
        client = self.client
        found = client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{TAG_TRIAL_ID}` = '{trial_id}' and tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            history = client.get_metric_history(run_id, "epoch")
            self._last_step[run_id] = max((point.step for point in history), default=0)
            if found[0].info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        else:
            tags = {
                **standard_tags("trial"),
                **self.extra_tags,
                TAG_PARENT: self.parent_run_id,
                TAG_TRIAL_ID: trial_id,
                TAG_TEACHER: self.teacher_label,
                TAG_STATUS: "running",
            }
            run = client.create_run(
                self._experiment_id, run_name=f"{self.teacher_label}-{trial_id}", tags=tags
            )
            run_id = run.info.run_id
            log_params(client, run_id, {**self.fixed_params, **dict(trial.config)})
            self._last_step[run_id] = 0
        self._run_ids[trial_id] = run_id
        return run_id

    # Tune's events are queued and delivered in order. While the store cannot be reached (a server
    # restarting, a network blip) they wait in the queue, one delivery attempt per RETRY_INTERVAL_S
    # rather than one per epoch, so the search goes on at full speed and nothing is dropped.
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._deliver(("start", trial, None))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._deliver(("result", trial, dict(result)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._deliver(("finish", trial, False))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._deliver(("finish", trial, True))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._flush()  # a last attempt; what still waits is filled from Ray's history by the search's sync

    @property
    def pending_events(self) -> int:
        return len(self._pending)

    def _deliver(self, event: tuple[str, Any, Any]) -> None:
        self._pending.append(event)
        waiting = self._unreachable_since is not None
        if waiting and time.monotonic() - self._last_attempt < RETRY_INTERVAL_S:
            return
        self._flush()

    def _flush(self) -> None:
        self._last_attempt = time.monotonic()
        while self._pending:
            kind, trial, payload = self._pending[0]
            try:
                if kind == "start":
                    self.run_for(trial)
                elif kind == "result":
                    self.log_result(trial, payload)
                else:
                    self.finish(trial, errored=payload)
            except Exception as error:
                if not store_unreachable(error):
                    raise
                if self._unreachable_since is None:
                    self._unreachable_since = time.monotonic()
                    print(
                        f"dkd-tune: warning: MLflow store {self.tracking_uri} unreachable "
                        f"({type(error).__name__}); the search goes on, and its runs are filled in when it is back"
                    )
                return
            self._pending.pop(0)
        if self._unreachable_since is not None:
            away = time.monotonic() - self._unreachable_since
            print(
                f"dkd-tune: MLflow store {self.tracking_uri} reachable again after {away:.0f} s; runs caught up"
            )
            self._unreachable_since = None

    def log_result(self, trial: Any, result: Mapping[str, Any]) -> None:
        run_id = self.run_for(trial)
        step, metrics, timestamp_ms = epoch_metrics(result)
        if step <= self._last_step.get(run_id, 0):
            return  # already logged before an interruption: a resumed trial replays from its checkpoint
        log_metrics(self.client, run_id, metrics, step, timestamp_ms)
        self._last_step[run_id] = step

    def finish(self, trial: Any, *, errored: bool) -> None:
        run_id = self.run_for(trial)
        error_text = trial_error_text(trial) if errored else ""
        status = trial_status(trial.last_result, self.max_epochs, errored=errored, error_text=error_text)
        tags = {TAG_STATUS: status, TAG_STOP_EPOCH: int((trial.last_result or {}).get("epoch", 0) or 0)}
        if error_text:
            tags["dkd_tune.error"] = error_text[-4000:]
        set_tags(self.client, run_id, tags)
        self.client.set_terminated(run_id, status="FAILED" if errored else "FINISHED")


_RAY_BOOKKEEPING = frozenset(
    {
        "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "time_since_restore",
        "iterations_since_restore", "timesteps_total", "episodes_total", "timesteps_since_restore",
        "pid", "done", "node_ip", "hostname", "date", "experiment_id", "trial_id",
    }
)  # fmt: skip


def epoch_metrics(result: Mapping[str, Any]) -> tuple[int, dict[str, float], int]:
    """A trial's result as MLflow takes it: (step = epoch, its finite metrics, timestamp in ms)."""
    step = int(result.get("epoch", result.get("training_iteration", 0)))
    timestamp_ms = int(1000 * float(result.get("timestamp", 0) or 0)) or now_ms()
    metrics = numeric_metrics({k: v for k, v in result.items() if k not in _RAY_BOOKKEEPING})
    return step, metrics, timestamp_ms


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


def rebuild_trial_run(client: MlflowClient, run: Any, history: list[Mapping[str, Any]]) -> str:
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
