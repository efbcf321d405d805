"""The Optuna side of a search: one persistent study per part, told the truth about every trial.

Ray Tune's `OptunaSearch` tells Optuna that a trial ASHA stopped is COMPLETE, with the accuracy
of its last rung: TPE then compares a 2-epoch accuracy with full-budget ones as if they were the
same objective. Here a trial reaches Optuna as what it was: COMPLETE only when it ran the full
budget, PRUNED (with its per-epoch intermediate values, which Optuna's samplers rank pruned
trials by) when the scheduler stopped it, FAIL when it crashed. The study lives in SQLite in the
search's folder (`optuna.db`, a study per part), so `resume` continues it and optuna-dashboard or
Optuna's plots open it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

STUDY_FILE = "optuna.db"
RAY_TRIAL_ID_ATTR = "ray_trial_id"
# OptunaSearch's private state this class reads (Ray has no public way to tell Optuna PRUNED):
# tested with the Ray versions pyproject.toml allows; a Ray that renames them fails with this name.
RAY_PRIVATE_ATTRIBUTES = ("_ot_trials", "_completed_trials", "_ot_study")


def study_storage_url(experiment_dir: Path) -> str:
    return f"sqlite:///{Path(experiment_dir).resolve() / STUDY_FILE}"


def study_name(search_name: str, part_name: str) -> str:
    return f"{search_name}/{part_name}"


class TruthfulOptunaSearch(OptunaSearch):
    """`OptunaSearch` that reports epochs as steps and tells Optuna COMPLETE, PRUNED or FAIL as it was."""

    def __init__(self, *, max_epochs: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_epochs = max_epochs

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: a private attribute this Ray's OptunaSearch lacks.
        if name in RAY_PRIVATE_ATTRIBUTES:
            import ray

            raise RuntimeError(
                f"Ray {ray.__version__}'s OptunaSearch has no {name}, which dkd-tune's truthful searcher "
                "reads; install a Ray within dkd-tune's tested range (pyproject.toml)"
            )
        raise AttributeError(name)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        # So the study's trials can be matched with Ray's (optuna-dashboard, the tests).
        self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            return  # a late result of a finished trial: Optuna takes no report after `tell`
        trial = self._ot_trials[trial_id]
        stored = trial.storage.get_trial(trial._trial_id)
        # The epoch, not Ray's iteration count, which restarts when a trial resumes from a checkpoint.
        step = int(result["epoch"])
        # A resumed trial replays epochs from its checkpoint; a step is reported once (Optuna warns).
        if not stored.state.is_finished() and step not in stored.intermediate_values:
            trial.report(float(result[self.metric]), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        result = result or {}
        if not error and self.metric in result:
            self.on_trial_result(trial_id, result)  # Tune hands a trial's last result only to this hook
        if error or self.metric not in result:
            state, value = optuna.trial.TrialState.FAIL, None
        elif int(result["epoch"]) >= self.max_epochs:
            state, value = optuna.trial.TrialState.COMPLETE, float(result[self.metric])
        else:  # stopped early by the scheduler (or diverged): ranked by its step, then its last value
            state, value = optuna.trial.TrialState.PRUNED, None
        trial = self._ot_trials[trial_id]
        # A search killed after `tell` but before Tune saved its state resumes with a trial the study
        # has already finished (also in `on_trial_result`): what the study holds stays.
        if not trial.storage.get_trial(trial._trial_id).state.is_finished():
            self._ot_study.tell(trial, value, state=state)
        self._completed_trials.add(trial_id)
