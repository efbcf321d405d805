"""MLflow as dkd-tune's tracking store: `MlflowStore` implements `store.TrackingStore` on an MlflowClient.

Only this module (and nothing outside `tracking/`) talks to MLflow. It owns what is MLflow's own:
batch limits, parameter lengths, which errors mean "server away", short HTTP retries for searches,
artifacts beside a SQLite store, the experiment tag that opens MLflow 3's model-training view, the
UI's saved views and the PyTorch model flavour.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dkd_tune.core.errors import UserInputError
from dkd_tune.tracking import runs_view
from dkd_tune.tracking.store import Experiment, MetricPoint, RunRecord, tag_key

MAX_PARAM_LENGTH = 6000
BATCH_LIMIT = 100  # MLflow accepts at most this many params or tags per log_batch call
METRIC_BATCH_LIMIT = 1000
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
# MLflow 3 tells model-training experiments from GenAI ones by this tag; its UI opens the former on
# their runs (where the UI's own "Model training" / "GenAI" switch does not decide instead).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's own default (sqlite:///mlflow.db in the working directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def store_unreachable(error: BaseException) -> bool:
    """Whether an MLflow call failed because the store is away (retry later), not because it was wrong."""
    import requests

    if isinstance(error, (requests.RequestException, OSError)):
        return True
    return isinstance(error, MlflowException) and error.error_code in UNREACHABLE_ERROR_CODES


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """For a SQLite store, `<store's folder>/mlruns/<experiment>`; otherwise the server's own default.

    MLflow would put a SQLite store's artifacts under ./mlruns of whichever directory the command
    ran in; keeping them beside the database keeps a search's store in one place.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (database.parent / "mlruns" / experiment_name).as_uri()


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


def _record(run: Run) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        name=run.info.run_name,
        status=run.info.status,
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        deleted=run.info.lifecycle_stage == "deleted",
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
    )


def _quoted(text: str) -> str:
    """`text` inside a quoted value of MLflow's filter language."""
    return text.replace("'", "\\'")


class MlflowStore:
    """`TrackingStore` on MLflow: a tracking server, a SQLite file or any store MlflowClient opens."""

    def __init__(self, uri: str, *, short_retries: bool = False):
        if short_retries:
            for name, value in SHORT_HTTP_RETRIES.items():
                os.environ.setdefault(name, value)
        self.uri = uri
        self._client = MlflowClient(tracking_uri=uri)

    # Experiments
    def experiment(self, name: str) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self._client.restore_experiment(experiment.experiment_id)
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                self._client.set_experiment_tag(
                    experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
                )
            return experiment.experiment_id
        return self._client.create_experiment(
            name,
            artifact_location=default_artifact_location(self.uri, name),
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
        )

    def experiment_name(self, experiment_id: str) -> str:
        return self._client.get_experiment(experiment_id).name

    def experiments(self, limit: int | None = None) -> list[Experiment]:
        found = (
            self._client.search_experiments(max_results=limit) if limit else self._client.search_experiments()
        )
        return [Experiment(e.experiment_id, e.name) for e in found]

    # Runs
    def start_run(
        self,
        experiment_id: str,
        *,
        name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        start_time: int | None = None,
    ) -> str:
        run = self._client.create_run(
            experiment_id, run_name=name, tags=dict(tags or {}), start_time=start_time
        )
        return run.info.run_id

    def run(self, run_id: str) -> RunRecord | None:
        try:
            return _record(self._client.get_run(run_id))
        except MlflowException as error:
            if store_unreachable(error):
                raise
            return None  # each MLflow store reports an unknown id in its own words

    def find_runs(
        self,
        experiment_ids: Sequence[str],
        *,
        tags: Mapping[str, str] | None = None,
        with_tag: str | None = None,
        name: str | None = None,
        status: str | None = None,
        newest_first: bool = False,
        limit: int = 50000,
    ) -> list[RunRecord]:
        if not experiment_ids:
            return []
        clauses = [f"tags.`{key}` = '{_quoted(str(value))}'" for key, value in (tags or {}).items()]
        if with_tag:
            clauses.append(f"tags.`{with_tag}` != ''")
        if name is not None:
            clauses.append(f"attributes.run_name = '{_quoted(name)}'")
        if status is not None:
            clauses.append(f"attributes.status = '{status}'")
        found = self._client.search_runs(
            list(experiment_ids),
            filter_string=" and ".join(clauses),
            order_by=[f"attributes.start_time {'DESC' if newest_first else 'ASC'}"],
            max_results=limit,
        )
        return [_record(run) for run in found]

    def reopen(self, run_id: str) -> None:
        self._client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str, end_time: int | None = None) -> None:
        self._client.set_terminated(run_id, status=status, end_time=end_time)

    def delete_run(self, run_id: str) -> None:
        self._client.delete_run(run_id)

    # What a run holds
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(key, value) for key, value in flatten(params).items()]
        for start in range(0, len(items), BATCH_LIMIT):
            self._client.log_batch(run_id, params=items[start : start + BATCH_LIMIT])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(tag_key(key), str(value)) for key, value in tags.items() if value is not None]
        for start in range(0, len(items), BATCH_LIMIT):
            self._client.log_batch(run_id, tags=items[start : start + BATCH_LIMIT])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        batch = [Metric(key, value, timestamp_ms, step) for key, value in metrics.items()]
        for start in range(0, len(batch), METRIC_BATCH_LIMIT):
            self._client.log_batch(run_id, metrics=batch[start : start + METRIC_BATCH_LIMIT])

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        return [
            MetricPoint(point.step, point.value, point.timestamp)
            for point in self._client.get_metric_history(run_id, key)
        ]

    def log_artifact(self, run_id: str, path: Path | str, folder: str | None = None) -> None:
        self._client.log_artifact(run_id, str(path), artifact_path=folder)

    def log_artifacts(self, run_id: str, directory: Path | str, folder: str | None = None) -> None:
        self._client.log_artifacts(run_id, str(directory), artifact_path=folder)

    def log_text(self, run_id: str, text: str, file_name: str) -> None:
        self._client.log_text(run_id, text, file_name)

    def download_artifact(self, run_id: str, path: str, destination: Path | str) -> Path:
        return Path(self._client.download_artifacts(run_id, path, str(destination)))

    def log_model(
        self,
        run_id: str,
        model: Any,
        *,
        name: str,
        registered_name: str,
        input_example: Any,
        metadata: Mapping[str, Any],
    ) -> str:
        """Logged with the PyTorch flavour, registered as `registered_name`. Its requirements are torch
        and dkd-tune (the classes it pickles), given, not inferred (inference loads the model in a
        subprocess)."""
        import mlflow.pytorch
        import torch

        from dkd_tune import __version__

        mlflow.set_tracking_uri(self.uri)
        before = self._client.get_run(run_id).info
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
            self._client.set_terminated(run_id, status=before.status, end_time=before.end_time)
        return info.model_uri

    def save_search_view(
        self,
        experiment_id: str,
        search_run_id: str,
        parameters: Sequence[str],
        metric: str,
        mode: str,
        also_metrics: Sequence[str] = (),
    ) -> str:
        """Stored as a shared view on the experiment (MLflow 3's runs page takes its columns from one),
        named on the search's run."""
        key = runs_view.view_key(search_run_id)
        state = runs_view.search_view_state(search_run_id, parameters, metric, mode, also_metrics)
        self._client.set_experiment_tag(
            experiment_id, runs_view.SHARED_VIEW_TAG_PREFIX + key, json.dumps(state)
        )
        self._client.set_tag(search_run_id, runs_view.TAG_VIEW, key)
        return key

    # Reachability
    def unreachable(self, error: BaseException) -> bool:
        return store_unreachable(error)

    def check_reachable(self) -> None:
        try:
            self._client.search_experiments(max_results=1)
        except Exception as error:
            if not store_unreachable(error):
                raise
            raise UserInputError(
                f"MLflow store {self.uri}: unreachable ({type(error).__name__}); start its server, "
                "or pass another --tracking-uri"
            ) from None


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
