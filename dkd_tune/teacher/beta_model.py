"""Auto-beta's model: each teacher's accuracy curve over log2(beta), and a hierarchical model of where its
peak lies (a confidence feature, an architecture effect, a teacher effect) that predicts a distribution.

Two levels, both in x = log2(beta):

1. **A teacher's curve.** Mean validation top-1 over a grid of betas is fitted by an asymmetric
   parabola, ``level - k_left (x - peak)^2`` left of the peak and ``level - k_right (x - peak)^2``
   right of it (curvatures >= 0). The peak's standard error comes from a parametric bootstrap of
   the fitted curve with the teacher's own cell noise, so a flat curve says "the peak could be
   anywhere" and weighs little below.
2. **Where peaks lie.** ``peak_i = a + b * feature_i + u_arch(i) + e_i`` with the peak's own
   measurement error added: u ~ N(0, tau_arch^2) per architecture, e ~ N(0, tau_teacher^2) per
   teacher. a, b and u are Gaussian given the taus (closed form); the taus (half-normal priors of
   one octave) are integrated on a grid. The slope's prior sd is one octave over the feature's
   calibrated range, so thin evidence falls back to one beta for all.

The prediction for a new teacher is a mixture of Gaussians over the tau grid: with the
architecture's posterior effect when its architecture was calibrated, with a fresh draw of it
when not. The *pick* minimises the expected loss ``k_left (peak - x)^2`` (x left of the peak) or
``k_right (x - peak)^2`` (right of it) under that distribution, so an asymmetric cliff pulls the
pick toward the gentle side. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dkd_tune.teacher.gap import LogitGapStats

PEAK_STEP = 0.05  # octaves between the candidate peaks of a curve fit
PEAK_MARGIN = 1.0  # octaves a fitted peak may lie beyond the grid's ends (a monotone curve)
CURVE_BOOTSTRAP = 300  # parametric replicates for a peak's standard error
TAU_GRID = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.65, 0.9, 1.25, 1.75, 2.5, 3.5])
TAU_PRIOR_SCALE = 1.0  # half-normal scale of both taus, octaves
INTERCEPT_PRIOR_SD = 4.0  # octaves: nearly flat over any sensible beta
SLOPE_PRIOR_OCTAVES = 1.0  # prior sd of the peak's movement across the feature's calibrated range

# The candidate features of auto-beta, each measured by the teacher's gap pass (dkd_tune.teacher.gap).
FEATURES = {
    "gap": "raw logit gap z_t - z_max",
    "standardized_gap": "gap / each image's logit sd",
    "non_target_entropy": "non-target entropy at T = 4 (nats)",
    "accuracy_margin": "teacher minus student-alone validation top-1 (points)",
}


def feature_values(stats: LogitGapStats, student_alone_val_acc: float | None) -> dict[str, float]:
    """The candidate features of a teacher from its gap pass (those measured; the accuracy margin needs
    the student trained alone, on the same validation split)."""
    values = {
        "gap": stats.mean,
        "standardized_gap": stats.standardized_mean,
        "non_target_entropy": stats.non_target_entropy,
        "accuracy_margin": (
            stats.val_acc - student_alone_val_acc if student_alone_val_acc is not None else math.nan
        ),
    }
    return {name: float(value) for name, value in values.items() if math.isfinite(value)}


# ------------------------------------------------------------------------------------------------
# Level 1: one teacher's curve


@dataclass(frozen=True)
class TeacherCurve:
    """An asymmetric parabola fitted to one teacher's accuracy over log2(beta), and its peak's error."""

    peak: float  # log2(beta) of the fitted peak
    peak_se: float  # octaves (parametric bootstrap)
    level: float  # accuracy at the peak
    k_left: float  # points per squared octave left of the peak (toward small beta)
    k_right: float  # right of it (toward large beta)
    noise_variance: float  # of one cell mean, the bootstrap's noise

    def loss(self, x: np.ndarray | float) -> np.ndarray:
        """Accuracy points lost at log2(beta) = x relative to the peak, by the fitted curve."""
        d = np.asarray(x, dtype=float) - self.peak
        return np.where(d < 0, self.k_left, self.k_right) * d * d


class _CurveFitter:
    """Least squares of the asymmetric parabola for many response vectors at once (same x grid).

    For every candidate peak and every pattern of active curvature constraints the coefficients are
    a fixed linear map of the responses, precomputed once; a fit is then a few matrix products.
    """

    def __init__(self, x: np.ndarray):
        self.x = np.asarray(x, dtype=float)
        self.peaks = np.arange(self.x.min() - PEAK_MARGIN, self.x.max() + PEAK_MARGIN + 1e-9, PEAK_STEP)
        d = self.x[None, :] - self.peaks[:, None]  # (P, B)
        left = np.where(d < 0, -(d * d), 0.0)
        right = np.where(d >= 0, -(d * d), 0.0)
        ones = np.ones_like(d)
        # Active sets: both curvatures free, left only, right only, none (a flat line).
        self.designs = np.stack(
            [
                np.stack([ones, left, right], axis=-1),
                np.stack([ones, left, np.zeros_like(d)], axis=-1),
                np.stack([ones, np.zeros_like(d), right], axis=-1),
                np.stack([ones, np.zeros_like(d), np.zeros_like(d)], axis=-1),
            ],
            axis=1,
        )  # (P, 4, B, 3)
        self.pinv = np.linalg.pinv(self.designs)  # (P, 4, 3, B)

    def fit(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For responses (R, B): the best (peak index, coefficients (level, k_left, k_right)) of each row."""
        y = np.atleast_2d(np.asarray(y, dtype=float))
        coefs = np.einsum("pscb,rb->rpsc", self.pinv, y)  # (R, P, 4, 3)
        fitted = np.einsum("psbc,rpsc->rpsb", self.designs, coefs)
        sse = ((fitted - y[:, None, None, :]) ** 2).sum(axis=-1)  # (R, P, 4)
        infeasible = (coefs[..., 1] < -1e-12) | (coefs[..., 2] < -1e-12)
        sse = np.where(infeasible, np.inf, sse)
        # Ties (a flat region of candidate peaks) go to the candidate nearest the grid's middle.
        centre_penalty = 1e-9 * np.abs(self.peaks - self.x.mean())[None, :, None]
        flat = (sse + centre_penalty).reshape(len(y), -1)
        best = flat.argmin(axis=1)
        p_index, s_index = np.unravel_index(best, sse.shape[1:])
        rows = np.arange(len(y))
        return p_index, np.clip(coefs[rows, p_index, s_index], [-np.inf, 0, 0], np.inf)


def fit_teacher_curve(
    log2_betas: Sequence[float], accuracy: np.ndarray, *, seed: int = 0, replicates: int = CURVE_BOOTSTRAP
) -> TeacherCurve:
    """The curve of one teacher from its (betas, seeds) accuracies (validation top-1, %).

    The noise of a cell mean is the teacher's own: its seed variance averaged over betas, divided
    by the number of seeds. The peak's standard error is the sd of the peaks refitted on
    `replicates` noisy copies of the fitted curve.
    """
    accuracy = np.asarray(accuracy, dtype=float)
    if accuracy.ndim != 2 or accuracy.shape[1] < 2 or accuracy.shape[0] < 3:
        raise ValueError(f"accuracy must be (>= 3 betas, >= 2 seeds), got {accuracy.shape}")
    fitter = _fitter(tuple(float(v) for v in log2_betas))
    means = accuracy.mean(axis=1)
    noise_variance = float(accuracy.var(axis=1, ddof=1).mean() / accuracy.shape[1])
    p_index, coefs = fitter.fit(means)
    level, k_left, k_right = (float(v) for v in coefs[0])
    peak = float(fitter.peaks[p_index[0]])
    fitted = level - np.where(fitter.x < peak, k_left, k_right) * (fitter.x - peak) ** 2
    rng = np.random.default_rng(seed)
    noisy = fitted[None, :] + rng.standard_normal((replicates, len(fitter.x))) * math.sqrt(noise_variance)
    boot_index, _ = fitter.fit(noisy)
    peak_se = float(np.std(fitter.peaks[boot_index], ddof=1))
    return TeacherCurve(peak, max(peak_se, PEAK_STEP / 2), level, k_left, k_right, noise_variance)


_FITTERS: dict[tuple[float, ...], _CurveFitter] = {}


def _fitter(x: tuple[float, ...]) -> _CurveFitter:
    if x not in _FITTERS:
        _FITTERS[x] = _CurveFitter(np.array(x))
    return _FITTERS[x]


# ------------------------------------------------------------------------------------------------
# Level 2: where peaks lie


@dataclass(frozen=True)
class CalibratedTeacher:
    """One calibration teacher: its architecture, confidence features and fitted curve."""

    label: str
    architecture: str
    features: dict[str, float]
    curve: TeacherCurve


@dataclass(frozen=True)
class Predictive:
    """A predictive distribution over log2(beta): a mixture of Gaussians."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.sum(self.weights * self.means))

    @property
    def sd(self) -> float:
        second = np.sum(self.weights * (self.variances + self.means**2))
        return float(math.sqrt(max(second - self.mean**2, 0.0)))

    def cdf(self, value: float) -> float:
        z = (value - self.means) / np.sqrt(self.variances)
        return float(np.sum(self.weights * _normal_cdf(z)))

    def quantile(self, q: float) -> float:
        """The q-quantile (bisection on the mixture's CDF)."""
        low, high = self.mean - 10 * self.sd - 1, self.mean + 10 * self.sd + 1
        for _ in range(80):
            middle = 0.5 * (low + high)
            if self.cdf(middle) < q:
                low = middle
            else:
                high = middle
        return 0.5 * (low + high)

    def widened(self, extra_variance: float) -> Predictive:
        """The distribution of the quantity measured with an independent error of `extra_variance`."""
        return Predictive(self.weights, self.means, self.variances + extra_variance)

    def interval(self, coverage: float = 0.8) -> tuple[float, float]:
        tail = (1 - coverage) / 2
        return self.quantile(tail), self.quantile(1 - tail)

    def log_density(self, value: float, extra_variance: float = 0.0) -> float:
        """log p(value), the value measured with an error of variance `extra_variance`."""
        variances = self.variances + extra_variance
        terms = np.log(self.weights + 1e-300) - 0.5 * np.log(2 * math.pi * variances)
        terms = terms - 0.5 * (value - self.means) ** 2 / variances
        top = terms.max()
        return float(top + math.log(np.exp(terms - top).sum()))

    def expected_loss(self, x: np.ndarray | float, k_left: float, k_right: float) -> np.ndarray:
        """E[k_left (p - x)^2 if x < p else k_right (x - p)^2] for p from this distribution."""
        x = np.atleast_1d(np.asarray(x, dtype=float))[:, None]
        sd = np.sqrt(self.variances)[None, :]
        z = (x - self.means[None, :]) / sd
        pdf, cdf = _normal_pdf(z), _normal_cdf(z)
        above = sd**2 * ((1 + z**2) * (1 - cdf) - z * pdf)  # E[(p - x)^2; p > x]
        below = sd**2 * ((1 + z**2) * cdf + z * pdf)  # E[(x - p)^2; p < x]
        return (self.weights[None, :] * (k_left * above + k_right * below)).sum(axis=1)

    def pick(self, candidates: Sequence[float], k_left: float, k_right: float) -> float:
        """The candidate log2(beta) with the least expected loss."""
        candidates = np.asarray(candidates, dtype=float)
        return float(candidates[int(np.argmin(self.expected_loss(candidates, k_left, k_right)))])


@dataclass(frozen=True)
class BetaModel:
    """The second level fitted on calibration teachers: `predict` gives a new teacher's distribution."""

    feature: str | None  # None: no feature (one peak for all, up to architecture and teacher effects)
    uses_architecture: bool
    architectures: tuple[str, ...]
    feature_mean: float
    tau_pairs: np.ndarray  # (G, 2): (tau_arch, tau_teacher)
    tau_weights: np.ndarray  # (G,) posterior
    theta_means: np.ndarray  # (G, K) posterior means of (a, b, u_1..u_A)
    theta_covariances: np.ndarray  # (G, K, K)
    k_left: float
    k_right: float
    teachers: tuple[CalibratedTeacher, ...] = field(repr=False)

    def _row(self, features: dict[str, float] | None, architecture: str | None) -> tuple[np.ndarray, bool]:
        row = np.zeros(self.theta_means.shape[1])
        row[0] = 1.0
        if self.feature is not None:
            if features is None or self.feature not in features or not math.isfinite(features[self.feature]):
                raise ValueError(f"this model predicts from feature {self.feature!r}, which is missing")
            row[1] = features[self.feature] - self.feature_mean
        known = self.uses_architecture and architecture in self.architectures
        if known:
            row[self._first_arch_column + self.architectures.index(architecture)] = 1.0
        return row, known

    @property
    def _first_arch_column(self) -> int:
        return 2 if self.feature is not None else 1

    def predict(self, features: dict[str, float] | None, architecture: str | None = None) -> Predictive:
        """The distribution of a teacher's peak log2(beta): its architecture's effect if calibrated, else a new one's."""
        row, known = self._row(features, architecture)
        means = self.theta_means @ row
        variances = np.einsum("k,gkl,l->g", row, self.theta_covariances, row) + self.tau_pairs[:, 1] ** 2
        if self.uses_architecture and not known:
            variances = variances + self.tau_pairs[:, 0] ** 2
        return Predictive(self.tau_weights, means, np.maximum(variances, 1e-9))

    def slope(self) -> tuple[float, float]:
        """Posterior mean and sd of the slope (octaves per unit of the feature); (0, 0) without a feature."""
        if self.feature is None:
            return 0.0, 0.0
        means = self.theta_means[:, 1]
        variances = self.theta_covariances[:, 1, 1]
        mean = float(np.sum(self.tau_weights * means))
        second = float(np.sum(self.tau_weights * (variances + means**2)))
        return mean, math.sqrt(max(second - mean * mean, 0.0))


def fit_beta_model(
    teachers: Sequence[CalibratedTeacher], feature: str | None, *, uses_architecture: bool = True
) -> BetaModel:
    """Fit the second level on `teachers` (at least 2). `feature` None: no feature."""
    teachers = tuple(teachers)
    if len(teachers) < 2:
        raise ValueError(f"a beta model needs at least 2 calibration teachers, got {len(teachers)}")
    peaks = np.array([t.curve.peak for t in teachers])
    errors = np.array([t.curve.peak_se for t in teachers]) ** 2
    architectures = tuple(sorted({t.architecture for t in teachers})) if uses_architecture else ()
    columns = [np.ones(len(teachers))]
    prior_variances = [INTERCEPT_PRIOR_SD**2]
    feature_mean = 0.0
    if feature is not None:
        values = np.array([t.features.get(feature, math.nan) for t in teachers], dtype=float)
        if not np.all(np.isfinite(values)):
            missing = [t.label for t, v in zip(teachers, values, strict=True) if not math.isfinite(v)]
            raise ValueError(f"feature {feature!r} is missing for teacher(s) {', '.join(missing)}")
        feature_mean = float(values.mean())
        spread = max(float(values.max() - values.min()), 1e-6)
        columns.append(values - feature_mean)
        prior_variances.append((SLOPE_PRIOR_OCTAVES / spread) ** 2)
    for architecture in architectures:
        columns.append(np.array([1.0 if t.architecture == architecture else 0.0 for t in teachers]))
    design = np.stack(columns, axis=1)  # (n, K)
    taus_arch = TAU_GRID if architectures else np.zeros(1)
    pairs = np.array([(ta, tt) for ta in taus_arch for tt in TAU_GRID])
    log_weights, means, covariances = [], [], []
    for tau_arch, tau_teacher in pairs:
        prior = np.diag(prior_variances + [tau_arch**2] * len(architectures))
        noise = np.diag(errors + tau_teacher**2)
        marginal = design @ prior @ design.T + noise
        _, logdet = np.linalg.slogdet(marginal)
        solve = np.linalg.solve(marginal, peaks)
        log_likelihood = -0.5 * (logdet + peaks @ solve + len(peaks) * math.log(2 * math.pi))
        # Half-normal priors on the taus; the grid is roughly log-spaced, so each point also
        # carries its cell's width (the tau itself) as the measure.
        log_prior = -0.5 * (tau_teacher / TAU_PRIOR_SCALE) ** 2 + math.log(tau_teacher)
        if architectures:
            log_prior += -0.5 * (tau_arch / TAU_PRIOR_SCALE) ** 2 + math.log(tau_arch)
        log_weights.append(log_likelihood + log_prior)
        gain = prior @ design.T @ np.linalg.inv(marginal)
        means.append(gain @ peaks)
        covariances.append(prior - gain @ design @ prior)
    log_weights = np.array(log_weights)
    weights = np.exp(log_weights - log_weights.max())
    weights /= weights.sum()
    k_left, k_right = pooled_curvatures(teachers)
    return BetaModel(
        feature=feature,
        uses_architecture=bool(architectures),
        architectures=architectures,
        feature_mean=feature_mean,
        tau_pairs=pairs,
        tau_weights=weights,
        theta_means=np.array(means),
        theta_covariances=np.array(covariances),
        k_left=k_left,
        k_right=k_right,
        teachers=teachers,
    )


def pooled_curvatures(teachers: Sequence[CalibratedTeacher]) -> tuple[float, float]:
    """Median left and right curvatures over teachers whose peak has grid points on that side.

    A peak at (or beyond) the grid's end has no data on its outer side, whose curvature is then
    unknown rather than 0; when no teacher shows a side, the other side's value stands in.
    """
    lefts = [t.curve.k_left for t in teachers if t.curve.k_left > 0]
    rights = [t.curve.k_right for t in teachers if t.curve.k_right > 0]
    left = float(np.median(lefts)) if lefts else math.nan
    right = float(np.median(rights)) if rights else math.nan
    if math.isnan(left) and math.isnan(right):
        return 1.0, 1.0
    return (right if math.isnan(left) else left), (left if math.isnan(right) else right)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + _erf(z / math.sqrt(2)))


def _normal_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[float])(x)


def nearest_grid_index(log2_beta: float, log2_betas: np.ndarray) -> int:
    """The grid beta closest in octaves (ties to the smaller beta)."""
    return int(np.argmin(np.abs(np.asarray(log2_betas) - log2_beta) + 1e-9 * np.arange(len(log2_betas))))
