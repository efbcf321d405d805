"""Starts the MLflow UI on the project's MLflow store, bound to 127.0.0.1 unless the user asks otherwise."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

from dkd_tune.core.errors import UserInputError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# One user looks at a local UI; every uvicorn worker is a full MLflow import (hundreds of MB),
# and one worker already serves the UI's parallel requests from its thread pool.
UI_WORKERS = 1
# MLflow's server also starts a job runner and seven task-queue processes (about 1 GB) for its
# GenAI evaluation jobs, which comparing trials never uses; a user who wants them sets it to true.
JOB_EXECUTION_VARIABLE = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
# MLflow 3's UI shows GenAI traces unless told the "Model training" view, which lists runs.
WORKFLOW_PARAMETER = "workflowType=machine_learning"
SEARCHES_LISTED = 3  # per experiment, the latest searches get a link to their own view


def resolve_store_uri(tracking_uri: str | None = None) -> str:
    """The store to show: `tracking_uri` if given, else MLFLOW_TRACKING_URI, else MLflow's default.

    MLflow's default is `sqlite:///mlflow.db` in the working directory (or an existing `./mlruns`
    file store), made absolute, which is where a search run from the same directory logs.
    """
    if tracking_uri:
        uri, source = tracking_uri, "--tracking-uri"
    else:
        from dkd_tune.tracking.connect import resolve_tracking_uri

        uri, source = resolve_tracking_uri(None), "MLFLOW_TRACKING_URI"
    if urlsplit(uri).scheme in ("http", "https"):
        raise UserInputError(
            f"{source} {uri} is an MLflow tracking server, which has its own UI: open {uri} in a browser"
        )
    return uri


def ui_command(store_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """The argument list (no shell) that runs `mlflow server` on `store_uri` at host:port."""
    # A value such as "--dev" would be read by MLflow's parser as an option, not as the value.
    if not host or host.startswith("-"):
        raise UserInputError(f"--host {host!r} is not a host name or address (e.g. 127.0.0.1)")
    if not store_uri or store_uri.startswith("-"):
        raise UserInputError(f"tracking URI {store_uri!r} is not a store URI (e.g. sqlite:///mlflow.db)")
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(UI_WORKERS),
    ]


def _experiments(store_uri: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(name, id, [(search name, view key)] of its latest searches) of the store's experiments (not
    MLflow's "Default"); none when it cannot be read.

    A SQLite store that does not exist yet is not created here: the server makes it.
    """
    if store_uri.startswith("sqlite:///") and not os.path.exists(store_uri.removeprefix("sqlite:///")):
        return []
    try:
        from dkd_tune.tracking.connect import open_store
        from dkd_tune.tracking.runs_view import TAG_VIEW

        store = open_store(store_uri)
        listed = []
        for experiment in store.experiments(limit=20):
            if experiment.name == "Default":
                continue
            searches = store.find_runs(
                [experiment.experiment_id], with_tag=TAG_VIEW, newest_first=True, limit=SEARCHES_LISTED
            )
            views = [(run.name, run.tags[TAG_VIEW]) for run in searches]
            listed.append((experiment.name, experiment.experiment_id, views))
    except Exception:  # the UI still starts; the links are a convenience
        return []
    return listed


def ui_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` for the server, with MLflow's server jobs off unless the user set the variable."""
    return {JOB_EXECUTION_VARIABLE: "false", **environ}


def experiment_url(base: str, experiment_id: str) -> str:
    """Where an experiment's runs are, in MLflow 3's "Model training" view (its UI opens on GenAI traces)."""
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW_PARAMETER}"


def search_view_url(base: str, experiment_id: str, key: str) -> str:
    """A search's trials with the searched parameters and its metric as columns, best first."""
    from dkd_tune.tracking.runs_view import view_url

    return f"{view_url(base, experiment_id, key)}&{WORKFLOW_PARAMETER}"


def run_ui(tracking_uri: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Replace this process with the MLflow server for the resolved store (never returns)."""
    store_uri = resolve_store_uri(tracking_uri)
    command = ui_command(store_uri, host, port)
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{port}"
    print(f"MLflow UI for {store_uri} at {base} (Ctrl-C stops it)", flush=True)
    for name, identifier, views in _experiments(store_uri):
        print(f"  {name}: {experiment_url(base, identifier)}", flush=True)
        for search, key in views:
            print(
                f"    search {search}, its trials best first: {search_view_url(base, identifier, key)}",
                flush=True,
            )
    sys.stderr.flush()
    # exec, not a child process: the terminal's Ctrl-C reaches the server directly, and no idle
    # dkd-tune process is left between the user and it.
    os.execve(command[0], command, ui_environment(os.environ))
