"""Replayed searches: real Ray Tune + Optuna + ASHA on stored learning curves, and the compute-to-target count."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.grid_curves import Curves, epochs_to_target, rung_correlations
from dkd_tune.config.loading import load_search_space
from dkd_tune.search.replay import replay_search
from tests.test_search_e2e import tiny_space

BETAS = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
EPOCHS = 8


def made_up_curves() -> Curves:
    """One teacher, two seeds: beta 2 is best at the end, beta 8 leads early and fades (a trap for early rungs)."""
    final = {0.5: 60.0, 1.0: 66.0, 2.0: 70.0, 4.0: 64.0, 8.0: 50.0}
    val, test = [], []
    for beta in BETAS:
        per_seed_val, per_seed_test = [], []
        for seed in range(2):
            end = final[beta] + seed
            start = 45.0 if beta == 8.0 else 30.0
            curve = [start + (end - start) * epoch / EPOCHS for epoch in range(1, EPOCHS + 1)]
            per_seed_val.append(curve)
            per_seed_test.append([value - 1.0 for value in curve])
        val.append(per_seed_val)
        test.append(per_seed_test)
    return Curves(BETAS, [0, 1], {"t": val}, {"t": test})


def test_epochs_to_target_counts_until_the_incumbent_reaches_it():
    trials = pd.DataFrame(
        {
            "order": [0, 1, 2, 3],
            "epochs": [8, 2, 8, 8],
            "completed": [True, False, True, True],
            "final_val_acc": [60.0, 99.0, 70.0, 65.0],
            "final_test_acc": [59.0, 98.0, 69.0, 80.0],
        }
    )
    assert epochs_to_target(trials, 69.0) == 18  # the stopped trial counts as spent, never as incumbent
    assert epochs_to_target(trials, 59.0) == 8
    # The last trial is not the incumbent (validation 65 < 70): its better test top-1 is never seen.
    assert epochs_to_target(trials, 75.0) == math.inf


def test_a_replayed_search_starts_at_its_priors_centre_prunes_and_chooses_on_validation(tmp_path):
    space = load_search_space(
        tiny_space(
            tmp_path,
            overrides={"epochs": EPOCHS, "lr_milestones": [6], "warmup_epochs": 1, "batch_size": 32},
            search={"algorithm": "optuna", "seed": 0, "num_samples": 6, "max_concurrent_trials": 1},
            scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2},
        )
    )
    import ray

    try:
        search = replay_search(space, made_up_curves(), "t", 1, beta_range=(0.5, 8.0), prior=(2.1, 1.0))
    finally:
        ray.shutdown()  # Tune started Ray in this process; later tests start their own
    trials = search.trials
    assert len(trials) == 6 and trials["order"].tolist() == sorted(trials["order"])
    assert trials.loc[0, "beta"] == pytest.approx(2.1) and trials.loc[0, "grid_beta"] == 2.0
    assert trials.loc[0, "final_val_acc"] == pytest.approx(71.0)  # seed index 1's curve
    assert (~trials["completed"]).any() and trials.loc[~trials["completed"], "epochs"].max() < EPOCHS
    completed = trials[trials["completed"]]
    assert search.chosen_beta == completed.loc[completed["final_val_acc"].idxmax(), "grid_beta"]
    assert search.trial_epochs == trials["epochs"].sum()


def test_rung_correlations_say_where_early_accuracy_ranks_the_betas():
    table = rung_correlations(made_up_curves(), [1, 4, 8, 99]).set_index("rung (epoch)")
    assert list(table.index) == [1, 4, 8]  # rungs past the budget are left out
    assert table.loc[8, "median Spearman"] == pytest.approx(1.0)
    assert table.loc[1, "median Spearman"] < table.loc[4, "median Spearman"]
