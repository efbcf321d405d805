"""A search rebuilt from its MLflow parent run: the same per-trial DataFrame as `load_search_results`, and the per-epoch histories.

For when the search folder is gone or on another machine but the tracking store is reachable.
The parent run is found by its id or by its name (the search's name). Each child run is one
trial: its params hold the resolved recipe and the sampled hyperparameters, its tags the trial
id, part, status and stop epoch, its metrics the per-epoch history. What MLflow does not hold
is filled as documented in docs/analysis.md: `wall_time_s` is the child run's duration (it includes
any interruption), `num_failures` 0, `checkpoint_path` empty, and the teacher gap carries the
4 decimals the search logged.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import pandas as pd

from analysis.results import RECIPE_COLUMNS, empty_results, typed_results
from dkd_tune.core.errors import UserInputError
from dkd_tune.tracking import runs
from dkd_tune.tracking.connect import open_store, resolve_tracking_uri
from dkd_tune.tracking.store import RunRecord, tag_key

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MAX_CHILD_RUNS = 50000


@dataclass(frozen=True)
class ParentRun:
    """A search's MLflow parent run: where it is and what it is called."""

    tracking_uri: str
    run_id: str
    experiment_id: str
    name: str
    tags: dict[str, str]
    params: dict[str, str]


def find_parent_run(tracking_uri: str | None, name_or_run_id: str) -> ParentRun:
    """The search run with this run id, or the only search run of this name in the store."""
    uri = resolve_tracking_uri(tracking_uri)
    store = open_store(uri)
    run = store.run(name_or_run_id) if RUN_ID_PATTERN.match(name_or_run_id) else None
    if run is None:
        experiments = [experiment.experiment_id for experiment in store.experiments()]
        found = store.find_runs(experiments, tags={runs.TAG_KIND: "search"}, name=name_or_run_id, limit=100)
        if not found:
            raise UserInputError(
                f"{name_or_run_id!r}: no search folder of that name and no search run of that name or id "
                f"in MLflow store {uri}; pass the search's folder, its run id, or --tracking-uri"
            )
        if len(found) > 1:
            ids = ", ".join(f"{r.run_id} (experiment {r.experiment_id})" for r in found[:5])
            raise UserInputError(
                f"{name_or_run_id!r}: {len(found)} search runs of that name in {uri}: {ids}; pass a run id"
            )
        run = found[0]
    if run.tags.get(runs.TAG_KIND) != "search":
        raise UserInputError(
            f"run {run.run_id} in {uri} is a {run.tags.get(runs.TAG_KIND, 'non-dkd-tune')!r} run, "
            "not a search's parent run"
        )
    return ParentRun(
        tracking_uri=uri,
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        name=run.name or run.tags.get(runs.TAG_SEARCH, run.run_id),
        tags=dict(run.tags),
        params=dict(run.params),
    )


def trial_runs(parent: ParentRun) -> list[RunRecord]:
    """The parent's child runs that are trials, oldest first."""
    return open_store(parent.tracking_uri).find_runs(
        [parent.experiment_id],
        tags={runs.TAG_PARENT: parent.run_id, runs.TAG_KIND: "trial"},
        limit=MAX_CHILD_RUNS,
    )


def load_mlflow_results(tracking_uri: str | None, name_or_run_id: str) -> pd.DataFrame:
    """One row per trial of the search whose parent run is `name_or_run_id` (schema: RESULT_COLUMNS)."""
    parent = find_parent_run(tracking_uri, name_or_run_id)
    searched = _searched_names(parent)
    rows = [_trial_row(parent, run, searched) for run in trial_runs(parent)]
    if not rows:
        return empty_results()
    return typed_results(pd.DataFrame(rows))


def load_mlflow_histories(
    tracking_uri: str | None, name_or_run_id: str, metrics: tuple[str, ...] | None = None
) -> pd.DataFrame:
    """Long format, one row per (trial, epoch): every metric (or `metrics`) from the runs' metric histories."""
    parent = find_parent_run(tracking_uri, name_or_run_id)
    store = open_store(parent.tracking_uri)
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run in trial_runs(parent):
        part = run.tags.get(runs.TAG_TEACHER, "")
        trial_id = run.tags.get(runs.TAG_TRIAL_ID, run.run_id)
        keys = sorted(run.metrics) if metrics is None else [k for k in metrics if k in run.metrics]
        for key in keys:
            for point in store.metric_history(run.run_id, key):
                row = rows.setdefault(
                    (part, trial_id, point.step), {"part": part, "trial_id": trial_id, "epoch": point.step}
                )
                row[key] = point.value
    frame = pd.DataFrame(list(rows.values()))
    if frame.empty:
        return pd.DataFrame(columns=["part", "trial_id", "epoch"])
    return frame.sort_values(["part", "trial_id", "epoch"]).reset_index(drop=True)


def _trial_row(parent: ParentRun, run: RunRecord, searched: dict[str, list[str]]) -> dict[str, Any]:
    params, tags, metrics = run.params, run.tags, run.metrics
    part = tags.get(runs.TAG_TEACHER, params.get("teacher", ""))
    teacher = params.get("teacher", "none")
    gap = parent.tags.get(tag_key(f"teacher_gap.{teacher}"), params.get("teacher_gap"))
    duration = (run.end_time - run.start_time) / 1000 if run.end_time and run.start_time else None
    config = {name: _param_value(params[name]) for name in searched.get(part, []) if name in params}
    stop_epoch = tags.get(runs.TAG_STOP_EPOCH)
    return {
        "search": tags.get(runs.TAG_SEARCH, parent.name),
        "part": part,
        "teacher": teacher,
        "teacher_model": params.get("teacher_model", "none"),
        "teacher_gap": gap if teacher != "none" else None,
        "predicted_beta": parent.tags.get(tag_key(f"predicted_beta.{teacher}")),
        "dataset": params.get("dataset", parent.tags.get("dataset")),
        "dataset_family": parent.tags.get("dataset_family"),
        "student": params.get("student", parent.tags.get("student")),
        "loss": params.get("loss"),
        "trial_id": tags.get(runs.TAG_TRIAL_ID, run.run_id),
        "status": tags.get(runs.TAG_STATUS, "running"),
        "stop_epoch": stop_epoch if stop_epoch is not None else metrics.get("epoch", 0),
        "max_epochs": params.get("max_epochs"),
        **{name: params.get(name) for name in RECIPE_COLUMNS},
        "final_test_acc": metrics.get("test_acc"),
        "best_test_acc": metrics.get("best_test_acc"),
        "final_test_acc_top5": metrics.get("test_acc_top5"),
        "final_val_acc": metrics.get("val_acc"),
        "final_val_loss": metrics.get("val_loss"),
        "final_train_acc": metrics.get("train_acc"),
        "final_train_loss": metrics.get("train_loss"),
        "wall_time_s": duration,
        "num_failures": 0,
        "error": tags.get(runs.TAG_ERROR),
        "checkpoint_path": None,
        "config_json": json.dumps(config, sort_keys=True, default=str),
    }


def _searched_names(parent: ParentRun) -> dict[str, list[str]]:
    """part -> the hyperparameters the search sampled there, read from the search.yaml the parent logged."""
    from dkd_tune.config.loading import read_yaml_mapping
    from dkd_tune.config.plan import search_parts
    from dkd_tune.config.schema import SearchSpaceFile

    store = open_store(parent.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dkd-analysis-") as folder:
        try:
            path = store.download_artifact(parent.run_id, "search.yaml", folder)
        except Exception as error:  # the artifact store may be unreachable or pruned
            raise UserInputError(
                f"run {parent.run_id}: cannot download its search.yaml artifact ({_first_line(error)})"
            ) from None
        space = SearchSpaceFile.model_validate(read_yaml_mapping(path))
    names = {}
    for part, teacher in search_parts(space):
        distributions = space.space_for(teacher) if teacher is not None else {}
        names[part] = sorted(name for name, d in distributions.items() if d.kind != "fixed")
    return names


def _param_value(text: str) -> Any:
    """An MLflow param (always a string) back to the number or word it was."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
