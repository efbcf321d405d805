"""MLflow logging against a real `mlflow server` on 127.0.0.1: a search's parent/child runs, and single runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from dkd_tune.tracking.runs import TAG_KIND, TAG_PARENT, TAG_STATUS, TAG_TEACHER, TAG_TRIAL_ID
from tests.test_search_e2e import cli, tiny_space

pytestmark = pytest.mark.slow
RECIPE_PARAMS = (
    "beta",
    "alpha",
    "temperature",
    "warmup_epochs",
    "lr",
    "epochs",
    "batch_size",
    "weight_decay",
)
EPOCH_METRICS = (
    "test_acc",
    "train_loss",
    "train_acc",
    "test_acc_top5",
    "lr",
    "warmup_factor",
    "epoch_time_s",
)


def test_a_search_is_logged_as_a_parent_run_with_one_child_per_trial(mlflow_ui, tmp_path):
    space = tiny_space(tmp_path, tracking_uri=mlflow_ui.url)
    result = cli("run", str(space), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    experiment_dir = tmp_path / "runs" / "e2e"
    state = json.loads((experiment_dir / "state.json").read_text())
    frame = pd.read_parquet(experiment_dir / "results.parquet")
    client = MlflowClient(tracking_uri=mlflow_ui.url)
    experiment = client.get_experiment_by_name("e2e")
    assert experiment is not None

    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[TAG_KIND] == "search" and parent.data.tags["student"] == "resnet8"
    assert float(parent.data.tags["teacher_gap"]) == pytest.approx(
        frame.loc[frame["part"] == "teacher", "teacher_gap"].iloc[0], abs=1e-3
    )
    assert parent.data.params["search.num_samples"] == "6" and parent.data.params["scheduler.type"] == "asha"
    assert {"results.parquet", "search.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "best_final_test_acc" in parent.data.metrics

    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'",
        max_results=100,
    )
    assert len(children) == len(frame) == 7
    for run in children:
        row = frame[frame["trial_id"] == run.data.tags[TAG_TRIAL_ID]].iloc[0]
        assert run.data.tags[TAG_KIND] == "trial" and run.info.status == "FINISHED"
        assert run.data.tags[TAG_STATUS] == row["status"]
        assert run.data.tags[TAG_TEACHER] == (row["teacher"] if row["part"] == "teacher" else "baseline-ce")
        for name in RECIPE_PARAMS:
            assert name in run.data.params, name
        assert float(run.data.params["beta"]) == pytest.approx(row["beta"])
        for metric in EPOCH_METRICS:
            steps = [point.step for point in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, row["stop_epoch"] + 1)), (metric, steps)
    statuses = {run.data.tags[TAG_STATUS] for run in children}
    assert {"completed", "stopped"} <= statuses


def test_single_runs_are_logged(mlflow_ui, tmp_path):
    data = tmp_path / "data"
    assert cli("make-synthetic", "--out", str(data), "--classes", "5", "--superclasses", "5", "--train-per-class", "20",
               "--test-per-class", "10", "--image-size", "8", cwd=tmp_path).returncode == 0  # fmt: skip
    common = [
        "--data",
        f"synthetic:{data}",
        "--set",
        "epochs=2",
        "--set",
        "batch_size=32",
        "--set",
        "warmup_epochs=1",
        "--tracking-uri",
        mlflow_ui.url,
    ]
    teacher = cli(
        "train-teacher", "--model", "resnet8", "--out", str(tmp_path / "teacher"), *common, cwd=tmp_path
    )
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    student = cli(
        "distill", "--teacher-model", "resnet8", "--teacher-checkpoint", str(tmp_path / "teacher" / "best.pt"),
        "--student", "resnet8", "--out", str(tmp_path / "student"), *common, cwd=tmp_path,
    )  # fmt: skip
    assert student.returncode == 0, student.stderr[-2000:]

    client = MlflowClient(tracking_uri=mlflow_ui.url)
    for kind in ("train-teacher", "distill"):
        experiment = client.get_experiment_by_name(kind)
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.data.tags[TAG_KIND] == kind and run.info.status == "FINISHED"
        assert run.data.tags[TAG_STATUS] == "completed"
        assert [p.step for p in client.get_metric_history(run.info.run_id, "test_acc")] == [1, 2]
        assert "best.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    (distill_run,) = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    assert distill_run.data.params["loss"] == "dkd" and distill_run.data.params["teacher_model"] == "resnet8"


def test_a_trial_run_never_ends_before_it_starts():
    """Ray's result timestamp is whole seconds; the run's start is the driver's clock in ms."""
    from dkd_tune.tracking.runs import trial_end_ms

    started = 1_796_400_000_700  # 0.7 s into a second
    assert trial_end_ms({"timestamp": 1_796_400_000}, started) == started  # a sub-second trial: 0 s, not -0.7
    assert trial_end_ms({"timestamp": 1_796_400_069}, started) == 1_796_400_069_000


def test_logging_a_student_model_into_a_finished_trial_run_keeps_its_end_and_prints_nothing(tmp_path, capfd):
    import numpy as np
    import torch

    from dkd_tune.tracking.connect import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("search"), start_time=1_000_000).info.run_id
    client.set_terminated(run_id, status="FINISHED", end_time=1_060_000)  # the trial's own end
    capfd.readouterr()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    example = np.zeros((1, 3, 2, 2), dtype=np.float32)
    uri_of_model = open_store(uri).log_model(
        run_id, model, name="best_student", registered_name="search-t-student", input_example=example,
        metadata={"teacher": "t"},
    )  # fmt: skip
    info = client.get_run(run_id).info
    assert (info.status, info.end_time) == ("FINISHED", 1_060_000)
    assert client.get_registered_model("search-t-student").latest_versions
    assert uri_of_model.startswith("models:/")
    assert capfd.readouterr().err == ""  # MLflow's registration lines and torch.export's notes are silenced
