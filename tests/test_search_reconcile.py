"""After an interrupted search, MLflow's trial runs are made to match Ray's trials: one run per trial, none open."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from dkd_tune.search.parent_run import reconcile_child_runs
from dkd_tune.tracking import runs as tracking
from dkd_tune.tracking.connect import open_store


def new_search(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = open_store(uri).experiment("search")
    parent = client.create_run(experiment, tags=tracking.standard_tags("search")).info.run_id
    return client, experiment, parent


def test_open_runs_get_ray_s_status_and_runs_of_trials_ray_lost_are_trashed(tmp_path):
    client, experiment, parent = new_search(tmp_path)

    def trial_run(trial_id: str) -> str:
        tags = {
            **tracking.standard_tags("trial"),
            tracking.TAG_PARENT: parent,
            tracking.TAG_TRIAL_ID: trial_id,
        }
        return client.create_run(experiment, tags=tags).info.run_id

    finished, open_errored, open_completed, lost = (trial_run(t) for t in ("a", "b", "c", "lost"))
    client.set_terminated(finished, status="FINISHED")
    frame = pd.DataFrame(
        {"trial_id": ["a", "b", "c"], "status": ["stopped", "errored", "completed"], "stop_epoch": [0, 0, 0]}
    )

    reconcile_child_runs(open_store(client.tracking_uri), parent, frame, histories={})

    assert client.get_run(finished).info.status == "FINISHED"
    assert client.get_run(open_errored).info.status == "FAILED"
    assert client.get_run(open_errored).data.tags[tracking.TAG_STATUS] == "errored"
    assert client.get_run(open_completed).info.status == "FINISHED"
    gone = client.get_run(lost)
    assert gone.info.status == "KILLED" and gone.info.lifecycle_stage == "deleted"
    assert gone.data.tags[tracking.TAG_STATUS] == "lost"
    visible = client.search_runs([experiment], filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent}'")
    assert sorted(run.data.tags[tracking.TAG_TRIAL_ID] for run in visible) == ["a", "b", "c"]


def result(epoch: int, test_acc: float) -> dict:
    return {
        "epoch": epoch,
        "test_acc": test_acc,
        "train_loss": 1.0 / epoch,
        "timestamp": 1_700_000_000 + epoch,
    }


def test_runs_whose_logged_epochs_are_not_ray_s_history_are_rebuilt_from_it(tmp_path):
    """The driver logged an epoch, died before Ray saved it, and the resumed trial stopped sooner."""
    client, experiment, parent = new_search(tmp_path)
    tags = {**tracking.standard_tags("trial"), tracking.TAG_PARENT: parent}
    ray_history = {"same": [result(1, 0.3), result(2, 0.4)], "longer": [result(1, 0.3), result(2, 0.4)]}
    ray_history["replayed"] = [result(1, 0.3), result(2, 0.45)]  # epoch 2 replayed with another value
    logged = {"same": [result(1, 0.3), result(2, 0.4)], "longer": [*ray_history["longer"], result(3, 0.5)]}
    logged["replayed"] = [result(1, 0.3), result(2, 0.4)]
    old_ids = {}
    for trial_id, results in logged.items():
        run = client.create_run(
            experiment, run_name=f"t-{trial_id}", tags={**tags, tracking.TAG_TRIAL_ID: trial_id}
        )
        old_ids[trial_id] = run.info.run_id
        open_store(client.tracking_uri).log_params(run.info.run_id, {"beta": 2.0, "temperature": 4})
        for point in results:
            step, metrics, timestamp_ms = tracking.epoch_metrics(point)
            open_store(client.tracking_uri).log_metrics(run.info.run_id, metrics, step, timestamp_ms)
    client.set_terminated(old_ids["same"], status="FINISHED")
    frame = pd.DataFrame(
        {"trial_id": ["same", "longer", "replayed"], "status": ["stopped"] * 3, "stop_epoch": [2, 2, 2]}
    )

    reconcile_child_runs(open_store(client.tracking_uri), parent, frame, histories=ray_history)

    visible = client.search_runs([experiment], filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent}'")
    by_trial = {run.data.tags[tracking.TAG_TRIAL_ID]: run for run in visible}
    assert sorted(by_trial) == ["longer", "replayed", "same"]
    assert by_trial["same"].info.run_id == old_ids["same"]  # a run that matches is left as it is
    for trial_id in ("longer", "replayed"):
        run = by_trial[trial_id]
        assert run.info.run_id != old_ids[trial_id] and run.info.status == "FINISHED"
        assert run.info.run_name == f"t-{trial_id}" and run.data.params == {"beta": "2.0", "temperature": "4"}
        assert (
            run.data.tags[tracking.TAG_STATUS] == "stopped" and run.data.tags[tracking.TAG_STOP_EPOCH] == "2"
        )
        points = client.get_metric_history(run.info.run_id, "test_acc")
        assert [(p.step, p.value) for p in points] == [
            (r["epoch"], r["test_acc"]) for r in ray_history[trial_id]
        ]
        assert [p.step for p in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
        old = client.get_run(old_ids[trial_id])
        assert old.info.lifecycle_stage == "deleted" and old.data.tags[tracking.TAG_STATUS] == "superseded"
        assert old.data.tags["dkd_tune.superseded_by"] == run.info.run_id
