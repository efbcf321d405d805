"""The grid's learning curves (every teacher, beta, seed and epoch) and what they say about ASHA's rungs and a search's speed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.beta_ground_truth import spearman
from dkd_tune.config.plan import BASELINE_PREFIX


@dataclass
class Curves:
    """Per-epoch accuracies of a grid: `val[teacher][beta index][seed]` is a list over epochs."""

    betas: np.ndarray
    seeds: list[int]
    val: dict[str, list[list[list[float]]]]
    test: dict[str, list[list[list[float]]]]

    @property
    def epochs(self) -> int:
        first = next(iter(self.val.values()))
        return len(first[0][0])


def curves_from_long(curves: pd.DataFrame) -> Curves:
    """The curves from the long table validate-beta writes (`curves.parquet`: one row per run and epoch)."""
    runs = curves[
        ~curves["part"].str.startswith(BASELINE_PREFIX) & curves["status"].isin(["completed", "diverged"])
    ]
    betas = np.array(sorted(runs["beta"].unique()), dtype=float)
    seeds = sorted(int(s) for s in runs["seed"].unique())
    val: dict[str, list] = {}
    test: dict[str, list] = {}
    for (teacher, beta, seed), run in runs.groupby(["teacher", "beta", "seed"]):
        j = int(np.argmin(np.abs(np.log2(betas) - math.log2(beta))))
        k = seeds.index(int(seed))
        val.setdefault(teacher, [[[] for _ in seeds] for _ in betas])
        test.setdefault(teacher, [[[] for _ in seeds] for _ in betas])
        ordered = run.sort_values("epoch")
        val[teacher][j][k] = [float(v) for v in ordered["val_acc"]]
        test[teacher][j][k] = [float(v) for v in ordered["test_acc"]]
    return Curves(betas, seeds, val, test)


def epochs_to_target(trials: pd.DataFrame, target_test_acc: float) -> float:
    """Trial-epochs spent until the incumbent (best full-budget trial on validation) reaches the target test top-1.

    Trials run one at a time in `order`; inf when the search never gets there.
    """
    spent, best_val, incumbent_test = 0, -math.inf, -math.inf
    for trial in trials.itertuples():
        spent += trial.epochs
        if trial.completed and trial.final_val_acc > best_val:
            best_val, incumbent_test = trial.final_val_acc, trial.final_test_acc
        if incumbent_test >= target_test_acc:
            return float(spent)
    return math.inf


def rung_correlations(curves: Curves, rungs: list[int]) -> pd.DataFrame:
    """Per candidate rung: the Spearman correlation, across the grid's betas, of validation top-1 at that epoch
    with the final validation top-1, for every teacher and seed (median, min and max over them).

    ASHA keeps the trials that rank high at a rung; that is worth something only where the ranking at
    the rung predicts the final one.
    """
    rows = []
    for rung in rungs:
        if not 1 <= rung <= curves.epochs:
            continue
        values = []
        for per_beta in curves.val.values():
            for k in range(len(curves.seeds)):
                early = [
                    per_beta[j][k][rung - 1] for j in range(len(curves.betas)) if len(per_beta[j][k]) >= rung
                ]
                final = [per_beta[j][k][-1] for j in range(len(curves.betas)) if len(per_beta[j][k]) >= rung]
                if len(early) >= 3:
                    rho = spearman(early, final)
                    if not math.isnan(rho):
                        values.append(rho)
        if values:
            rows.append(
                {
                    "rung (epoch)": rung,
                    "median Spearman": float(np.median(values)),
                    "min": float(np.min(values)),
                    "max": float(np.max(values)),
                    "teacher-seed pairs": len(values),
                }
            )
    return pd.DataFrame(rows)
