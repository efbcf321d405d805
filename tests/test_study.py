"""The part's Optuna study: persistent in SQLite, and told COMPLETE, PRUNED or FAIL as each trial ended."""

from __future__ import annotations

import optuna
import pytest

from dkd_tune.config.schema import Distribution
from dkd_tune.search.study import RAY_TRIAL_ID_ATTR
from dkd_tune.search.tuner import search_algorithm
from tests.test_search_spaces import demo_part, searched_space


def searcher_in(tmp_path, max_epochs=4):
    space, _, _ = demo_part(tmp_path)
    space = space.model_copy(update={"metric": "test_acc"})  # the results below report test_acc
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searched = {"beta": Distribution.model_validate({"loguniform": [0.5, 8.0]})}
    searcher, _, _ = search_algorithm(space, searched, max_epochs=max_epochs, study=(url, "demo/resnet20"))
    return searcher, url


def test_the_study_persists_in_the_search_folder_under_the_part_s_name(tmp_path):
    searcher, url = searcher_in(tmp_path)
    config = searcher.suggest("ray-trial-1")
    study = optuna.load_study(study_name="demo/resnet20", storage=url)  # another process could open it
    (trial,) = study.trials
    assert trial.params == config and trial.user_attrs[RAY_TRIAL_ID_ATTR] == "ray-trial-1"


def test_a_search_file_s_budget_is_the_default_full_budget(tmp_path):
    space, _, _ = demo_part(tmp_path)
    searcher, _, _ = search_algorithm(space, searched_space())
    assert searcher.max_epochs == space.max_epochs() == 20  # demo.yaml's epochs
    assert searcher_in(tmp_path, max_epochs=5)[0].max_epochs == 5


def test_trials_are_told_complete_pruned_or_fail_as_they_ended(tmp_path):
    searcher, url = searcher_in(tmp_path, max_epochs=4)
    for trial_id in ("full", "stopped", "crashed"):
        searcher.suggest(trial_id)
    accuracies = {"full": [30.0, 40.0, 45.0, 50.0], "stopped": [20.0, 25.0], "crashed": [10.0]}
    for trial_id, values in accuracies.items():
        # As Tune does: every result but the last through on_trial_result, the last to on_trial_complete.
        for epoch, value in enumerate(values[:-1], start=1):
            # Ray's iteration count restarts when a trial resumes; the epoch is the step.
            searcher.on_trial_result(trial_id, {"test_acc": value, "epoch": epoch, "training_iteration": 1})
    searcher.on_trial_result("full", {"test_acc": 40.0, "epoch": 2})  # a resumed trial replays an epoch
    searcher.on_trial_complete("full", {"test_acc": 50.0, "epoch": 4})
    searcher.on_trial_complete("stopped", {"test_acc": 25.0, "epoch": 2})
    searcher.on_trial_complete("crashed", {"test_acc": 10.0, "epoch": 1}, error=True)
    searcher.on_trial_result("full", {"test_acc": 99.0, "epoch": 5})  # late: ignored, not an error
    searcher.on_trial_complete("full", {"test_acc": 99.0, "epoch": 5})

    study = optuna.load_study(study_name="demo/resnet20", storage=url)
    by_ray_id = {trial.user_attrs[RAY_TRIAL_ID_ATTR]: trial for trial in study.trials}
    full, stopped, crashed = by_ray_id["full"], by_ray_id["stopped"], by_ray_id["crashed"]
    assert full.state == optuna.trial.TrialState.COMPLETE and full.value == pytest.approx(50.0)
    assert full.intermediate_values == {1: 30.0, 2: 40.0, 3: 45.0, 4: 50.0}
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {1: 20.0, 2: 25.0}
    assert crashed.state == optuna.trial.TrialState.FAIL and crashed.value is None


def test_a_trial_without_any_result_failed(tmp_path):
    searcher, url = searcher_in(tmp_path)
    searcher.suggest("silent")
    searcher.on_trial_complete("silent", None)
    (trial,) = optuna.load_study(study_name="demo/resnet20", storage=url).trials
    assert trial.state == optuna.trial.TrialState.FAIL


def test_a_search_killed_after_tell_but_before_tune_saved_its_state_resumes(tmp_path):
    # Tune snapshots the searcher between events; a kill can come after the study was told PRUNED and
    # before the snapshot, so the restored searcher sees the trial again (a result, then an error).
    searcher, url = searcher_in(tmp_path, max_epochs=4)
    searcher.suggest("pruned")
    searcher.on_trial_result("pruned", {"test_acc": 20.0, "epoch": 1})
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    searcher.save_to_dir(str(snapshot), session_str="before-tell")
    searcher.on_trial_complete("pruned", {"test_acc": 25.0, "epoch": 2})

    (tmp_path / "restored").mkdir()
    restored, _ = searcher_in(tmp_path / "restored", max_epochs=4)  # as a new driver builds it
    restored.restore_from_dir(str(snapshot))
    restored.on_trial_result("pruned", {"test_acc": 30.0, "epoch": 3})
    restored.on_trial_complete("pruned", error=True)

    (trial,) = optuna.load_study(study_name="demo/resnet20", storage=url).trials
    assert trial.state == optuna.trial.TrialState.PRUNED  # what the study was told first stays
    assert trial.intermediate_values == {1: 20.0, 2: 25.0}
