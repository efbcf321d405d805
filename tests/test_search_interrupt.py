"""SIGINT and SIGTERM in each phase of a search: exit 130/143, state `interrupted`, and `resume` finishes it.

Through the CLI (the signal sent as a terminal or a cluster would, to the whole process group)
while trials run and while a teacher is prepared in its Ray task; in-process, deterministically, in
the driver's own phases (probes, writing the results): the signal is sent from the search's log
line that opens the phase.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from ray.tune import ExperimentAnalysis

from dkd_tune.search.interruption import SearchInterrupted
from dkd_tune.tracking.runs import TAG_STATUS, TAG_TRIAL_ID
from tests.test_search_e2e import (
    ROOT,
    cli,
    environment,
    finished_trials,
    mlflow_children,
    result_lines,
    tiny_space,
    write_probe_data,
)
from tests.test_validation import validation_file  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


class Search:
    """`dkd-tune run` in its own process group, its output read line by line as it comes."""

    def __init__(self, space: Path, cwd: Path, command: str = "run"):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dkd_tune", command, str(space)],
            cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for_line(self, text: str, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.process.poll() is None:
            if any(text in line for line in self.lines):
                return
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r} before the search ended:\n{self.output()[-3000:]}")

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)  # as Ctrl-C in a terminal: the whole process group

    def signal_driver(self, signum: int) -> None:
        os.kill(
            self.process.pid, signum
        )  # as `kill PID`, or a container's preemption notice to its main process

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def output(self) -> str:
        return "".join(self.lines)


def check_interrupted(experiment: Path, output: str) -> dict:
    state = json.loads((experiment / "state.json").read_text())
    assert state["status"] == "interrupted"
    assert not (experiment / "results.parquet").exists()
    resume_lines = [line for line in output.splitlines() if "dkd-tune resume" in line]
    assert resume_lines == [f"dkd-tune: interrupted by {resume_lines[0].split('interrupted by ')[1]}"]
    assert resume_lines[0].endswith(f"run dkd-tune resume {experiment}")
    assert "Tuner.restore" not in output  # Ray's own hint would point at a command that is not ours
    return state


def check_finished_and_agreeing(tmp_path: Path, experiment: Path, trials: int) -> None:
    """After the resume: every trial finished once, and Ray, the Parquet and MLflow agree."""
    state = json.loads((experiment / "state.json").read_text())
    assert state["status"] == "done"
    frame = pd.read_parquet(experiment / "results.parquet")
    searched = frame[frame["part"] == "teacher"]
    assert len(searched) == trials and frame["trial_id"].is_unique
    assert not set(frame["status"]) & {"running", "pending"}
    client, parent, children = mlflow_children(tmp_path, state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    ray_trials = ExperimentAnalysis(str(experiment / "teacher")).trials
    assert {t.trial_id for t in ray_trials} == set(searched["trial_id"])
    by_trial = {run.data.tags[TAG_TRIAL_ID]: run for run in children}
    assert set(by_trial) == set(frame["trial_id"]) and len(children) == len(frame)
    for row in frame.itertuples():
        run = by_trial[row.trial_id]
        assert run.info.status == ("FINISHED" if row.status in ("completed", "stopped") else "FAILED")
        assert run.data.tags[TAG_STATUS] == row.status
        steps = [p.step for p in client.get_metric_history(run.info.run_id, "test_acc")]
        assert sorted(steps) == list(range(1, row.stop_epoch + 1))  # every epoch once


def slow_search(tmp_path: Path, **changes) -> Path:
    settings = {
        "overrides": {"epochs": 6, "lr_milestones": [5], "warmup_epochs": 1, "batch_size": 32},
        "search": {"algorithm": "optuna", "seed": 1, "num_samples": 6, "max_concurrent_trials": 1},
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "baselines": [],
    }
    settings.update(changes)
    return tiny_space(tmp_path, **settings)


def test_ctrl_c_while_trials_run_stops_resumably_and_resume_finishes_the_rest(tmp_path):
    space = slow_search(tmp_path)
    experiment = tmp_path / "runs" / "e2e"
    search = Search(space, tmp_path)
    deadline = time.time() + 600
    finished_before: dict[str, int] = {}
    while time.time() < deadline and search.process.poll() is None and len(finished_before) < 2:
        finished_before = finished_trials(experiment / "teacher")
        time.sleep(0.2)
    assert search.process.poll() is None, "the search ended before it could be interrupted"
    search.signal(signal.SIGINT)
    assert search.finish() == 130, search.output()[-3000:]
    state = check_interrupted(experiment, search.output())
    assert "teacher" not in state["parts_done"]
    # MLflow: the trials Ray had not finished are KILLED, none FINISHED; the search's run too.
    _, parent, children = mlflow_children(tmp_path, state["parent_run_id"])
    assert parent.info.status == "KILLED"
    finished_now = finished_trials(experiment / "teacher")
    for run in children:
        if run.data.tags[TAG_TRIAL_ID] not in finished_now:
            assert run.info.status == "KILLED" and run.data.tags[TAG_STATUS] == "interrupted"
    assert len(finished_now) < 6, "every trial had finished: nothing was interrupted"
    for notice in ("Failed to fetch metrics", "performance bottleneck"):  # Ray's, shown only with -v
        assert notice not in search.output()

    result = cli("resume", str(experiment), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr == ""  # a resumed search prints nothing on stderr
    for trial_id, epochs in finished_now.items():
        assert result_lines(experiment / "teacher", trial_id) == epochs  # not run again
    check_finished_and_agreeing(tmp_path, experiment, trials=6)


def test_a_second_ctrl_c_stops_at_once_and_the_search_still_resumes(tmp_path):
    space = slow_search(tmp_path)
    experiment = tmp_path / "runs" / "e2e"
    search = Search(space, tmp_path)
    search.wait_for_line("part 'teacher': starting")
    deadline = time.time() + 600
    while time.time() < deadline and not finished_trials(experiment / "teacher"):
        time.sleep(0.2)
    search.signal(signal.SIGINT)
    search.wait_for_line("SIGINT received")
    search.signal(signal.SIGINT)
    assert search.finish() == 130, search.output()[-3000:]
    assert "second SIGINT" in search.output()
    check_interrupted(experiment, search.output())

    result = cli("resume", str(experiment), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_finished_and_agreeing(tmp_path, experiment, trials=6)


def test_sigterm_while_the_teacher_is_prepared_exits_143_and_resumes(tmp_path):
    # The teacher trains in a Ray task, then its gap is measured and its logit cache built there.
    space = slow_search(
        tmp_path,
        teachers=[{"model": "resnet8", "name": "teacher", "train": {"overrides": {"epochs": 3, "batch_size": 32}}}],
        search={"algorithm": "optuna", "seed": 1, "num_samples": 2, "max_concurrent_trials": 1},
        scheduler={"type": "none"},
        overrides={"epochs": 2, "lr_milestones": [1], "warmup_epochs": 1, "batch_size": 32},
        cache={"teacher_logits": "on"},
    )  # fmt: skip
    experiment = tmp_path / "runs" / "e2e"
    search = Search(space, tmp_path)
    search.wait_for_line("preparing teacher 'teacher'")
    time.sleep(2.0)  # inside the teacher's task (its training takes longer than this)
    search.signal_driver(signal.SIGTERM)
    assert search.finish() == 143, search.output()[-3000:]
    state = check_interrupted(experiment, search.output())
    assert state["parts_done"] == [] and "teacher" not in state["teachers"]

    result = cli("resume", str(experiment), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_finished_and_agreeing(tmp_path, experiment, trials=2)


@pytest.mark.parametrize("phase_line", ["dkd-tune: probe: the best", "dkd-tune: writing the results"])
def test_a_signal_in_a_driver_phase_leaves_a_resumable_search(tmp_path, monkeypatch, phase_line):
    from dkd_tune.config.loading import load_search_space
    from dkd_tune.search.driver import resume_search, run_search
    from dkd_tune.search.options import SearchOptions

    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.chdir(tmp_path)
    probe_root = write_probe_data(tmp_path / "probe_data")
    space = slow_search(
        tmp_path,
        search={"algorithm": "optuna", "seed": 1, "num_samples": 2, "max_concurrent_trials": 1},
        scheduler={"type": "none"},
        overrides={"epochs": 2, "lr_milestones": [1], "warmup_epochs": 1, "batch_size": 32},
        probe={"datasets": ["stl10"], "top_k": 1, "data_root": str(probe_root)},
    )
    sent = []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background

    def log(message: str) -> None:
        print(message)
        if phase_line in message and not sent:
            sent.append(message)
            os.kill(os.getpid(), signal.SIGINT)  # handled right here, in the middle of the phase

    with pytest.raises(SearchInterrupted) as raised:
        run_search(load_search_space(space), space, SearchOptions(log=log))
    assert raised.value.signum == signal.SIGINT and raised.value.exit_code == 130
    experiment = tmp_path / "runs" / "e2e"
    assert raised.value.resume_command == f"dkd-tune resume {experiment}"
    state = json.loads((experiment / "state.json").read_text())
    assert state["status"] == "interrupted" and state["parts_done"] == ["teacher"]
    assert signal.getsignal(signal.SIGINT) is before  # the guard gave back the handler it found

    outcome = resume_search(str(experiment), SearchOptions())
    assert outcome.best is not None
    check_finished_and_agreeing(tmp_path, experiment, trials=2)
    assert len(pd.read_parquet(experiment / "probes.parquet")) == 1


def test_ctrl_c_stops_validate_beta_resumably_and_its_command_continues_it(validation_file, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    space = validation_file  # 3 teachers, a grid of betas and seeds
    validation = Search(space, tmp_path, command="validate-beta")
    validation.wait_for_line("part 'weak': starting")  # inside the validation's search, trials running
    validation.signal(signal.SIGINT)
    assert validation.finish() == 130, validation.output()[-3000:]
    (line,) = [line for line in validation.output().splitlines() if "to continue, run" in line]
    assert line.endswith(f"to continue, run dkd-tune validate-beta {space}")
    folder = tmp_path / "runs" / "validation"
    state = json.loads((folder / "validation.json").read_text())
    assert state["status"] == "interrupted" and state["sessions"][-1]["outcome"] == "interrupted"
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    assert client.get_run(state["validation_run_id"]).info.status == "KILLED"
    search_state = json.loads((folder / "validation-grid" / "state.json").read_text())
    assert search_state["status"] == "interrupted"

    again = cli("validate-beta", str(space), cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((folder / "validation.json").read_text())["status"] == "done"
    assert client.get_run(state["validation_run_id"]).info.status == "FINISHED"
