"""The ground truth of a beta validation: a teacher x beta x seed grid of full runs, and the regret of each way to pick beta on it.

Every accuracy here is a final-epoch accuracy of a run that trained its full budget. A method
picks a beta for a teacher from the validation split (or, for auto-beta, from the other teachers
alone); the *oracle* beta is the grid beta with the best mean validation accuracy over the seeds;
regret = mean test top-1 at the oracle's beta - mean test top-1 at the method's beta, paired by
seed, so the test split only ever reports.

Methods compared:
- auto-beta: the response surface (`dkd_tune.teacher.beta_surface`) refitted without the teacher
  (leave-one-teacher-out), its predicted peak snapped to the nearest grid beta;
- constant: the same fit with the slope held at 0 (one beta for every teacher);
- search: the beta each replayed ASHA-pruned Optuna search chose (given per teacher and seed).

The bootstrap resamples teachers and seeds with replacement and refits both models inside
every resample, so the interval counts the calibration's own uncertainty, not only the test noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dkd_tune.config.plan import BASELINE_PREFIX
from dkd_tune.core.errors import UserInputError
from dkd_tune.teacher.beta_surface import fit_surface, nearest_grid_index


@dataclass
class BetaGrid:
    """Final accuracies of a teacher x beta x seed grid (every cell present)."""

    teachers: list[str]
    gaps: np.ndarray  # (T,)
    betas: np.ndarray  # (B,), ascending
    seeds: list[int]
    val: np.ndarray  # (T, B, S) final validation top-1, %
    test: np.ndarray  # (T, B, S) final test top-1, %
    teacher_test_acc: dict[str, float]
    student_alone: dict[str, float]  # "val"/"test" means of the CE-only student, when it ran

    @property
    def log2_betas(self) -> np.ndarray:
        return np.log2(self.betas)

    def noise_variance(self, seeds: np.ndarray | None = None) -> float:
        """Variance of one cell's validation mean: the mean over cells of the seed variance / seeds."""
        val = self.val if seeds is None else self.val[:, :, seeds]
        if val.shape[2] < 2:
            return float("nan")
        return float(val.var(axis=2, ddof=1).mean() / val.shape[2])


def grid_from_results(frame: pd.DataFrame, teacher_test_acc: dict[str, float] | None = None) -> BetaGrid:
    """The grid from a grid search's results table; one line naming the first missing or failed cell."""
    runs = frame[~frame["part"].str.startswith(BASELINE_PREFIX)]
    betas = np.array(sorted(runs["beta"].dropna().unique()), dtype=float)
    seeds = sorted(int(s) for s in runs["seed"].dropna().unique())
    teachers = sorted(runs["teacher"].dropna().unique(), key=lambda t: float(_first(runs, t, "teacher_gap")))
    shape = (len(teachers), len(betas), len(seeds))
    val, test = np.full(shape, np.nan), np.full(shape, np.nan)
    for row in runs.itertuples():
        # A diverged run is a valid cell: its last accuracies are what that beta gives.
        if row.status not in ("completed", "diverged"):
            continue
        i, j, k = teachers.index(row.teacher), _index(betas, row.beta), seeds.index(int(row.seed))
        val[i, j, k], test[i, j, k] = row.final_val_acc, row.final_test_acc
    missing = np.argwhere(np.isnan(val) | np.isnan(test))
    if len(missing):
        i, j, k = missing[0]
        raise UserInputError(
            f"the grid has no completed run with a validation accuracy for teacher {teachers[i]!r}, beta "
            f"{betas[j]:g}, seed {seeds[k]} ({len(missing)} of {val.size} cells missing); resume the grid search"
        )
    baseline = frame[frame["part"].str.startswith(BASELINE_PREFIX) & (frame["status"] == "completed")]
    student_alone = {}
    if not baseline.empty:
        student_alone = {
            "val": float(baseline["final_val_acc"].mean()),
            "test": float(baseline["final_test_acc"].mean()),
        }
    return BetaGrid(
        teachers=list(teachers),
        gaps=np.array([float(_first(runs, t, "teacher_gap")) for t in teachers]),
        betas=betas,
        seeds=seeds,
        val=val,
        test=test,
        teacher_test_acc=dict(teacher_test_acc or {}),
        student_alone=student_alone,
    )


def _first(frame: pd.DataFrame, teacher: str, column: str):
    return frame.loc[frame["teacher"] == teacher, column].iloc[0]


def _index(betas: np.ndarray, beta: float) -> int:
    return int(np.argmin(np.abs(np.log2(betas) - math.log2(beta))))


# ------------------------------------------------------------------------------------------------
# Picks and regrets


def oracle_picks(grid: BetaGrid, teachers: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Per teacher (of `teachers`), the grid index with the best mean validation accuracy over `seeds`."""
    return grid.val[teachers][:, :, seeds].mean(axis=2).argmax(axis=1)


def loo_picks(grid: BetaGrid, teachers: np.ndarray, seeds: np.ndarray, *, constant: bool) -> np.ndarray:
    """Per teacher, the grid index the model fitted on the OTHER teachers (of the resample) predicts."""
    cell_means = grid.val[:, :, seeds].mean(axis=2)
    noise = grid.noise_variance(seeds) if len(seeds) > 1 else None
    picks = np.empty(len(teachers), dtype=int)
    for position, teacher in enumerate(teachers):
        others = teachers[teachers != teacher]
        if len(np.unique(others)) == 0:
            picks[position] = -1
            continue
        fit = fit_surface(
            grid.gaps[others],
            grid.log2_betas,
            cell_means[others],
            noise_variance=None if noise is None or not math.isfinite(noise) else noise,
            constant=constant,
        )
        peak, _ = fit.peak(float(grid.gaps[teacher]))
        picks[position] = nearest_grid_index(peak, grid.log2_betas)
    return picks


def regrets(grid: BetaGrid, teachers: np.ndarray, seeds: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """(len(teachers), len(seeds)): test top-1 at the oracle's beta minus at the pick, seed by seed.

    `picks` is one index per teacher, or one per (teacher, seed) for methods that pick per seed.
    """
    oracle = oracle_picks(grid, teachers, seeds)
    test = grid.test[teachers][:, :, seeds]  # (t, B, s)
    rows = np.arange(len(teachers))[:, None]
    columns = np.arange(len(seeds))[None, :]
    at_oracle = test[rows, oracle[:, None], columns]
    chosen = picks[:, None] if picks.ndim == 1 else picks
    return at_oracle - test[rows, chosen, columns]


@dataclass
class MethodComparison:
    """Per-teacher picks and regrets of each method, and the bootstrap intervals of the differences."""

    table: pd.DataFrame  # one row per teacher
    mean_regret: dict[str, float]
    differences: dict[str, tuple[float, float, float]]  # "autobeta-constant": (mean, low, high)
    resamples: int
    # The gap-beta relation: octaves the fitted peak moves per unit of gap, fitted on every
    # teacher, with the 95% interval of the same bootstrap: (estimate, low, high).
    slope: tuple[float, float, float] = (math.nan, math.nan, math.nan)


def compare_methods(
    grid: BetaGrid,
    *,
    search_picks: np.ndarray | None = None,
    search_epochs: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> MethodComparison:
    """Leave-one-teacher-out auto-beta vs the constant (vs the replayed search) on the grid, with 95% intervals."""
    teachers = np.arange(len(grid.teachers))
    seeds = np.arange(len(grid.seeds))
    oracle = oracle_picks(grid, teachers, seeds)
    picks = {
        "autobeta": loo_picks(grid, teachers, seeds, constant=False),
        "constant": loo_picks(grid, teachers, seeds, constant=True),
    }
    if search_picks is not None:
        picks["search"] = np.asarray(search_picks, dtype=int)
    regret = {name: regrets(grid, teachers, seeds, p) for name, p in picks.items()}
    rows = []
    for i, teacher in enumerate(grid.teachers):
        row = {
            "teacher": teacher,
            "gap": grid.gaps[i],
            "teacher_test_acc": grid.teacher_test_acc.get(teacher, np.nan),
            "oracle_beta": grid.betas[oracle[i]],
            "oracle_test_acc": grid.test[i, oracle[i]].mean(),
            "oracle_test_sd": grid.test[i, oracle[i]].std(ddof=1) if len(seeds) > 1 else np.nan,
            "best_test_beta": grid.betas[grid.test[i].mean(axis=1).argmax()],
        }
        for name in ("autobeta", "constant"):
            row[f"{name}_beta"] = grid.betas[picks[name][i]]
            row[f"{name}_regret"] = regret[name][i].mean()
        if "search" in picks:
            row["search_betas"] = " ".join(f"{grid.betas[j]:g}" for j in picks["search"][i])
            row["search_regret"] = regret["search"][i].mean()
            if search_epochs is not None:
                row["search_epochs"] = float(np.mean(search_epochs[i]))
        rows.append(row)
    table = pd.DataFrame(rows)
    mean_regret = {name: float(r.mean()) for name, r in regret.items()}
    pairs = [("autobeta", "constant")] + ([("autobeta", "search")] if "search" in picks else [])
    samples = {f"{a}-{b}": [] for a, b in pairs}
    slopes = []
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        t = rng.choice(teachers, len(teachers), replace=True)
        s = rng.choice(seeds, len(seeds), replace=True)
        if len(np.unique(t)) < 3:
            continue  # a fit needs at least 2 other teachers
        sample_picks = {
            "autobeta": loo_picks(grid, t, s, constant=False),
            "constant": loo_picks(grid, t, s, constant=True),
        }
        if "search" in picks:
            sample_picks["search"] = picks["search"][t][:, s]
        mean = {name: regrets(grid, t, s, p).mean() for name, p in sample_picks.items()}
        for a, b in pairs:
            samples[f"{a}-{b}"].append(mean[a] - mean[b])
        slopes.append(gap_slope(grid, t, s))
    differences = {}
    for a, b in pairs:
        values = np.array(samples[f"{a}-{b}"])
        differences[f"{a}-{b}"] = (
            mean_regret[a] - mean_regret[b],
            float(np.percentile(values, 2.5)) if len(values) else np.nan,
            float(np.percentile(values, 97.5)) if len(values) else np.nan,
        )
    slope = (
        gap_slope(grid, teachers, seeds),
        float(np.percentile(slopes, 2.5)) if slopes else np.nan,
        float(np.percentile(slopes, 97.5)) if slopes else np.nan,
    )
    return MethodComparison(table, mean_regret, differences, len(samples["autobeta-constant"]), slope)


def gap_slope(grid: BetaGrid, teachers: np.ndarray, seeds: np.ndarray) -> float:
    """The surface's slope (octaves of peak per unit of gap) fitted on `teachers` over `seeds`."""
    noise = grid.noise_variance(seeds) if len(seeds) > 1 else math.nan
    fit = fit_surface(
        grid.gaps[teachers],
        grid.log2_betas,
        grid.val[teachers][:, :, seeds].mean(axis=2),
        noise_variance=noise if math.isfinite(noise) else None,
    )
    return fit.slope


def verdict(differences: dict[str, tuple[float, float, float]], key: str, other: str) -> str:
    """One plain sentence: auto-beta beats `other` only when the whole interval is below 0."""
    mean, low, high = differences[key]
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"No interval could be computed for auto-beta vs {other}."
    if high < 0:
        return (
            f"Auto-beta beats {other}: its regret is lower by {-mean:.2f} points "
            f"(95% interval {-high:.2f} to {-low:.2f})."
        )
    if low > 0:
        return (
            f"Auto-beta is worse than {other}: its regret is higher by {mean:.2f} points "
            f"(95% interval {low:.2f} to {high:.2f})."
        )
    return (
        f"Auto-beta does not beat {other}: the regret difference is {mean:+.2f} points and its 95% interval "
        f"({low:+.2f} to {high:+.2f}) includes 0."
    )


def relation_verdict(slope: tuple[float, float, float], gaps: np.ndarray, betas: np.ndarray) -> str:
    """One plain sentence on the gap-beta relation, judged by how far the best beta moves across the
    teachers' gaps against the grid's step (the smallest move a pick can make):

    found when the 95% interval excludes 0 and reaches past one grid step; absent when the whole
    interval stays within one grid step either way; undecided otherwise.
    """
    estimate, low, high = slope
    if not (math.isfinite(low) and math.isfinite(high)):
        return "No interval could be computed for the gap-beta relation."
    span = float(np.max(gaps) - np.min(gaps))
    step = float(np.min(np.diff(np.log2(np.sort(betas)))))
    move, move_low, move_high = estimate * span, low * span, high * span
    text = (
        f"across the teachers' gaps ({np.min(gaps):.2f} to {np.max(gaps):.2f}) the best beta's peak moves "
        f"{move:+.1f} octaves (95% interval {move_low:+.1f} to {move_high:+.1f}; {estimate:+.2f} octaves per "
        f"unit of gap), against a grid step of {step:g} octave{'s' if step != 1 else ''}"
    )
    if -step < move_low and move_high < step:
        return f"No gap-beta relation of practical size: {text}; the whole interval stays within one step."
    if (move_low > 0 or move_high < 0) and max(abs(move_low), abs(move_high)) >= step:
        return f"A gap-beta relation is found: {text}; the interval excludes 0."
    return f"The evidence does not decide on a gap-beta relation: {text}."


def ranking_agreement(short: BetaGrid, long: BetaGrid) -> pd.DataFrame:
    """Per teacher in both grids: Spearman correlation of the betas' mean validation accuracy at the two budgets."""
    rows = []
    for teacher in short.teachers:
        if teacher not in long.teachers:
            continue
        a = short.val[short.teachers.index(teacher)].mean(axis=1)
        b = long.val[long.teachers.index(teacher)].mean(axis=1)
        rows.append(
            {
                "teacher": teacher,
                "spearman": spearman(a, b),
                "best_beta_short": short.betas[a.argmax()],
                "best_beta_long": long.betas[b.argmax()],
            }
        )
    return pd.DataFrame(rows)


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
