"""Searches replayed without Ray: Optuna's ask/tell and an ASHA that decides exactly as Ray Tune's does, on a
grid's stored learning curves, so thousands of searches run in minutes (benchmarks/search_efficiency.py).

`dkd_tune.search.replay` runs the real Ray Tune on replayed trials, a few seconds per search. This
module makes the same decisions with the same Optuna sampler and no Ray: trials run one at a time
(as the replays do), each reports its stored validation accuracy epoch by epoch, and

- `AshaRungs` is Ray's `ASHAScheduler` with one bracket: the same milestones (grace period times
  powers of the reduction factor up to `max_t`), the same cutoff (the `1 - 1/rf` percentile of the
  earlier trials' values recorded at the rung), a trial stopped at `max_t`;
- the searcher side is dkd-tune's `TruthfulOptunaSearch` (every epoch reported, told COMPLETE only
  at the full budget, PRUNED otherwise) or Ray's own `OptunaSearch` (results reported while the
  trial continues, every trial told COMPLETE with its last value), as Ray Tune calls them: a result
  that the scheduler stops is not passed to the searcher's `on_trial_result`, only to its
  `on_trial_complete`.

`tests/test_search_simulation.py` checks that the two make the same decisions on the same curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import optuna

from analysis.grid_curves import Curves

TRUTHFUL = "truthful"  # dkd-tune's TruthfulOptunaSearch
RAY_DEFAULT = "ray_default"  # Ray's OptunaSearch as a user would wire it


class AshaRungs:
    """Ray Tune's asynchronous successive halving with one bracket (its `_Bracket` bookkeeping)."""

    def __init__(self, grace_period: int, reduction_factor: float, max_t: int):
        self.rf = reduction_factor
        self.max_t = max_t
        count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
        self.rungs: list[tuple[float, dict[int, float]]] = [
            (grace_period * reduction_factor**k, {}) for k in reversed(range(count))
        ]

    def on_result(self, trial: int, epoch: int, value: float) -> bool:
        """Whether the trial stops after this result (Ray's `on_trial_result`)."""
        if epoch >= self.max_t:
            return True
        return self._record(trial, epoch, value)

    def on_complete(self, trial: int, epoch: int, value: float) -> None:
        """Ray's `on_trial_complete`: the last result is recorded at any rung it reached and missed."""
        self._record(trial, epoch, value)

    def _record(self, trial: int, epoch: int, value: float) -> bool:
        for milestone, recorded in self.rungs:
            if epoch < milestone or trial in recorded:
                continue
            cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100) if recorded else None
            recorded[trial] = value
            return cutoff is not None and value < cutoff
        return False


@dataclass
class SimulatedTrial:
    """One trial of a simulated search: what it was given, what it read, how far it ran."""

    number: int
    beta: float
    grid_index: int
    seed_index: int
    epochs: int  # epochs it ran (the compute it cost)
    final_val_acc: float
    completed: bool  # ran the full budget
    component: str = ""  # the prior-guided sampler's proposal, if any


@dataclass
class SimulatedSearch:
    trials: list[SimulatedTrial] = field(default_factory=list)

    @property
    def trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    def chosen(self) -> SimulatedTrial | None:
        """The search's answer: its best full-budget trial on the validation split."""
        completed = [t for t in self.trials if t.completed]
        return max(completed, key=lambda t: t.final_val_acc) if completed else None


def simulate_search(
    curves: Curves,
    teacher: str,
    sampler: optuna.samplers.BaseSampler,
    *,
    beta_range: tuple[float, float],
    num_samples: int,
    grace_period: int,
    reduction_factor: float,
    searcher: str = TRUTHFUL,
    first_points: Sequence[dict[str, float]] = (),
    seed_of_trial: Callable[[int], int] = lambda number: 0,
    max_trial_epochs: int | None = None,
) -> SimulatedSearch:
    """Run one search over beta on `teacher`'s stored curves; trial `n` reads grid seed `seed_of_trial(n)`.

    Stops after `num_samples` trials, or once `max_trial_epochs` have been spent (the trial running
    then finishes first, as a running trial would).
    """
    max_t = curves.epochs
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=optuna.pruners.NopPruner())
    for point in first_points:
        study.enqueue_trial(dict(point))
    space = {"beta": optuna.distributions.FloatDistribution(*beta_range, log=True)}
    asha = AshaRungs(grace_period, reduction_factor, max_t)
    log2_betas = np.log2(curves.betas)
    search = SimulatedSearch()
    for _ in range(num_samples):
        if max_trial_epochs is not None and search.trial_epochs >= max_trial_epochs:
            break
        trial = study.ask(space)
        beta = float(trial.params["beta"])
        j = int(np.argmin(np.abs(log2_betas - math.log2(beta))))
        k = seed_of_trial(trial.number)
        values = curves.val[teacher][j][k]
        epoch, value = _run_trial(trial, values, asha, searcher)
        _tell(study, trial, epoch, value, max_t, searcher)
        search.trials.append(
            SimulatedTrial(
                number=trial.number,
                beta=beta,
                grid_index=j,
                seed_index=k,
                epochs=epoch,
                final_val_acc=value,
                completed=epoch >= max_t,
                component=str(
                    study.get_trials(deepcopy=False)[trial.number].user_attrs.get("prior_component", "")
                ),
            )
        )
    return search


def _run_trial(
    trial: optuna.Trial, values: Sequence[float], asha: AshaRungs, searcher: str
) -> tuple[int, float]:
    """Report epochs until ASHA stops the trial or its curve ends; (last epoch, its value)."""
    epoch, value, reported = 0, math.nan, False
    for epoch, value in enumerate(values, start=1):
        reported = False
        if asha.on_result(trial.number, epoch, float(value)):
            break
        trial.report(float(value), epoch)  # the searcher hears only results the trial continues after
        reported = True
    asha.on_complete(trial.number, epoch, float(value))
    if searcher == TRUTHFUL and not reported:
        trial.report(float(value), epoch)  # TruthfulOptunaSearch reports the last result on completion
    return epoch, float(value)


def _tell(
    study: optuna.Study, trial: optuna.Trial, epoch: int, value: float, max_t: int, searcher: str
) -> None:
    # Ray's OptunaSearch calls every trial complete; the truthful searcher only a full-budget one.
    if searcher == RAY_DEFAULT or epoch >= max_t:
        study.tell(trial, value, state=optuna.trial.TrialState.COMPLETE)
    else:
        study.tell(trial, None, state=optuna.trial.TrialState.PRUNED)
