"""Replayed searches: the real Ray Tune + Optuna + ASHA machinery run on a beta grid's stored learning curves, in seconds.

A replayed trial does not train: it looks up the grid run of the nearest grid beta (in octaves)
for its seed and reports that run's per-epoch validation and test accuracy, one epoch per
report, exactly as a training trial would. So the searcher and the scheduler make the decisions
they would make on real runs (the practice of tabular HPO benchmarks such as LCBench and
NAS-Bench-201), and the compute a search spends is counted in trial-epochs.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analysis.grid_curves import Curves
from dkd_tune.config.schema import SearchSpaceFile

if TYPE_CHECKING:
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import SearchAlgorithm, Searcher


def replay_trial(config: dict[str, Any], curves: Curves, teacher: str, seed_index: int) -> None:
    """The trainable: report the stored curve of the nearest grid beta, one epoch at a time."""
    from ray import tune

    started = time.time()  # trials run one at a time: their start times order them
    j = int(np.argmin(np.abs(np.log2(curves.betas) - math.log2(float(config["beta"])))))
    val, test = curves.val[teacher][j][seed_index], curves.test[teacher][j][seed_index]
    for epoch, (v, t) in enumerate(zip(val, test, strict=True), start=1):
        tune.report(
            {
                "epoch": epoch,
                "val_acc": v,
                "test_acc": t,
                "grid_beta": float(curves.betas[j]),
                "started": started,
            }
        )


@dataclass
class ReplayedSearch:
    teacher: str
    seed_index: int
    chosen_beta: float  # the grid beta of the best full-budget trial on the validation split
    trial_epochs: int  # epochs reported by all trials: the search's compute
    trials: pd.DataFrame  # per trial: beta, grid beta, epochs, final val acc, completed


def replay_search(
    space: SearchSpaceFile,
    curves: Curves,
    teacher: str,
    seed_index: int,
    *,
    beta_range: tuple[float, float],
    prior: tuple[float, float] | None = None,
    search_seed: int | None = None,
) -> ReplayedSearch:
    """One search over beta for `teacher` as dkd-tune runs it, replayed on the curves of grid seed `seed_index`.

    `space` is the validation's search file: its `search` (trials, TPE seed) and `scheduler` (ASHA
    rungs) settings are those a real search of the file would use; `prior` is (centre beta, spread in
    octaves), a prior for the prior-guided sampler as `beta: auto` gives one. The searcher's seed is the file's plus `search_seed` (default: the seed index), so
    repeated searches differ as real ones would.
    """
    from dkd_tune.search.tuner import asha_scheduler, search_algorithm

    searched = {"beta": replay_distribution(beta_range, prior)}
    seeded = replay_space(space, seed_index if search_seed is None else search_seed)
    epochs = curves.epochs
    searcher, param_space, num_samples = search_algorithm(seeded, searched, max_epochs=epochs)
    return run_replay(
        curves, teacher, seed_index, searcher, asha_scheduler(seeded, epochs), num_samples, param_space
    )


def replay_distribution(beta_range: tuple[float, float], prior: tuple[float, float] | None = None):
    """The searched beta of a replayed search: log-uniform over the range, with `beta: auto`'s prior if given."""
    from dkd_tune.config.schema import Distribution

    belief = None if prior is None else {"centre": float(prior[0]), "spread": float(prior[1])}
    return Distribution(loguniform=[float(beta_range[0]), float(beta_range[1])], prior=belief)


def replay_space(space: SearchSpaceFile, search_seed: int) -> SearchSpaceFile:
    """The validation's search file as a replay runs it: chosen on val_acc, trials one at a time, the
    searcher's seed the file's plus `search_seed`."""
    return space.model_copy(
        update={
            "metric": "val_acc",
            "search": space.search.model_copy(
                update={"seed": space.search.seed + search_seed, "max_concurrent_trials": 1}
            ),
        }
    )


def run_replay(
    curves: Curves,
    teacher: str,
    seed_index: int,
    searcher: Searcher | SearchAlgorithm,
    scheduler: TrialScheduler | None,
    num_samples: int,
    param_space: dict | None = None,
) -> ReplayedSearch:
    """Run Ray Tune with `searcher` and `scheduler` on replayed trials, one at a time; the trials in their order."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="dkd-replay-") as storage:
        tuner = tune.Tuner(
            tune.with_parameters(replay_trial, curves=curves, teacher=teacher, seed_index=seed_index),
            param_space=param_space or {},
            tune_config=tune.TuneConfig(
                metric="val_acc",
                mode="max",
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=num_samples,
                max_concurrent_trials=1,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                storage_path=str(Path(storage)), name="replay", verbose=0, log_to_file=False
            ),
        )
        results = tuner.fit()
        rows = []
        for result in results:
            history = result.metrics_dataframe
            if history is None or history.empty:
                continue
            last = history.iloc[-1]
            rows.append(
                {
                    "order": float(last["started"]),
                    "beta": float(result.config["beta"]),
                    "grid_beta": float(last["grid_beta"]),
                    "epochs": int(last["epoch"]),
                    "final_val_acc": float(last["val_acc"]),
                    "final_test_acc": float(last["test_acc"]),
                    "completed": int(last["epoch"]) == curves.epochs,
                }
            )
    trials = pd.DataFrame(rows)
    if not trials.empty:
        trials = trials.sort_values("order").reset_index(drop=True)
    completed = trials[trials["completed"]] if not trials.empty else trials
    best = completed.loc[completed["final_val_acc"].idxmax()] if not completed.empty else None
    return ReplayedSearch(
        teacher=teacher,
        seed_index=seed_index,
        chosen_beta=float(best["grid_beta"]) if best is not None else float("nan"),
        trial_epochs=int(trials["epochs"].sum()) if not trials.empty else 0,
        trials=trials,
    )
