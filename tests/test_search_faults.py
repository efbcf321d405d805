"""Searches under faults and load, on real Ray and MLflow: every trial accounted for, the same in all three records.

Trials come from `fault_trainables.py` through `search_with_trainable.py`: dkd-tune's training with
an exception, an out-of-memory error or a one-off failure injected, a learning rate that makes the
loss diverge, a worker process killed mid-trial, and a fast stand-in trial for a 64-trial load.
For each search, the trials in Ray's own results, the rows of results.parquet and the MLflow child
runs are the same trials with the same statuses, every reported epoch is in MLflow exactly once,
no run is left RUNNING, and while it runs every socket of the search's processes is on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dkd_tune.tracking.runs import TAG_PARENT, TAG_STATUS, TAG_TRIAL_ID
from tests.listening_sockets import listening_sockets
from tests.test_search_e2e import tiny_data

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def space_file(tmp_path: Path, name: str, **changes) -> Path:
    """A CE-only search (no teacher to prepare) on 5 classes of 8x8 images: a few seconds per trial."""
    space = {
        "name": name,
        "data": tiny_data(tmp_path),
        "student": "resnet8",
        "loss": "ce",
        "overrides": {"epochs": 4, "lr_milestones": [3], "warmup_epochs": 0, "batch_size": 32},
        "scheduler": {"type": "none"},
        "resources": {"cpu": 1},
        "storage": str(tmp_path / "runs"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    return {
        **os.environ,
        # Ray's workers import dkd_tune, trainables and the test trainables from this checkout.
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "RAY_DEDUP_LOGS": "0",
        "DKD_TEST_MARKERS": str(markers),
        **variables,
    }


def start_search(tmp_path: Path, space: Path, trainable: str, **variables: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TESTS / "search_with_trainable.py"), "run", str(space), trainable],
        cwd=tmp_path,
        env=environment(tmp_path, **variables),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the search did not finish in {timeout} s:\n{output[-5000:]}")
    assert process.returncode == 0, output[-5000:]
    return output


def ray_trials(part_dir: Path) -> dict:
    """Ray Tune's own record of the part's trials (read from its experiment state, without Ray running)."""
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: trial for trial in ExperimentAnalysis(str(part_dir)).trials}


def mlflow_trial_runs(tmp_path: Path, experiment_dir: Path):
    state = json.loads((experiment_dir / "state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"])
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{state['parent_run_id']}'",
        max_results=5000,
    )
    return client, parent, runs


def result_lines(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def check_records_agree(
    tmp_path: Path, experiment_dir: Path, part: str, expected_trials: int
) -> pd.DataFrame:
    """Ray's results, the Parquet and MLflow hold the same trials, statuses and every epoch's metrics."""
    frame = pd.read_parquet(experiment_dir / "results.parquet")
    ray = ray_trials(experiment_dir / part)
    client, parent, runs = mlflow_trial_runs(tmp_path, experiment_dir)
    assert len(ray) == len(frame) == len(runs) == expected_trials
    assert set(ray) == set(frame["trial_id"]) == {run.data.tags[TAG_TRIAL_ID] for run in runs}
    assert parent.info.status == "FINISHED"
    assert not set(frame["status"]) & {"running", "pending"}
    by_trial = {run.data.tags[TAG_TRIAL_ID]: run for run in runs}
    for row in frame.itertuples():
        run = by_trial[row.trial_id]
        assert run.data.tags[TAG_STATUS] == row.status
        failed = row.status in ("errored", "oom")
        assert run.info.status == ("FAILED" if failed else "FINISHED")
        assert ray[row.trial_id].status == ("ERROR" if failed else "TERMINATED")
        for metric in ("epoch", "test_acc"):
            steps = [point.step for point in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, row.stop_epoch + 1)), (row.trial_id, metric, steps)
    return frame


def test_trial_faults_are_recorded_and_the_other_trials_finish(tmp_path):
    """8 trials: a clean one, one that raises, one out of memory, one failing once, four diverging."""
    space = space_file(
        tmp_path,
        "faults",
        space={"seed": {"grid": [0, 1, 2, 3]}, "lr": {"grid": [0.05, 100000.0]}},
        search={"algorithm": "grid", "num_samples": 1, "max_concurrent_trials": 2},
        max_failures=1,
    )
    finish(start_search(tmp_path, space, "fault_trainables:faulty_trial"))
    experiment = tmp_path / "runs" / "faults"
    frame = check_records_agree(tmp_path, experiment, "ce", expected_trials=8)

    outcome = {
        (int(json.loads(row.config_json)["seed"]), float(json.loads(row.config_json)["lr"])): row
        for row in frame.itertuples()
    }
    clean, raises, oom, once = (outcome[(seed, 0.05)] for seed in range(4))
    assert (clean.status, clean.stop_epoch, clean.num_failures) == ("completed", 4, 0)
    # Permanent faults: retried once (max_failures: 1) from the epoch-2 checkpoint, failed again.
    assert (raises.status, raises.stop_epoch, raises.num_failures) == ("errored", 2, 2)
    assert "injected fault: the training code raised" in raises.error
    assert (oom.status, oom.stop_epoch, oom.num_failures) == ("oom", 2, 2)
    assert "OutOfMemoryError" in oom.error
    # A transient failure: the retry resumed from the checkpoint of epoch 2 and finished.
    assert (once.status, once.stop_epoch, once.num_failures) == ("completed", 4, 1)
    (once_dir,) = (experiment / "ce").glob(f"*{once.trial_id}*")
    history = result_lines(once_dir)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["iterations_since_restore"] for r in history] == [1, 2, 1, 2]
    for seed in range(4):
        diverged = outcome[(seed, 100000.0)]
        assert (diverged.status, diverged.stop_epoch, diverged.num_failures) == ("diverged", 1, 0)


def test_a_killed_trial_worker_resumes_from_its_last_checkpoint(tmp_path):
    space = space_file(
        tmp_path,
        "killed",
        overrides={"epochs": 5, "lr_milestones": [4], "warmup_epochs": 0, "batch_size": 32},
        search={"algorithm": "random", "num_samples": 1},
        max_failures=1,
    )
    # A pause after each epoch's report leaves time to kill the worker between two epochs.
    process = start_search(tmp_path, space, "fault_trainables:faulty_trial", DKD_TEST_EPOCH_SECONDS="3")
    part = tmp_path / "runs" / "killed" / "ce"
    deadline = time.monotonic() + 600
    reported: list[dict] = []
    while time.monotonic() < deadline and process.poll() is None:
        results = list(part.glob("*/result.json"))
        if results:
            reported = result_lines(results[0].parent)
            if len(reported) >= 2:
                break
        time.sleep(0.2)
    assert len(reported) >= 2, "the trial did not report two epochs"
    # result.json is written once the driver has taken the result and its checkpoint in.
    killed_after = reported[-1]["epoch"]
    os.kill(reported[-1]["pid"], signal.SIGKILL)
    finish(process)

    frame = check_records_agree(tmp_path, tmp_path / "runs" / "killed", "ce", expected_trials=1)
    row = frame.iloc[0]
    assert (row["status"], row["stop_epoch"], row["num_failures"]) == ("completed", 5, 1)
    history = result_lines(next(part.glob("*/result.json")).parent)
    restart = next(i for i, r in enumerate(history) if i > 0 and r["iterations_since_restore"] == 1)
    assert history[restart]["epoch"] == killed_after + 1  # resumed from the last checkpoint, not epoch 0
    assert history[restart]["pid"] != reported[-1]["pid"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("concurrent", [8, 16])
def test_64_trials_run_concurrently_against_the_default_sqlite_store(tmp_path, concurrent):
    space = space_file(
        tmp_path,
        "load",
        overrides={"epochs": 3, "lr_milestones": [2], "warmup_epochs": 0, "batch_size": 32},
        space={"lr": {"loguniform": [0.01, 0.1]}},
        search={"algorithm": "random", "num_samples": 64, "max_concurrent_trials": concurrent},
        resources={"cpu": 0.1},  # a fraction of a CPU each: more trials at once than the machine has cores
    )
    process = start_search(
        tmp_path,
        space,
        "fault_trainables:quick_trial",
        DKD_TEST_CONCURRENCY=str(concurrent),
        DKD_TEST_TRIALS="64",
    )
    sockets = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((tmp_path / "markers").glob("running-*"))) >= concurrent:
            sockets = listening_sockets(process.pid)  # the driver, Ray's servers, agents and workers
            break
        time.sleep(0.1)
    output = finish(process)
    assert "database is locked" not in output

    experiment = tmp_path / "runs" / "load"
    frame = check_records_agree(tmp_path, experiment, "ce", expected_trials=64)
    assert (frame["status"] == "completed").all() and (frame["stop_epoch"] == 3).all()
    intervals = []
    for trial_dir in (experiment / "ce").glob("ce-*"):
        history = result_lines(trial_dir)
        assert [r["epoch"] for r in history] == [1, 2, 3]
        intervals.append((history[0]["started_at"], history[-1]["reported_at"]))
    assert max_overlap(intervals) == concurrent

    processes = {socket.process for socket in sockets}
    assert {"gcs_server", "raylet"} <= processes, sockets
    exposed = [socket for socket in sockets if not socket.loopback_only]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best
