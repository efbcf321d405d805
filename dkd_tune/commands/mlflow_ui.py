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


def resolve_store_uri(tracking_uri: str | None = None) -> str:
    """The store to show: `tracking_uri` if given, else MLFLOW_TRACKING_URI, else MLflow's default.

    MLflow's default is `sqlite:///mlflow.db` in the working directory (or an existing `./mlruns`
    file store), made absolute, which is where a search run from the same directory logs.
    """
    if tracking_uri:
        uri, source = tracking_uri, "--tracking-uri"
    else:
        import mlflow

        uri, source = mlflow.get_tracking_uri(), "MLFLOW_TRACKING_URI"
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


def ui_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` for the server, with MLflow's server jobs off unless the user set the variable."""
    return {JOB_EXECUTION_VARIABLE: "false", **environ}


def run_ui(tracking_uri: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Replace this process with the MLflow server for the resolved store (never returns)."""
    store_uri = resolve_store_uri(tracking_uri)
    command = ui_command(store_uri, host, port)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"MLflow UI for {store_uri} at http://{shown_host}:{port} (Ctrl-C stops it)", flush=True)
    sys.stderr.flush()
    # exec, not a child process: the terminal's Ctrl-C reaches the server directly, and no idle
    # dkd-tune process is left between the user and it.
    os.execve(command[0], command, ui_environment(os.environ))
