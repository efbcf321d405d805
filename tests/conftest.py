"""Shared fixtures: one torch thread; a real MLflow UI started through `dkd-tune ui` on a free port, stopped on teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The server imports MLflow, creates the database and starts uvicorn: seconds on an idle
# machine, much longer on a shared one.
UI_START_TIMEOUT_S = 300


@pytest.fixture
def single_torch_thread():
    """Run a test with one torch thread, restoring the count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class RunningUI:
    """A `dkd-tune ui` process, its address, its store and its log."""

    process: subprocess.Popen
    url: str
    port: int
    store_uri: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        """Terminate the server (MLflow passes SIGTERM on to uvicorn); kill what is left of its group."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        # Started in its own session, so its process group holds only the server's processes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ui(directory: Path, port: int | None = None) -> RunningUI:
    """Start `dkd-tune ui` on the SQLite store in `directory` (new or not) and wait until it answers HTTP 200."""
    port = port or free_port()
    store_uri = f"sqlite:///{directory / 'mlflow.db'}"
    log_path = directory / "ui.log"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dkd_tune", "ui", "--tracking-uri", store_uri, "--port", str(port)],
            cwd=directory,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ui = RunningUI(process, f"http://127.0.0.1:{port}", port, store_uri, log_path)
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            ui.stop()
            pytest.fail(f"dkd-tune ui exited with {process.returncode}:\n{ui.log_tail()}")
        try:
            with urllib.request.urlopen(ui.url + "/", timeout=10) as response:
                if response.status == 200:
                    return ui
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    ui.stop()
    pytest.fail(f"dkd-tune ui did not answer within {UI_START_TIMEOUT_S} s:\n{ui.log_tail()}")


@pytest.fixture
def mlflow_ui(tmp_path: Path) -> Iterator[RunningUI]:
    """A running `dkd-tune ui` on an empty SQLite store in tmp_path; stopped after the test."""
    ui = start_ui(tmp_path)
    try:
        yield ui
    finally:
        ui.stop()
