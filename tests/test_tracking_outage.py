"""A team MLflow server that goes away in the middle of a search, on a real `mlflow server` on 127.0.0.1.

Stopped for 30 s and started again: the search goes on, and at its end no epoch is missing in
MLflow. Stopped for good: the search still finishes (exit 0), says so in one line, and
`dkd-tune sync` fills MLflow once the server is back. The trials are dkd-tune's own training with
a pause after each epoch (`fault_trainables.faulty_trial`), so the search outlasts the outage.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import start_ui
from tests.test_search_e2e import cli
from tests.test_search_faults import check_records_agree, finish, result_lines, space_file, start_search

pytestmark = pytest.mark.slow
OUTAGE_S = 30


def outage_search(tmp_path, url: str, seeds: list[int], epochs: int):
    # Seeds 1-3 are the fault injector's: these trials train cleanly.
    return space_file(
        tmp_path,
        "outage",
        overrides={"epochs": epochs, "lr_milestones": [epochs - 1], "warmup_epochs": 0, "batch_size": 32},
        space={"seed": {"grid": seeds}},
        search={"algorithm": "grid", "num_samples": 1, "max_concurrent_trials": 2},
        tracking_uri=url,
    )


def wait_for_first_epochs(part_dir, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(path.stat().st_size for path in part_dir.glob("*/result.json")):
            return
        time.sleep(0.2)
    raise AssertionError("no trial reported an epoch")


def test_a_server_away_for_30_s_misses_no_epoch(tmp_path):
    server = start_ui(tmp_path)
    space = outage_search(tmp_path, server.url, seeds=[0, 4, 5, 6, 7, 8], epochs=6)
    search = start_search(tmp_path, space, "fault_trainables:faulty_trial", DKD_TEST_EPOCH_SECONDS="2.5")
    experiment = tmp_path / "runs" / "outage"
    try:
        wait_for_first_epochs(experiment / "ce")
        server.stop()
        time.sleep(OUTAGE_S)
        reported_during_outage = sum(
            len(result_lines(d)) for d in (experiment / "ce").glob("*/") if (d / "result.json").exists()
        )
        server = start_ui(tmp_path, port=server.port)  # the same address and store
        output = finish(search)
    finally:
        server.stop()
    assert "unreachable" in output and "reachable again" in output, output[-3000:]
    assert search.poll() == 0
    assert reported_during_outage >= 3  # the trials went on while the server was away
    state = json.loads((experiment / "state.json").read_text())
    assert state["tracking"] == "synced"
    check_records_agree(tmp_path, experiment, "ce", expected_trials=6)


def test_a_server_gone_for_good_then_dkd_tune_sync_fills_mlflow(tmp_path):
    server = start_ui(tmp_path)
    space = outage_search(tmp_path, server.url, seeds=[0, 4, 5, 6], epochs=4)
    search = start_search(tmp_path, space, "fault_trainables:faulty_trial", DKD_TEST_EPOCH_SECONDS="1")
    experiment = tmp_path / "runs" / "outage"
    wait_for_first_epochs(experiment / "ce")
    server.stop()
    output = finish(search)  # exit 0: the results are complete without MLflow
    sync_lines = [line for line in output.splitlines() if "dkd-tune sync" in line]
    assert len(sync_lines) == 1 and sync_lines[0].endswith(f"run dkd-tune sync {experiment}"), output[-3000:]
    assert json.loads((experiment / "state.json").read_text())["tracking"] == "pending"
    assert (experiment / "results.parquet").is_file()

    server = start_ui(tmp_path, port=server.port)
    try:
        result = cli("sync", str(experiment), cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        again = cli("sync", str(experiment), cwd=tmp_path)  # idempotent: nothing logged twice
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    finally:
        server.stop()
    assert json.loads((experiment / "state.json").read_text())["tracking"] == "synced"
    check_records_agree(tmp_path, experiment, "ce", expected_trials=4)
