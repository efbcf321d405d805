"""The ground truth of a beta validation: a teacher x beta x seed grid of full runs, and the regret of each way to pick beta on it.

Every accuracy here is a final-epoch accuracy of a run that trained its full budget. A method
picks a beta for a teacher from the validation split (or, for auto-beta, from the other teachers
alone); the *oracle* beta is the grid beta with the best mean validation accuracy over the seeds;
regret = mean test top-1 at the oracle's beta - mean test top-1 at the method's beta, paired by
seed, so the test split only ever reports.

Methods compared (search_spaces/validate_cnn.protocol.md):
- auto-beta: the hierarchical model (`dkd_tune.teacher.beta_model`) fitted without the held-out
  teacher (leave one teacher out) or without its whole architecture (leave one architecture out),
  its feature chosen inside the fold, its pick the grid beta of least expected regret;
- constant: the same model without a feature or an architecture effect (one beta for every teacher);
- beta 8: mdistiller's default;
- search: the beta each replayed ASHA-pruned Optuna search chose (given per teacher and seed).

The intervals resample teachers as clusters (each with all its seeds) over the held-out regrets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dkd_tune.config.plan import BASELINE_PREFIX
from dkd_tune.core.errors import UserInputError
from dkd_tune.teacher.beta_model import (
    FEATURES,
    CalibratedTeacher,
    feature_values,
    fit_beta_model,
    fit_teacher_curve,
    nearest_grid_index,
)
from dkd_tune.teacher.preparation import TeacherArtifacts


@dataclass
class BetaGrid:
    """Final accuracies of a teacher x beta x seed grid (every cell present), and what is known of each teacher."""

    teachers: list[str]
    gaps: np.ndarray  # (T,)
    betas: np.ndarray  # (B,), ascending
    seeds: list[int]
    val: np.ndarray  # (T, B, S) final validation top-1, %
    test: np.ndarray  # (T, B, S) final test top-1, %
    teacher_test_acc: dict[str, float]
    student_alone: dict[str, float]  # "val"/"test" means (and "test_sd") of the CE-only student, when it ran
    architectures: list[str] = field(default_factory=list)  # per teacher: its model name
    features: list[dict[str, float]] = field(
        default_factory=list
    )  # per teacher: auto-beta's candidate features

    def __post_init__(self) -> None:
        if not self.architectures:
            self.architectures = list(self.teachers)  # unknown: every teacher its own architecture
        if not self.features:
            self.features = [{"gap": float(g)} for g in self.gaps]

    @property
    def log2_betas(self) -> np.ndarray:
        return np.log2(self.betas)


def teacher_records(state_teachers: Mapping[str, TeacherArtifacts], student_alone_val: float | None):
    """(test top-1, architecture, features) per teacher label, from a search state's teacher artifacts."""
    test_acc, architectures, features = {}, {}, {}
    for label, artifact in state_teachers.items():
        architectures[label] = artifact.model
        if artifact.gap is None:
            continue
        stats = artifact.gap
        if math.isfinite(stats.test_acc):
            test_acc[label] = stats.test_acc
        features[label] = feature_values(stats, student_alone_val)
    return test_acc, architectures, features


def grid_from_results(
    frame: pd.DataFrame, state_teachers: Mapping[str, TeacherArtifacts] | None = None
) -> BetaGrid:
    """The grid from a grid search's results table (and its state's teacher artifacts, for each teacher's
    accuracy, architecture and features); one line naming the first missing or failed cell."""
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
            "test_sd": float(baseline["final_test_acc"].std(ddof=1)) if len(baseline) > 1 else math.nan,
        }
    test_acc, architectures, features = teacher_records(state_teachers or {}, student_alone.get("val"))
    return BetaGrid(
        teachers=list(teachers),
        gaps=np.array([float(_first(runs, t, "teacher_gap")) for t in teachers]),
        betas=betas,
        seeds=seeds,
        val=val,
        test=test,
        teacher_test_acc=test_acc,
        student_alone=student_alone,
        architectures=[architectures.get(t, t) for t in teachers] if architectures else [],
        features=[features.get(t, {"gap": float(_first(runs, t, "teacher_gap"))}) for t in teachers],
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


# ------------------------------------------------------------------------------------------------
# The model's teachers, its feature choice and its held-out predictions

FOLD_KINDS = {
    "teacher": "leave one teacher out (its architecture's other teachers stay in the fit)",
    "architecture": "leave one architecture out (none of its teachers in the fit)",
}
PREDICTIVE_COVERAGE = 0.8  # the predictive interval whose coverage the protocol checks
DEFAULT_BETA = 8.0  # mdistiller's DKD default for CIFAR-100


def calibrated_teachers(grid: BetaGrid) -> list[CalibratedTeacher]:
    """Each teacher's curve (fitted on its validation top-1 alone) with its architecture and features."""
    teachers = []
    for i, label in enumerate(grid.teachers):
        curve = fit_teacher_curve(grid.log2_betas, grid.val[i], seed=i)
        teachers.append(CalibratedTeacher(label, grid.architectures[i], grid.features[i], curve))
    return teachers


def candidate_features(teachers: Sequence[CalibratedTeacher]) -> list[str | None]:
    """None (no feature) and every feature measured for all of `teachers`."""
    return [None] + [
        name for name in FEATURES if all(math.isfinite(t.features.get(name, math.nan)) for t in teachers)
    ]


def log_score(train: Sequence[CalibratedTeacher], held_out: CalibratedTeacher, feature: str | None) -> float:
    """Log predictive density of the held-out teacher's fitted peak under the model fitted on `train`."""
    model = fit_beta_model(train, feature)
    predictive = model.predict(held_out.features, held_out.architecture)
    return predictive.log_density(held_out.curve.peak, held_out.curve.peak_se**2)


def folds(teachers: Sequence[CalibratedTeacher], kind: str) -> list[list[int]]:
    """The held-out index sets: one per teacher, or one per architecture."""
    if kind == "teacher":
        return [[i] for i in range(len(teachers))]
    if kind == "architecture":
        architectures = sorted({t.architecture for t in teachers})
        return [[i for i, t in enumerate(teachers) if t.architecture == a] for a in architectures]
    raise ValueError(f"fold kind must be one of {', '.join(FOLD_KINDS)}, got {kind!r}")


def feature_scores(teachers: Sequence[CalibratedTeacher], kind: str) -> dict[str | None, float]:
    """Per candidate feature, the mean held-out log score over `kind` folds (higher is better)."""
    scores: dict[str | None, list[float]] = {feature: [] for feature in candidate_features(teachers)}
    for held in folds(teachers, kind):
        train = [t for i, t in enumerate(teachers) if i not in held]
        if len(train) < 2:
            continue
        for feature in scores:
            scores[feature] += [log_score(train, teachers[j], feature) for j in held]
    return {feature: float(np.mean(values)) for feature, values in scores.items() if values}


def choose_feature(teachers: Sequence[CalibratedTeacher], kind: str = "teacher") -> str | None:
    """The candidate with the best held-out log score on `teachers` alone (ties: the earlier candidate);
    no feature when too few teachers are left to score one (each fold needs two to fit on)."""
    scores = feature_scores(teachers, kind)
    if not scores:
        return None
    return max(scores, key=lambda feature: (scores[feature], -list(scores).index(feature)))


@dataclass(frozen=True)
class HeldOutPrediction:
    """What the model fitted without a teacher predicted for it, and the picks made from it."""

    teacher: str
    kind: str  # a FOLD_KINDS key
    feature: str | None  # chosen inside the fold
    mean: float  # predictive mean of the peak, log2(beta)
    sd: float
    interval: tuple[
        float, float
    ]  # PREDICTIVE_COVERAGE interval of the grid's oracle (the peak rounded to the grid)
    peak_interval: tuple[float, float]  # ... of the teacher's fitted peak (measured with its own error)
    peak: float  # the teacher's own fitted peak
    peak_se: float
    oracle: float  # log2 of its oracle grid beta
    log_score: float
    autobeta_pick: int  # grid indices
    constant_pick: int

    @property
    def covers_oracle(self) -> bool:
        return self.interval[0] <= self.oracle <= self.interval[1]

    @property
    def covers_peak(self) -> bool:
        return self.peak_interval[0] <= self.peak <= self.peak_interval[1]

    @property
    def error(self) -> float:
        """Predicted mean minus the teacher's fitted peak, octaves."""
        return self.mean - self.peak


def held_out_predictions(
    grid: BetaGrid, teachers: Sequence[CalibratedTeacher], kind: str
) -> list[HeldOutPrediction]:
    """Auto-beta and the constant for every teacher, each fitted on its fold's training teachers only.

    Auto-beta's feature is chosen inside the fold (leave-one-teacher-out log score on the training
    teachers), so nothing of the held-out teacher takes part in the choice.
    """
    oracle = grid.val.mean(axis=2).argmax(axis=1)
    # The oracle is the peak rounded to the grid: a uniform error over one step, variance step^2 / 12.
    rounding = float(np.min(np.diff(grid.log2_betas))) ** 2 / 12
    predictions = []
    for held in folds(teachers, kind):
        train = [t for i, t in enumerate(teachers) if i not in held]
        if len(train) < 2:
            continue
        feature = choose_feature(train)
        model = fit_beta_model(train, feature)
        constant = fit_beta_model(train, None, uses_architecture=False)
        for j in held:
            teacher = teachers[j]
            predictive = model.predict(teacher.features, teacher.architecture)
            pick = predictive.pick(grid.log2_betas, model.k_left, model.k_right)
            constant_pick = constant.predict(None).pick(grid.log2_betas, constant.k_left, constant.k_right)
            predictions.append(
                HeldOutPrediction(
                    teacher=teacher.label,
                    kind=kind,
                    feature=feature,
                    mean=predictive.mean,
                    sd=predictive.sd,
                    interval=predictive.widened(rounding).interval(PREDICTIVE_COVERAGE),
                    peak_interval=predictive.widened(teacher.curve.peak_se**2).interval(PREDICTIVE_COVERAGE),
                    peak=teacher.curve.peak,
                    peak_se=teacher.curve.peak_se,
                    oracle=float(grid.log2_betas[oracle[j]]),
                    log_score=predictive.log_density(teacher.curve.peak, teacher.curve.peak_se**2),
                    autobeta_pick=nearest_grid_index(pick, grid.log2_betas),
                    constant_pick=nearest_grid_index(constant_pick, grid.log2_betas),
                )
            )
    return predictions


# ------------------------------------------------------------------------------------------------
# Regrets of the methods, with intervals from a bootstrap over teachers as clusters


@dataclass
class MethodComparison:
    """Per held-out teacher the picks and regrets of each method, their means and bootstrap intervals."""

    kind: str
    table: pd.DataFrame  # one row per teacher
    mean_regret: dict[str, tuple[float, float, float]]  # method -> (mean, low, high)
    differences: dict[str, tuple[float, float, float]]  # "autobeta-constant" -> (mean, low, high)
    predictions: list[HeldOutPrediction]
    resamples: int

    @property
    def coverage(self) -> float:
        """Share of held-out teachers whose oracle log2(beta) lies in the predictive interval."""
        return float(np.mean([p.covers_oracle for p in self.predictions])) if self.predictions else math.nan

    @property
    def peak_coverage(self) -> float:
        """Share of held-out teachers whose fitted peak lies in its predictive interval."""
        return float(np.mean([p.covers_peak for p in self.predictions])) if self.predictions else math.nan

    @property
    def rms_error(self) -> float:
        """Root-mean-square of (predicted mean - fitted peak), octaves."""
        errors = [p.error for p in self.predictions]
        return float(math.sqrt(np.mean(np.square(errors)))) if errors else math.nan


METHODS = ("autobeta", "constant", "beta8", "search")


def compare_methods(
    grid: BetaGrid,
    teachers: Sequence[CalibratedTeacher],
    kind: str,
    *,
    search_picks: np.ndarray | None = None,
    search_epochs: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> MethodComparison:
    """Held-out auto-beta vs the constant, beta 8 and the replayed search, per teacher and on average.

    Regret is paired by seed; the intervals resample teachers (clusters, each with all its seeds).
    """
    predictions = held_out_predictions(grid, teachers, kind)
    index = {label: i for i, label in enumerate(grid.teachers)}
    rows_of = np.array([index[p.teacher] for p in predictions])
    seeds = np.arange(len(grid.seeds))
    picks = {
        "autobeta": np.array([p.autobeta_pick for p in predictions]),
        "constant": np.array([p.constant_pick for p in predictions]),
        "beta8": np.full(len(predictions), int(np.argmin(np.abs(grid.betas - DEFAULT_BETA)))),
    }
    if search_picks is not None:
        picks["search"] = np.asarray(search_picks, dtype=int)[rows_of]
    per_teacher = {name: regrets(grid, rows_of, seeds, p).mean(axis=1) for name, p in picks.items()}
    oracle = grid.val.mean(axis=2).argmax(axis=1)
    rows = []
    for position, prediction in enumerate(predictions):
        i = rows_of[position]
        row = {
            "teacher": prediction.teacher,
            "architecture": grid.architectures[i],
            "gap": grid.gaps[i],
            "teacher_test_acc": grid.teacher_test_acc.get(prediction.teacher, np.nan),
            "oracle_beta": grid.betas[oracle[i]],
            "oracle_test_acc": grid.test[i, oracle[i]].mean(),
            "peak_beta": 2.0**prediction.peak,
            "feature": prediction.feature or "none",
            "predicted_beta": 2.0**prediction.mean,
            "interval": f"{2.0 ** prediction.interval[0]:.2g}-{2.0 ** prediction.interval[1]:.2g}",
            "covers_oracle": prediction.covers_oracle,
        }
        for name in picks:
            chosen = picks[name][position]
            row[f"{name}_beta"] = (
                " ".join(f"{grid.betas[j]:g}" for j in chosen) if np.ndim(chosen) else grid.betas[chosen]
            )
            row[f"{name}_regret"] = per_teacher[name][position]
        if search_epochs is not None:
            row["search_epochs"] = float(np.mean(np.asarray(search_epochs)[i]))
        rows.append(row)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(predictions), size=(resamples, len(predictions)))
    mean_regret = {name: _with_interval(values, samples) for name, values in per_teacher.items()}
    differences = {
        f"autobeta-{other}": _with_interval(per_teacher["autobeta"] - per_teacher[other], samples)
        for other in per_teacher
        if other != "autobeta"
    }
    return MethodComparison(kind, pd.DataFrame(rows), mean_regret, differences, predictions, resamples)


def _with_interval(values: np.ndarray, samples: np.ndarray) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the resampled means)."""
    means = values[samples].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def verdict(difference: tuple[float, float, float], other: str) -> str:
    """The protocol's rule for auto-beta minus `other` (regret, points), in one sentence."""
    mean, low, high = difference
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"No interval could be computed for auto-beta vs {other}."
    text = f"regret difference {mean:+.2f} points, 95% interval {low:+.2f} to {high:+.2f}"
    if high < 0:
        return f"Auto-beta beats {other} ({text})."
    if low > 0:
        return f"Auto-beta is worse than {other} ({text})."
    if mean <= 0:
        return f"Auto-beta is no worse than {other} ({text}; the interval includes 0)."
    return f"Auto-beta is not shown to be no worse than {other} ({text})."


# ------------------------------------------------------------------------------------------------
# Interventions: does the best beta move when only the gap is moved?


@dataclass(frozen=True)
class InterventionSeries:
    """The teachers made from one base teacher by varying one intervention, and where their peaks went."""

    base: str  # the base teacher (its checkpoint's teachers share it)
    kind: str  # "target_shift" or "scale"
    teachers: tuple[str, ...]
    values: tuple[float, ...]  # the intervention's value per teacher
    gaps: tuple[float, ...]
    peaks: tuple[float, ...]  # fitted peak, log2(beta)
    movement: tuple[float, float, float]  # octaves of peak movement across the series' gaps: (est, low, high)


def intervention_series(grid: BetaGrid, interventions: dict[str, dict], resamples: int = 1000, seed: int = 0):
    """Per base teacher and intervention kind, the peak's movement across the gaps, with a bootstrap over seeds.

    `interventions` maps each teacher to {"base": ..., "target_shift": ..., "scale": ..., "non_target": ...}.
    A series holds the base teacher's variants that differ from it in that one intervention only.
    """
    series = []
    bases = sorted({info["base"] for info in interventions.values()})
    rng = np.random.default_rng(seed)
    for base in bases:
        members = {t: info for t, info in interventions.items() if info["base"] == base}
        for kind, neutral in (("target_shift", 0.0), ("scale", 1.0)):
            other = "scale" if kind == "target_shift" else "target_shift"
            chosen = [
                t
                for t, info in members.items()
                if info["non_target"] == "as_is" and info[other] == (1.0 if other == "scale" else 0.0)
            ]
            values = [members[t][kind] for t in chosen]
            if len(set(values)) < 2 or neutral not in values:
                continue
            order = np.argsort(values)
            chosen = [chosen[k] for k in order]
            rows = np.array([grid.teachers.index(t) for t in chosen])
            gaps = grid.gaps[rows]
            estimate = _peak_movement(grid, rows, np.arange(len(grid.seeds)), gaps)
            boot = [
                _peak_movement(grid, rows, rng.integers(0, len(grid.seeds), len(grid.seeds)), gaps)
                for _ in range(resamples)
            ]
            peaks = tuple(fit_teacher_curve(grid.log2_betas, grid.val[i]).peak for i in rows)
            movement = (estimate, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))
            ordered_values = tuple(float(values[k]) for k in order)
            series.append(
                InterventionSeries(
                    base, kind, tuple(chosen), ordered_values, tuple(map(float, gaps)), peaks, movement
                )
            )
    return series


def _peak_movement(grid: BetaGrid, rows: np.ndarray, seeds: np.ndarray, gaps: np.ndarray) -> float:
    """Least-squares slope of the teachers' fitted peaks on their gaps, times the gaps' range (octaves)."""
    peaks = np.array(
        [fit_teacher_curve(grid.log2_betas, grid.val[i][:, seeds], replicates=2).peak for i in rows]
    )
    slope = np.polyfit(gaps, peaks, 1)[0]
    return float(slope * (gaps.max() - gaps.min()))


def movement_verdict(movement: tuple[float, float, float], step: float = 1.0) -> str:
    """The protocol's rule: moves when the interval excludes 0 and reaches past one grid step; does not
    move when the whole interval stays within one step; otherwise undecided."""
    estimate, low, high = movement
    text = f"{estimate:+.2f} octaves (95% interval {low:+.2f} to {high:+.2f}; grid step {step:g})"
    if -step < low and high < step:
        return f"does not move: {text}"
    if (low > 0 or high < 0) and max(abs(low), abs(high)) >= step:
        return f"moves with the gap: {text}"
    return f"undecided: {text}"


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
