"""The tracking interface every caller uses: run records, metric points and the store's operations.

The rest of dkd-tune never sees a tracking library's client or its run objects: it opens a store
with `connect.open_store(uri)` and works on `RunRecord`s. MLflow (`mlflow_store.MlflowStore`) is the one
implementation; a second backend is a class with these methods and a branch in `connect.open_store`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# A run's lifecycle, in MLflow's words (other stores map theirs onto these).
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"


def tag_key(key: str) -> str:
    """`key` as a tag name every store takes: characters other than letters, digits, `_-. :/` become `_`
    (a teacher named `resnet20-target+2` is tagged `teacher_gap.resnet20-target_2`)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


@dataclass(frozen=True)
class RunRecord:
    """One run as the store holds it: where it is, its state, and its latest params, metrics and tags."""

    run_id: str
    experiment_id: str
    name: str | None
    status: str
    start_time: int | None  # ms since the epoch
    end_time: int | None
    deleted: bool = False
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float
    timestamp_ms: int


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    name: str


class TrackingStore(Protocol):
    """What dkd-tune asks of a tracking store. Params and tags may be nested mappings (flattened to
    `a.b.c` keys); tag names are made acceptable with `tag_key`."""

    uri: str

    # Experiments
    def experiment(self, name: str) -> str:
        """The id of experiment `name`, created (or restored from the trash) if needed."""

    def experiment_name(self, experiment_id: str) -> str: ...

    def experiments(self, limit: int | None = None) -> list[Experiment]: ...

    # Runs
    def start_run(
        self,
        experiment_id: str,
        *,
        name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        start_time: int | None = None,
    ) -> str:
        """A new RUNNING run; returns its id."""

    def run(self, run_id: str) -> RunRecord | None:
        """The run, or None when the store has no run of that id."""

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
        """The live runs whose tags equal `tags`, that carry tag `with_tag`, named `name`, in `status`;
        oldest first unless `newest_first`."""

    def reopen(self, run_id: str) -> None: ...

    def end_run(self, run_id: str, status: str, end_time: int | None = None) -> None: ...

    def delete_run(self, run_id: str) -> None:
        """Move the run to the trash (still readable by id, no longer found)."""

    # What a run holds
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set the tags whose value is not None."""

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int
    ) -> None: ...

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]: ...

    def log_artifact(self, run_id: str, path: Path | str, folder: str | None = None) -> None: ...

    def log_artifacts(self, run_id: str, directory: Path | str, folder: str | None = None) -> None: ...

    def log_text(self, run_id: str, text: str, file_name: str) -> None: ...

    def download_artifact(self, run_id: str, path: str, destination: Path | str) -> Path: ...

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
        """A torch module as a registered model of the run; returns the model's URI."""

    def save_search_view(
        self,
        experiment_id: str,
        search_run_id: str,
        parameters: Sequence[str],
        metric: str,
        mode: str,
        also_metrics: Sequence[str] = (),
    ) -> str:
        """A saved view of a search's trials (its parameters and metrics as columns, best first); its key."""

    # Reachability
    def unreachable(self, error: BaseException) -> bool:
        """Whether `error` says the store is away (retry later), not that the call was wrong."""

    def check_reachable(self) -> None:
        """One line, exit code 2, when the store does not answer."""
