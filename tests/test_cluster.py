"""A search on a multi-process Ray cluster on 127.0.0.1 (`ray start --head` plus a worker node) through `--address`."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.test_search_e2e import environment, tiny_space

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_environment() -> dict[str, str]:
    # Ray 2.60 clusters started with `ray start` authenticate with a token; every process of the
    # cluster and the driver use the same mode (and the token in ~/.ray/auth_token).
    return {**environment(), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def start_node(arguments: list[str], log: Path) -> subprocess.Popen:
    """`ray start --block ...` in its own process group, so the test can stop exactly this node."""
    return subprocess.Popen(
        [str(RAY), "start", "--block", "--num-cpus=1", "--disable-usage-stats", *arguments],
        env=cluster_environment(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_nodes(address: str, count: int, timeout: float = 180) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = subprocess.run(
            [sys.executable, "-c", probe, address],
            env=cluster_environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"the cluster at {address} did not reach {count} nodes")


@pytest.fixture
def local_cluster(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray's session folder holds Unix sockets, whose paths must stay short.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayc", dir="/tmp"))
    head = start_node(
        [
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
        ],
        tmp_path / "head.log",
    )
    nodes = [head]
    try:
        wait_for_nodes(address, 1)
        nodes.append(
            start_node([f"--address={address}", "--node-ip-address=127.0.0.1"], tmp_path / "worker.log")
        )
        wait_for_nodes(address, 2)
        yield address
    finally:
        for node in reversed(nodes):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(node.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    node.wait(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_search_runs_unchanged_on_a_two_node_cluster(local_cluster, tmp_path):
    space = tiny_space(
        tmp_path, search={"algorithm": "optuna", "seed": 0, "num_samples": 4, "max_concurrent_trials": 2}
    )
    result = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "run", str(space), "--address", local_cluster],
        cwd=tmp_path, env=cluster_environment(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "runs" / "e2e"
    frame = pd.read_parquet(experiment / "results.parquet")
    assert len(frame) == 5 and frame["status"].isin(["completed", "stopped"]).all()
    # Each node has one CPU and each trial asks for one: trials that overlap ran on different nodes.
    spans = []
    for path in (experiment / "teacher").glob("*/result.json"):
        results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        spans.append((results[0]["timestamp"] - results[0]["time_this_iter_s"], results[-1]["timestamp"]))
    spans.sort()
    assert any(later_start < earlier_end for (_, earlier_end), (later_start, _) in itertools.pairwise(spans))
