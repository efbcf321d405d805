"""Auto-beta's model: accuracy as a function of log2(beta) and the teacher's gap, fitted to a grid's response surface.

Each teacher's accuracy over a log2 grid of betas is modelled as a parabola in x = log2(beta)
whose peak moves linearly with the teacher's mean logit gap:

    acc(teacher i, x) = c_i - curvature * (x - peak(gap_i))**2,   peak(gap) = intercept + slope * gap

`c_i` (each teacher's own level) is free, the curvature is shared, and (intercept, slope) are
found by an exhaustive search on a fine grid with the rest solved in closed form, so the fit uses
every cell of the grid (how much worse beta/2 and 2*beta are), not only each teacher's argmax,
which one noisy cell can move by an octave.

Thin evidence is shrunk toward the constant: the slope carries a Gaussian prior centred on 0
(penalty noise_variance * slope**2 / prior_variance), so with few or noisy teachers the fit
falls back to one beta for all, the baseline a useful gap must beat. The prior's scale is one
octave of peak movement across the calibrated gaps.

The model never extrapolates: a gap outside the calibrated range is clamped to its nearest end
(with a warning), and peaks are kept inside the calibrated betas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PEAK_STEP = 0.05  # octaves: resolution of the intercept search
SLOPE_STEPS = 121  # slopes searched, spread evenly over +-SLOPE_SPAN_OCTAVES across the gap range
SLOPE_SPAN_OCTAVES = 6.0
PRIOR_OCTAVES = 1.0  # prior sd of the peak's movement across the calibrated gap range
TOLERATED_LOSS = 1.0  # accuracy points: the window holds the betas predicted to lose at most this
WINDOW_OCTAVES = (0.5, 3.0)  # half-width bounds of the window


@dataclass(frozen=True)
class SurfaceFit:
    """A fitted surface: where the peak lies for a gap, how sharp it is, and what it was fitted on."""

    intercept: float  # log2 beta of the peak at gap 0
    slope: float  # octaves of peak movement per unit of gap
    curvature: float  # accuracy points lost per squared octave away from the peak
    gap_range: tuple[float, float]
    log2_beta_range: tuple[float, float]
    noise_variance: float  # of a cell mean, in squared points (from the seeds, or the residuals)
    teachers: int

    def peak(self, gap: float) -> tuple[float, bool]:
        """(log2 beta of the predicted peak, whether the gap had to be clamped into the calibrated range)."""
        low, high = self.gap_range
        clamped_gap = min(max(gap, low), high)
        peak = self.intercept + self.slope * clamped_gap
        peak = min(max(peak, self.log2_beta_range[0]), self.log2_beta_range[1])
        return peak, clamped_gap != gap

    def half_width(self) -> float:
        """Octaves either side of the peak predicted to lose at most TOLERATED_LOSS points."""
        if self.curvature <= 0:
            return WINDOW_OCTAVES[1]
        return min(max(math.sqrt(TOLERATED_LOSS / self.curvature), WINDOW_OCTAVES[0]), WINDOW_OCTAVES[1])

    def to_dict(self) -> dict:
        return {
            "intercept": self.intercept,
            "slope": self.slope,
            "curvature": self.curvature,
            "gap_range": list(self.gap_range),
            "log2_beta_range": list(self.log2_beta_range),
            "noise_variance": self.noise_variance,
            "teachers": self.teachers,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SurfaceFit:
        return cls(
            intercept=float(data["intercept"]),
            slope=float(data["slope"]),
            curvature=float(data["curvature"]),
            gap_range=(float(data["gap_range"][0]), float(data["gap_range"][1])),
            log2_beta_range=(float(data["log2_beta_range"][0]), float(data["log2_beta_range"][1])),
            noise_variance=float(data["noise_variance"]),
            teachers=int(data["teachers"]),
        )


def fit_surface(
    gaps: np.ndarray,
    log2_betas: np.ndarray,
    accuracy: np.ndarray,
    *,
    noise_variance: float | None = None,
    constant: bool = False,
) -> SurfaceFit:
    """Fit the surface to `accuracy[i, j]` (teacher i at log2 beta j, a mean over seeds).

    `noise_variance` is the variance of one cell mean (seed variance / seeds); without it the
    residual variance is used. `constant=True` holds the slope at 0: the constant baseline.
    """
    gaps = np.asarray(gaps, dtype=float)
    x = np.asarray(log2_betas, dtype=float)
    acc = np.asarray(accuracy, dtype=float)
    if acc.shape != (len(gaps), len(x)) or len(gaps) < 1 or len(x) < 3:
        raise ValueError(f"accuracy must be (teachers, >= 3 betas), got {acc.shape} for {len(gaps)} teachers")
    gap_low, gap_high = float(gaps.min()), float(gaps.max())
    span = max(gap_high - gap_low, 1e-6)
    intercepts = np.arange(x.min() - 1.0, x.max() + 1.0 + PEAK_STEP / 2, PEAK_STEP)
    if constant or len(gaps) < 2:
        slopes = np.zeros(1)
    else:
        slopes = np.linspace(-SLOPE_SPAN_OCTAVES, SLOPE_SPAN_OCTAVES, SLOPE_STEPS) / span
    sse, curvature = _profile(gaps - gap_low, x, acc, intercepts, slopes)
    if noise_variance is None:
        best = np.unravel_index(np.argmin(sse), sse.shape)
        dof = max(acc.size - len(gaps) - 3, 1)
        noise_variance = float(sse[best] / dof)
    prior_variance = (PRIOR_OCTAVES / span) ** 2
    objective = sse + max(noise_variance, 1e-9) * (slopes[None, :] ** 2) / prior_variance
    i, j = np.unravel_index(np.argmin(objective), objective.shape)
    slope = float(slopes[j])
    return SurfaceFit(
        intercept=float(intercepts[i]) - slope * gap_low,
        slope=slope,
        curvature=float(curvature[i, j]),
        gap_range=(gap_low, gap_high),
        log2_beta_range=(float(x.min()), float(x.max())),
        noise_variance=float(noise_variance),
        teachers=len(gaps),
    )


def _profile(
    gaps: np.ndarray, x: np.ndarray, acc: np.ndarray, intercepts: np.ndarray, slopes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SSE and curvature for every (intercept, slope), with the levels and the curvature solved exactly."""
    peaks = intercepts[:, None, None] + slopes[None, :, None] * gaps[None, None, :]  # (I, S, teachers)
    u = (x[None, None, None, :] - peaks[..., None]) ** 2  # (I, S, teachers, betas)
    u_centred = u - u.mean(axis=-1, keepdims=True)
    a_centred = acc - acc.mean(axis=-1, keepdims=True)
    cross = (u_centred * a_centred).sum(axis=(-1, -2))
    spread = (u_centred**2).sum(axis=(-1, -2))
    # acc = c_i - k u: the least-squares k is -cross/spread; a peak needs k >= 0 (else no peak: k = 0).
    curvature = np.clip(-cross / np.maximum(spread, 1e-12), 0.0, None)
    residual = a_centred[None, None] + curvature[..., None, None] * u_centred
    return (residual**2).sum(axis=(-1, -2)), curvature


def nearest_grid_index(log2_beta: float, log2_betas: np.ndarray) -> int:
    """The grid beta closest in octaves (ties to the smaller beta)."""
    return int(np.argmin(np.abs(np.asarray(log2_betas) - log2_beta) + 1e-9 * np.arange(len(log2_betas))))
