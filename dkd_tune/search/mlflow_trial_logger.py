"""The Ray Tune callback that logs every trial as a child run of its search in the tracking store, epoch by epoch."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from dkd_tune.tracking.connect import open_store
from dkd_tune.tracking.runs import (
    RETRY_INTERVAL_S,
    TAG_ERROR,
    TAG_PARENT,
    TAG_STATUS,
    TAG_STOP_EPOCH,
    TAG_TEACHER,
    TAG_TRIAL_ID,
    epoch_metrics,
    now_ms,
    standard_tags,
    trial_end_ms,
    trial_error_text,
)
from dkd_tune.tracking.status import trial_status
from dkd_tune.tracking.store import FAILED, FINISHED, RUNNING, TrackingStore


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
        self._store: TrackingStore | None = None
        self._experiment_id: str | None = None
        self._run_ids: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._pending: list[tuple[str, Any, Any]] = []
        self._unreachable_since: float | None = None
        self._last_attempt = 0.0

    # Ray pickles callbacks with the experiment state: keep the store's connection out of it.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(
            _store=None,
            _experiment_id=None,
            _run_ids={},
            _last_step={},
            _pending=[],
            _unreachable_since=None,
        )
        return state

    @property
    def store(self) -> TrackingStore:
        if self._store is None:  # opening contacts nothing: the first call does
            self._store = open_store(self.tracking_uri, short_retries=True)
        return self._store

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self.store.experiment(self.experiment_name)
        return self._experiment_id

    def run_for(self, trial: Any, start_ms: int | None = None) -> str:
        """The child run of `trial`, created on first sight (starting at `start_ms`, the trial's start,
        when known) or found again after a resume."""
        trial_id = str(trial.trial_id)
        if trial_id in self._run_ids:
            return self._run_ids[trial_id]
        store = self.store
        found = store.find_runs(
            [self.experiment_id], tags={TAG_TRIAL_ID: trial_id, TAG_PARENT: self.parent_run_id}, limit=1
        )
        if found:
            run_id = found[0].run_id
            history = store.metric_history(run_id, "epoch")
            self._last_step[run_id] = max((point.step for point in history), default=0)
            if found[0].status != RUNNING:
                store.reopen(run_id)
        else:
            tags = {
                **standard_tags("trial"),
                **self.extra_tags,
                TAG_PARENT: self.parent_run_id,
                TAG_TRIAL_ID: trial_id,
                TAG_TEACHER: self.teacher_label,
                TAG_STATUS: "running",
            }
            run_id = store.start_run(
                self.experiment_id, name=f"{self.teacher_label}-{trial_id}", tags=tags, start_time=start_ms
            )
            store.log_params(run_id, {**self.fixed_params, **dict(trial.config)})
            self._last_step[run_id] = 0
        self._run_ids[trial_id] = run_id
        return run_id

    # Tune's events are queued and delivered in order. While the store cannot be reached (a server
    # restarting, a network blip) they wait in the queue, one delivery attempt per RETRY_INTERVAL_S
    # rather than one per epoch, so the search goes on at full speed and nothing is dropped.
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._deliver(("start", trial, now_ms()))  # when it started, whenever the run gets created

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
                    self.run_for(trial, start_ms=payload)
                elif kind == "result":
                    self.log_result(trial, payload)
                else:
                    self.finish(trial, errored=payload)
            except Exception as error:
                if not self.store.unreachable(error):
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
        self.store.log_metrics(run_id, metrics, step, timestamp_ms)
        self._last_step[run_id] = step

    def finish(self, trial: Any, *, errored: bool) -> None:
        run_id = self.run_for(trial)
        error_text = trial_error_text(trial) if errored else ""
        status = trial_status(trial.last_result, self.max_epochs, errored=errored, error_text=error_text)
        tags = {TAG_STATUS: status, TAG_STOP_EPOCH: int((trial.last_result or {}).get("epoch", 0) or 0)}
        if error_text:
            tags[TAG_ERROR] = error_text[-4000:]
        self.store.set_tags(run_id, tags)
        # The trial's own end (its last result's time), not the time this event is delivered: after an
        # outage, a resume or a slow store, MLflow's duration is still the trial's.
        run = self.store.run(run_id)
        self.store.end_run(
            run_id,
            FAILED if errored else FINISHED,
            end_time=trial_end_ms(trial.last_result or {}, run.start_time if run else None),
        )
