"""dkd-tune's runs on any tracking store: tag names, what a trial's result logs, and the runs built from them.

A search's parent run holds one child run per trial; single commands (train-teacher, distill,
suggest-beta, probe, validate-beta) get a run each. All logging of a search happens in the driver,
through a Ray Tune callback: trials never open the store. One writer means no "database is locked"
with MLflow's default SQLite store however many trials run at once, it works on clusters whose
workers cannot reach the store, and a trial that crashes cannot leave a half-written run behind.
The callback is idempotent: after `dkd-tune resume` it re-attaches to the runs it created (found
by their trial-id tag) and skips metric steps it already logged, so no run or metric point is
duplicated. When the search ends, a run whose logged epochs are not its trial's history in Ray
(the driver died between logging an epoch and Ray saving it) is rebuilt from that history: the
store and Ray always agree.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dkd_tune import __version__
from dkd_tune.tracking.connect import open_store
from dkd_tune.tracking.store import FAILED, FINISHED, KILLED, RUNNING, RunRecord, TrackingStore, tag_key

TAG_KIND = "dkd_tune.kind"  # search | trial | train-teacher | distill | suggest-beta | probe | validate-beta
TAG_SEARCH = "dkd_tune.search"
TAG_TRIAL_ID = "dkd_tune.trial_id"
TAG_TEACHER = "dkd_tune.teacher"
# running | completed | stopped | diverged | errored | oom; lost and superseded runs are deleted
TAG_STATUS = "dkd_tune.status"
TAG_STOP_EPOCH = "dkd_tune.stop_epoch"
TAG_ERROR = "dkd_tune.error"
TAG_PARENT = "mlflow.parentRunId"  # the name MLflow's UI nests runs by
RETRY_INTERVAL_S = 10.0  # while the store is unreachable: one delivery attempt per interval, not per epoch


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


def numeric_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among a result dict (stores keep only those; NaN marks nothing useful)."""
    metrics = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            metrics[key] = float(value)
    return metrics


def now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def command_run(
    kind: str,
    experiment: str,
    tracking_uri: str | None,
    *,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[tuple[TrackingStore, str]]:
    """A run for a single command (train-teacher, distill, suggest-beta, probe), ended FAILED on error."""
    store = open_store(tracking_uri)
    all_tags = {**standard_tags(kind), **(tags or {})}
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    run_id = store.start_run(store.experiment(experiment), name=run_name, tags=all_tags)
    try:
        yield store, run_id
    except BaseException:
        store.end_run(run_id, FAILED)
        raise
    store.end_run(run_id, FINISHED)


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


def trial_end_ms(last_result: Mapping[str, Any], start_ms: int | None) -> int:
    """A trial run's end: its last result's time, never before its start (Ray's timestamp is whole
    seconds, so a trial shorter than a second would otherwise show a negative duration)."""
    return max(result_time_ms(last_result), start_ms or 0)


def epoch_metrics(result: Mapping[str, Any]) -> tuple[int, dict[str, float], int]:
    """A trial's result as a store takes it: (step = epoch, its finite metrics, timestamp in ms)."""
    step = int(result.get("epoch", result.get("training_iteration", 0)))
    timestamp_ms = result_time_ms(result)
    metrics = numeric_metrics({k: v for k, v in result.items() if k not in _RAY_BOOKKEEPING})
    leading = {key: metrics[key] for key in LEADING_METRICS if key in metrics}
    return step, {**leading, **metrics}, timestamp_ms


def logged_epochs_match(store: TrackingStore, run_id: str, history: list[Mapping[str, Any]]) -> bool:
    """Whether the run's test_acc points are, epoch for epoch, those of the trial's history in Ray."""
    logged = {point.step: point.value for point in store.metric_history(run_id, "test_acc")}
    expected = {}
    for result in history:
        step, metrics, _ = epoch_metrics(result)
        if "test_acc" in metrics:
            expected[step] = metrics["test_acc"]
    return logged.keys() == expected.keys() and all(
        math.isclose(logged[step], expected[step], rel_tol=1e-9, abs_tol=1e-12) for step in expected
    )


def rebuild_trial_run(store: TrackingStore, run: RunRecord, history: list[Mapping[str, Any]]) -> str:
    """A fresh run for a trial whose logged epochs are not Ray's: same tags and params, Ray's history.

    After the driver is killed, the store may hold epochs the resumed trial never reached again (Ray
    restarted it from an older checkpoint and ASHA stopped it sooner) or replayed with other values
    (GPU kernels are not bit-reproducible). A store cannot delete metric points, so the run is
    rebuilt from Ray's result history, and the old one goes to the trash tagged "superseded".
    The new run is left open: the caller ends it with the trial's status and stop epoch.
    """
    new_run_id = store.start_run(run.experiment_id, start_time=run.start_time, tags=run.tags)
    store.log_params(new_run_id, run.params)
    for result in history:
        step, metrics, timestamp_ms = epoch_metrics(result)
        store.log_metrics(new_run_id, metrics, step, timestamp_ms)
    store.set_tags(run.run_id, {TAG_STATUS: "superseded", "dkd_tune.superseded_by": new_run_id})
    if run.status == RUNNING:
        store.end_run(run.run_id, KILLED)
    store.delete_run(run.run_id)
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


def registered_model_name(search: str, teacher: str) -> str:
    """The model registry's name of a search's best student for one teacher."""
    return tag_key(f"{search}-{teacher}-student").replace(" ", "_")
