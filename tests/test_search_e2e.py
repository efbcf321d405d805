"""`dkd-tune run` and `dkd-tune resume` end to end on the generated dataset, through the CLI and real Ray."""

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
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from analysis.results import RESULT_COLUMNS
from dkd_tune.tracking.runs import TAG_KIND, TAG_PARENT, TAG_STATUS, TAG_TRIAL_ID

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_data(tmp_path: Path) -> dict:
    """The `data:` of a search of a few seconds per trial: 5 classes of 8x8 images, generated."""
    generate = {"classes": 5, "superclasses": 5, "train_per_class": 40, "test_per_class": 20, "image_size": 8}
    return {"name": "synthetic", "root": str(tmp_path / "data"), "generate": generate}


def tiny_space(tmp_path: Path, **changes) -> Path:
    """A search of a few seconds per trial: 5 classes of 8x8 images, resnet8 teacher and student."""
    space = {
        "name": "e2e",
        "data": tiny_data(tmp_path),
        "student": "resnet8",
        "overrides": {"epochs": 4, "lr_milestones": [3], "warmup_epochs": 1, "batch_size": 32},
        "teachers": [
            {"model": "resnet8", "name": "teacher", "train": {"overrides": {"epochs": 2, "batch_size": 32}}}
        ],
        "space": {"beta": {"loguniform": [0.5, 8.0]}, "temperature": {"choice": [2, 4]}},
        "baselines": ["ce"],
        "search": {"algorithm": "optuna", "seed": 0, "num_samples": 6, "max_concurrent_trials": 2},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1},
        "storage": str(tmp_path / "runs"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    for key, value in changes.items():
        space[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def environment() -> dict[str, str]:
    # Ray workers import dkd_tune and trainables from this checkout.
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "RAY_DEDUP_LOGS": "0",
    }


def cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dkd_tune", *args],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mlflow_children(tmp_path: Path, parent_run_id: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
        max_results=1000,
    )
    return client, parent, children


def write_probe_data(root: Path) -> Path:
    """A small STL-10 binary release whose classes a linear probe can separate."""
    import numpy as np

    from tests.probe_datasets import separable_images, write_stl10_split

    for split, count in (("train", 60), ("test", 30)):
        labels = np.arange(count) % 10
        images = separable_images(labels, 10, 96, seed=len(split)).transpose(0, 3, 1, 2)
        write_stl10_split(root, split, images, labels)
    return root


def test_quiet_prints_the_summary_only_and_verbose_shows_ray_tunes_tables(tmp_path):
    space = tiny_space(tmp_path, baselines=[], search={"algorithm": "optuna", "seed": 0, "num_samples": 2})
    quiet = cli("run", str(space), "--name", "quiet", "-q", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stdout[-3000:] + quiet.stderr[-3000:]
    assert "best trial:" in quiet.stdout
    assert not [line for line in quiet.stdout.splitlines() if line.startswith("dkd-tune: ")]
    verbose = cli("run", str(space), "--name", "verbose", "--verbose", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stdout[-3000:] + verbose.stderr[-3000:]
    assert "== Status ==" in verbose.stdout and "trial 1/2" not in verbose.stdout
    both = cli("run", str(space), "-q", "-v", cwd=tmp_path)
    assert both.returncode == 2 and "give one of them" in both.stderr


def test_run_end_to_end_through_the_cli(tmp_path):
    probe_root = write_probe_data(tmp_path / "probe_data")
    space = tiny_space(tmp_path, probe={"datasets": ["stl10"], "top_k": 2, "data_root": str(probe_root)})
    result = cli("run", str(space), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "best trial:" in result.stdout
    # The default output: a line per trial, no Ray status tables, none of the libraries' start-up lines.
    assert "dkd-tune: teacher: trial 1/6 (" in result.stdout and "== Status ==" not in result.stdout
    for chatter in ("Creating initial MLflow database tables", "A new study created", "Token authentication"):
        assert chatter not in result.stdout + result.stderr, chatter
    experiment = tmp_path / "runs" / "e2e"
    assert f"analysis (tables.md and figures): {experiment / 'analysis'}" in result.stdout
    state = json.loads((experiment / "state.json").read_text())
    assert state["status"] == "done" and state["parts_done"] == ["baseline-ce", "teacher"]
    frame = pd.read_parquet(experiment / "results.parquet")
    assert list(frame.columns) == list(RESULT_COLUMNS)
    assert len(frame) == 7  # 6 searched trials + the CE baseline
    searched = frame[frame["part"] == "teacher"]
    assert (searched["status"] == "stopped").any(), "ASHA should stop at least one trial early"
    assert (searched["status"] == "completed").any()
    assert searched["teacher_gap"].notna().all()
    baseline = frame[frame["part"] == "baseline-ce"].iloc[0]
    assert baseline["loss"] == "ce" and baseline["status"] == "completed" and baseline["stop_epoch"] == 4

    client, parent, children = mlflow_children(tmp_path, state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_KIND] == "search"
    assert "teacher_gap" in parent.data.tags
    assert len(children) == 7
    by_trial = {run.data.tags[TAG_TRIAL_ID]: run for run in children}
    for _, row in frame.iterrows():
        run = by_trial[row["trial_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG_STATUS] == row["status"]
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert sorted(point.step for point in history) == list(range(1, row["stop_epoch"] + 1))
        if row["part"] == "teacher":
            assert float(run.data.params["beta"]) == pytest.approx(row["beta"])
        # The run ends at its trial's last result, not when the search ended, and covers the trial's
        # training time (it starts when Ray starts the trial, so it also holds the actor's start-up).
        # (Ray's timestamps are whole seconds; a run never ends before it starts, so up to 1 s later.)
        assert 0 <= run.info.end_time - max(point.timestamp for point in history) < 1000, row["trial_id"]
        assert (run.info.end_time - run.info.start_time) / 1000 >= row["wall_time_s"] - 1.0, row["trial_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.parquet", "search.yaml", "probes.parquet"} <= artifacts
    check_optuna_was_told_the_truth(experiment, searched)
    check_the_best_student_is_a_registered_model(tmp_path, frame)

    # The best two trials were probed on STL-10, each probe run nested under its trial's run.
    probes = pd.read_parquet(experiment / "probes.parquet")
    assert (
        len(probes) == 2 and (probes["status"] == "completed").all() and (probes["dataset"] == "stl10").all()
    )
    for _, probe in probes.iterrows():
        run = client.get_run(probe["probe_run_id"])
        assert run.data.tags[TAG_KIND] == "probe"
        assert run.data.tags[TAG_PARENT] == by_trial[probe["trial_id"]].info.run_id
        assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 40


def check_the_best_student_is_a_registered_model(tmp_path: Path, frame: pd.DataFrame) -> None:
    """The teacher's best student (chosen on validation) is registered; loaded back from the Model
    Registry with mlflow.pytorch it gives the checkpoint's logits."""
    import mlflow
    import mlflow.pytorch

    from analysis.trial_choice import best_trials_per_teacher
    from dkd_tune.models import load_teacher

    best = best_trials_per_teacher(frame).iloc[0]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    served = mlflow.pytorch.load_model("models:/e2e-teacher-student/1")
    checkpoint = load_teacher("resnet8", best["checkpoint_path"])
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(served(images), checkpoint(images))
    version = MlflowClient().get_model_version("e2e-teacher-student", "1")
    assert MlflowClient().get_run(version.run_id).data.tags[TAG_TRIAL_ID] == best["trial_id"]


def check_optuna_was_told_the_truth(experiment: Path, searched: pd.DataFrame) -> None:
    """The part's persistent study: COMPLETE only at full budget, PRUNED with every epoch's value, as in Ray."""
    import optuna

    from analysis.results import trial_histories

    study = optuna.load_study(study_name="e2e/teacher", storage=f"sqlite:///{experiment / 'optuna.db'}")
    by_ray_id = {trial.user_attrs["ray_trial_id"]: trial for trial in study.trials}
    assert set(by_ray_id) == set(searched["trial_id"])
    histories = trial_histories(experiment)
    for row in searched.itertuples():
        trial = by_ray_id[row.trial_id]
        expected_state = {"completed": "COMPLETE", "stopped": "PRUNED", "errored": "FAIL"}[row.status]
        assert trial.state.name == expected_state, (row.trial_id, row.status, trial.state)
        assert trial.intermediate_values == {
            result["epoch"]: pytest.approx(result["test_acc"]) for result in histories[row.trial_id]
        }
        assert trial.params["beta"] == pytest.approx(row.beta)
        if expected_state == "COMPLETE":
            assert trial.value == pytest.approx(row.final_test_acc)
    assert {trial.state.name for trial in study.trials} >= {"COMPLETE", "PRUNED"}


def test_resume_after_the_driver_is_killed(tmp_path):
    path = tiny_space(
        tmp_path,
        overrides={"epochs": 6, "lr_milestones": [5], "warmup_epochs": 1, "batch_size": 32},
        search={"algorithm": "optuna", "seed": 1, "num_samples": 8, "max_concurrent_trials": 1},
        scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2},
        baselines=[],
    )
    experiment = tmp_path / "runs" / "e2e"
    process = subprocess.Popen(
        [sys.executable, "-m", "dkd_tune", "run", str(path)],
        cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 600
    finished_before_kill: dict[str, int] = {}
    while time.time() < deadline and process.poll() is None:
        finished_before_kill = finished_trials(experiment / "teacher")
        if len(finished_before_kill) >= 2:
            break
        time.sleep(0.5)
    assert process.poll() is None, "the search ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGKILL)  # the driver and everything it started
    process.wait()
    assert len(finished_before_kill) >= 2

    result = cli("resume", "e2e", "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    frame = pd.read_parquet(experiment / "results.parquet")
    assert len(frame) == 8 and frame["trial_id"].is_unique
    assert not set(frame["status"]) & {"running", "pending"}
    for trial_id, epochs in finished_before_kill.items():
        # A trial that had finished was not run again: its history still ends where it ended.
        assert result_lines(experiment / "teacher", trial_id) == epochs
    state = json.loads((experiment / "state.json").read_text())
    client, parent, children = mlflow_children(tmp_path, state["parent_run_id"])
    ray_trials = ExperimentAnalysis(str(experiment / "teacher")).trials
    assert len(ray_trials) == len(frame) == len(children)
    assert (
        {t.trial_id for t in ray_trials}
        == set(frame["trial_id"])
        == {run.data.tags[TAG_TRIAL_ID] for run in children}
    )
    assert all(run.info.status != "RUNNING" for run in children) and parent.info.status == "FINISHED"
    by_trial = {run.data.tags[TAG_TRIAL_ID]: run for run in children}
    for row in frame.itertuples():
        assert by_trial[row.trial_id].data.tags[TAG_STATUS] == row.status
        steps = [p.step for p in client.get_metric_history(by_trial[row.trial_id].info.run_id, "test_acc")]
        assert sorted(steps) == list(range(1, row.stop_epoch + 1))  # every epoch once, none duplicated


def finished_trials(part_dir: Path) -> dict[str, int]:
    """trial id -> reported epochs, for trials Ray has marked TERMINATED in its saved state."""
    states = sorted(part_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError, OSError):
        return {}
    finished = {}
    for trial_json, _ in trial_data:
        trial = json.loads(trial_json)
        if trial.get("status") == "TERMINATED":
            finished[trial["trial_id"]] = result_lines(part_dir, trial["trial_id"])
    return finished


def result_lines(part_dir: Path, trial_id: str) -> int:
    for trial_dir in part_dir.glob(f"*{trial_id}*"):
        path = trial_dir / "result.json"
        if path.exists():
            return sum(1 for line in path.read_text().splitlines() if line.strip())
    return 0


def test_trials_of_two_ddp_workers(tmp_path):
    """resources.workers > 1: each trial is a Ray Train TorchTrainer with 2 gloo processes."""
    space = tiny_space(
        tmp_path,
        resources={"cpu": 1, "workers": 2},
        baselines=[],
        search={"algorithm": "optuna", "seed": 0, "num_samples": 2, "max_concurrent_trials": 1},
        scheduler={"type": "none"},
    )
    result = cli("run", str(space), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "runs" / "e2e"
    frame = pd.read_parquet(experiment / "results.parquet")
    assert len(frame) == 2 and (frame["status"] == "completed").all() and (frame["stop_epoch"] == 4).all()
    for path in frame["checkpoint_path"]:
        # Ray Train kept each trial's checkpoint in the search's storage, not in a session folder.
        assert path and Path(path).is_file() and str(experiment) in path


def test_beta_auto_enqueues_only_the_priors_centre_and_records_each_trials_proposal(tmp_path):
    """`beta: auto` in a real search: the study's first (and only enqueued) trial is the prior's centre,
    the others are drawn by the prior-guided sampler, each with its proposal as a trial attribute; the
    prior is on the MLflow run."""
    import optuna
    from mlflow.tracking import MlflowClient

    from dkd_tune.search.prior_sampler import COMPONENT_ATTR
    from dkd_tune.teacher.auto_beta import beta_prior, default_calibration
    from dkd_tune.teacher.gap import LogitGapStats

    path = tiny_space(
        tmp_path,
        space={"beta": "auto", "temperature": 4},
        baselines=[],
        search={"algorithm": "optuna", "seed": 0, "num_samples": 4, "max_concurrent_trials": 1},
    )
    result = cli("run", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "runs" / "e2e"
    state = json.loads((experiment / "state.json").read_text())
    teacher = state["teachers"]["teacher"]
    gap = LogitGapStats.from_dict(teacher["gap"])
    prior = beta_prior(default_calibration("synthetic"), gap, teacher["model"])
    assert f"beta: auto: {prior.describe()}" in result.stdout
    study = optuna.load_study(study_name="e2e/teacher", storage=f"sqlite:///{experiment / 'optuna.db'}")
    ordered = sorted(study.trials, key=lambda trial: trial.number)
    assert ordered[0].params["beta"] == pytest.approx(prior.centre)
    components = [trial.user_attrs[COMPONENT_ATTR] for trial in ordered]
    assert components[0] == "enqueued" and components.count("enqueued") == 1
    assert set(components[1:]) <= {"uniform", "prior", "model"}
    low, high = prior.beta_range
    assert all(low <= trial.params["beta"] <= high for trial in ordered)
    tags = MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["parent_run_id"]).data.tags
    assert float(tags["auto_beta.teacher.beta"]) == pytest.approx(prior.suggestion.beta, rel=1e-3)
    assert tags["auto_beta.teacher.calibration"] == prior.suggestion.calibration
