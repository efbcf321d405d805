"""After an interrupted search, MLflow's trial runs are made to match Ray's trials: one run per trial, none open."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from dkd_tune import tracking
from dkd_tune.search import _reconcile_child_runs


def test_open_runs_get_ray_s_status_and_runs_of_trials_ray_lost_are_trashed(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.experiment_id(client, "search")
    parent = client.create_run(experiment, tags=tracking.standard_tags("search")).info.run_id

    def trial_run(trial_id: str) -> str:
        tags = {
            **tracking.standard_tags("trial"),
            tracking.TAG_PARENT: parent,
            tracking.TAG_TRIAL_ID: trial_id,
        }
        return client.create_run(experiment, tags=tags).info.run_id

    finished, open_errored, open_completed, lost = (trial_run(t) for t in ("a", "b", "c", "lost"))
    client.set_terminated(finished, status="FINISHED")
    frame = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": ["stopped", "errored", "completed"]})

    _reconcile_child_runs(client, {"parent_run_id": parent}, frame)

    assert client.get_run(finished).info.status == "FINISHED"
    assert client.get_run(open_errored).info.status == "FAILED"
    assert client.get_run(open_errored).data.tags[tracking.TAG_STATUS] == "errored"
    assert client.get_run(open_completed).info.status == "FINISHED"
    gone = client.get_run(lost)
    assert gone.info.status == "KILLED" and gone.info.lifecycle_stage == "deleted"
    assert gone.data.tags[tracking.TAG_STATUS] == "lost"
    visible = client.search_runs([experiment], filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent}'")
    assert sorted(run.data.tags[tracking.TAG_TRIAL_ID] for run in visible) == ["a", "b", "c"]
