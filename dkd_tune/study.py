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


def study_storage_url(experiment_dir: Path) -> str:
    return f"sqlite:///{Path(experiment_dir).resolve() / STUDY_FILE}"


def study_name(search_name: str, part_name: str) -> str:
    return f"{search_name}/{part_name}"


class TruthfulOptunaSearch(OptunaSearch):
    """`OptunaSearch` that reports epochs as steps and tells Optuna COMPLETE, PRUNED or FAIL as it was."""

    def __init__(self, *args: Any, max_epochs: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if trial is not None:  # so the study's trials can be matched with Ray's (dashboard, tests)
            trial.set_user_attr(RAY_TRIAL_ID_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric)
        if value is None:
            return
        # The epoch, not Ray's iteration count: a trial resumed from a checkpoint keeps its steps.
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        trial = self._ot_trials[trial_id]
        # A resumed trial replays epochs from its checkpoint; a step is reported once (Optuna warns).
        if step not in trial.storage.get_trial(trial._trial_id).intermediate_values:
            trial.report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        trial = self._ot_trials[trial_id]
        value = (result or {}).get(self.metric)
        epochs = int((result or {}).get("epoch", 0) or 0)
        if error or value is None:
            self._ot_study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif epochs >= self.max_epochs:
            self._ot_study.tell(trial, float(value), state=optuna.trial.TrialState.COMPLETE)
        else:  # stopped early by the scheduler (or diverged): ranked by its step, then its last value
            self._ot_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)
