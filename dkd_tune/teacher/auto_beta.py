"""Auto-beta: predict DKD's NCKD weight beta for a teacher as a distribution over log2(beta), and fit, save
and load the calibrations behind it.

The paper's appendix (A.3) observes that the best beta grows with the teacher's mean gap
``z_t - z_max`` between the target logit and the largest non-target logit. A *calibration* is what
one dataset family taught about that relation; gaps are not comparable across datasets, so every
calibration belongs to one family and is refused for another. Two kinds exist:

* **A grid's model** (`dkd-tune validate-beta`): each teacher's accuracy curve over beta, and the
  hierarchical model of `dkd_tune.teacher.beta_model` (a confidence feature, an architecture
  effect, a teacher effect) with its held-out error measured by leaving teachers and whole
  architectures out. Its suggestion is the beta of least expected regret under the predictive
  distribution.
* **Points** (the paper's Table A.2, `dkd-tune calibrate`): a handful of (teacher, gap, best beta)
  and the monotone fit ``log(beta) = intercept + slope * gap``, slope >= 0 (two parameters for a few
  noisy points; in log-beta because beta is searched on a log scale; monotone because A.3 claims a
  more confident teacher wants at least as much NCKD). Its held-out error is measured by leaving
  each point out.

Either way a suggestion is a distribution: a centre and a spread in octaves, the spread the
calibration's measured held-out error (never below PRIOR_SPREAD_FLOOR; a calibration that cannot
measure it gets DEFAULT_PRIOR_SPREAD and says so). `beta: auto` hands it to the prior-guided
sampler as a belief the search's results may overrule; `dkd-tune suggest-beta` prints it.

Predictions are clamped to ``[BETA_MIN, BETA_MAX]`` = [0.25, 16]: 0.25 is the smallest beta the
paper uses (MS-COCO, A.2) and 16 twice the largest best beta it reports (8, Table A.2); A.3 warns
that too large a beta harms the student's target-class prediction.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_text
from dkd_tune.teacher.beta_model import (
    FEATURES,
    BetaModel,
    CalibratedTeacher,
    TeacherCurve,
    feature_values,
    fit_beta_model,
)
from dkd_tune.teacher.gap import LogitGapStats

FORMAT = "dkd-tune-beta-calibration"
FORMAT_VERSION = 2  # 2: held-out errors and the grid model; version 1 files (points) still read
READABLE_VERSIONS = (1, 2)
FAMILIES = ("cifar", "imagenet", "synthetic", "coco")
FIT_FORM = "log_beta_linear_in_gap"
FIT_FORMULA = "beta = exp(intercept + slope * mean_logit_gap), slope >= 0"
MODEL_FORM = "hierarchical_beta_model"
MODEL_FORMULA = (
    "peak log2(beta) = a + b * feature + architecture effect + teacher effect (dkd_tune.teacher.beta_model); "
    "suggestion: the beta of least expected regret"
)

BETA_MIN = 0.25
BETA_MAX = 16.0
DEFAULT_WINDOW_K = 2.0
DEFAULT_RESIDUAL_SCALE_FLOOR = math.log(2.0) / math.sqrt(12.0)
PRIOR_SPREAD_FLOOR = 0.75  # octaves: no calibration is trusted to better than this
DEFAULT_PRIOR_SPREAD = 2.0  # octaves, for a calibration whose held-out error cannot be measured
INTERVAL_COVERAGE = 0.8
_Z80 = 1.2815515655446004  # the standard normal's 90th percentile: an 80% interval is +-_Z80 sd

_CALIBRATIONS_PACKAGE_DIR = "calibrations"
_DEFAULT_FILES = {"cifar": "cifar.json", "synthetic": "synthetic.json"}
_NO_DEFAULT_REASONS = {
    "imagenet": "the paper gives ImageNet betas but no teacher gaps",
    "coco": "no detection teachers have been calibrated yet; the paper uses beta 0.25 for all its pairs",
}
_RELATIVE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class CalibrationPoint:
    """One teacher's measurement: its mean logit gap and the best beta found for it, and where both came from."""

    teacher: str
    mean_logit_gap: float
    best_beta: float
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise UserInputError(
                f"calibration point: teacher must be a non-empty label, got {self.teacher!r}"
            )
        if not _is_finite_number(self.mean_logit_gap):
            raise UserInputError(
                f"calibration point {self.teacher!r}: mean_logit_gap must be a finite number, got {self.mean_logit_gap!r}"
            )
        if not (_is_finite_number(self.best_beta) and self.best_beta > 0):
            raise UserInputError(
                f"calibration point {self.teacher!r}: best_beta must be a positive finite number, got {self.best_beta!r}"
            )
        object.__setattr__(self, "mean_logit_gap", float(self.mean_logit_gap))
        object.__setattr__(self, "best_beta", float(self.best_beta))

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "mean_logit_gap": self.mean_logit_gap,
            "best_beta": self.best_beta,
            "source": self.source,
        }


@dataclass(frozen=True)
class BetaSuggestion:
    """Auto-beta's belief about one teacher's best beta: a centre (the suggested beta), a spread in octaves,
    the 80% interval they give, where the spread comes from, and how far to trust the calibration."""

    gap: float
    beta: float  # the suggested beta: the prior's centre
    low: float  # the 80% predictive interval
    high: float
    extrapolated: bool
    clamped: bool
    warnings: tuple[str, ...]
    calibration: str
    family: str
    spread: float = DEFAULT_PRIOR_SPREAD  # octaves: the sd of the belief in log2(beta)
    spread_source: str = ""
    trust: str = ""  # one line: the calibration's held-out error and its regret against a constant beta

    def search_window(self) -> tuple[float, float]:
        """The 80% interval rounded outward to 3 significant digits, so rounding never narrows it."""
        return _round_outward(self.low, up=False), _round_outward(self.high, up=True)

    def describe(self) -> str:
        """One line: the suggestion as a distribution."""
        low, high = self.search_window()
        return (
            f"beta {self.beta:.3g} (log2 {math.log2(self.beta):+.2f} +- {self.spread:.2f} octaves; "
            f"80% interval [{low:g}, {high:g}])"
        )

    def search_space_yaml(self, beta_range: tuple[float, float] = (BETA_MIN, BETA_MAX)) -> str:
        """The `space:` block of a search that starts from this suggestion as a prior."""
        return (
            "space:\n"
            f"  # auto-beta: gap {self.gap:.2f} -> {self.describe()} (calibration {self.calibration!r})\n"
            f"  beta: {{loguniform: [{beta_range[0]:g}, {beta_range[1]:g}], "
            f"prior: {{centre: {self.beta:.4g}, spread: {self.spread:.3g}}}}}\n"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "gap": self.gap,
            "beta": self.beta,
            "low": self.low,
            "high": self.high,
            "spread": self.spread,
            "spread_source": self.spread_source,
            "extrapolated": self.extrapolated,
            "clamped": self.clamped,
            "warnings": list(self.warnings),
            "calibration": self.calibration,
            "family": self.family,
            "trust": self.trust,
        }


def _interval(log_centre: float, spread: float) -> tuple[float, float]:
    """The 80% interval of N(log_centre, spread) in log2 beta, as betas clamped to [BETA_MIN, BETA_MAX]."""
    low = min(max(2.0 ** (log_centre - _Z80 * spread), BETA_MIN), BETA_MAX)
    high = min(max(2.0 ** (log_centre + _Z80 * spread), BETA_MIN), BETA_MAX)
    return low, high


def prior_spread(*errors: float) -> float:
    """The larger of the measured errors (octaves) and PRIOR_SPREAD_FLOOR; NaNs ignored."""
    return max([PRIOR_SPREAD_FLOOR] + [e for e in errors if math.isfinite(e)])


@dataclass(frozen=True)
class Calibration:
    """Points of one dataset family and the monotone fit ``log(beta) = intercept + slope * gap`` through them."""

    name: str
    family: str
    points: tuple[CalibrationPoint, ...]
    provenance: str
    intercept: float
    slope: float
    slope_held_at_zero: bool
    residual_scale_fitted: float
    window_k: float = DEFAULT_WINDOW_K  # read from version 1 files; the spread replaces the window
    residual_scale_floor: float = DEFAULT_RESIDUAL_SCALE_FLOOR
    evidence: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def gap_range(self) -> tuple[float, float]:
        gaps = [point.mean_logit_gap for point in self.points]
        return min(gaps), max(gaps)

    predicts_from_gap = True  # `predict(gap)` needs nothing else

    @property
    def residual_scale(self) -> float:
        """The residual scale the window uses: the fitted one, but never below the floor."""
        return max(self.residual_scale_fitted, self.residual_scale_floor)

    def log_errors(self) -> list[float]:
        """Per point, log2(predicted beta / best beta) of the unclamped fit."""
        return [
            (self.intercept + self.slope * point.mean_logit_gap - math.log(point.best_beta)) / math.log(2.0)
            for point in self.points
        ]

    @property
    def rmse_log2(self) -> float:
        """Root-mean-square error of the fit in log2 units (1.0 = off by a factor of two)."""
        errors = self.log_errors()
        return math.sqrt(math.fsum(error * error for error in errors) / len(errors))

    def held_out_errors(self) -> list[float]:
        """Per point, log2(prediction without that point / its best beta); empty below 3 points (a fit
        needs 2 distinct gaps among the others)."""
        errors = []
        for index, point in enumerate(self.points):
            others = [p for i, p in enumerate(self.points) if i != index]
            if len({p.mean_logit_gap for p in others}) < 2:
                return []
            fit = fit_calibration(others, self.family, "held out")
            errors.append(math.log2(fit.predict(point.mean_logit_gap).beta / point.best_beta))
        return errors

    @property
    def held_out_rms(self) -> float:
        """Root-mean-square leave-one-point-out error in octaves (NaN when it cannot be measured)."""
        errors = self.held_out_errors()
        return math.sqrt(math.fsum(e * e for e in errors) / len(errors)) if errors else math.nan

    def trust(self) -> str:
        rms = self.held_out_rms
        if not math.isfinite(rms):
            return f"{len(self.points)} points are too few to measure a held-out error"
        return (
            f"held out (each of its {len(self.points)} points left out in turn): off by {rms:.2f} octaves RMS; "
            "no regret measured (points, not grids)"
        )

    def predict(self, gap: float, *, teacher_acc: float | None = None) -> BetaSuggestion:
        """The beta for a teacher with this mean logit gap, the belief's spread, and warnings.

        The fit is never extrapolated: a gap outside the calibrated range is read at the nearest
        calibrated gap. The spread is the leave-one-point-out error (PRIOR_SPREAD_FLOOR at least).
        """
        del teacher_acc  # a points calibration knows no student to compare the teacher with
        if not _is_finite_number(gap):
            raise UserInputError(f"teacher gap must be a finite number, got {gap!r}")
        gap = float(gap)
        low_gap, high_gap = self.gap_range
        extrapolated = not low_gap <= gap <= high_gap
        warnings = []
        if extrapolated:
            warnings.append(
                _outside_range_warning(gap, self.gap_range, self.name, len(self.points), self.family)
                + f"; read at the nearest calibrated gap {min(max(gap, low_gap), high_gap):.2f} (never extrapolated)"
            )
        log_min, log_max = math.log(BETA_MIN), math.log(BETA_MAX)
        log_raw = self.intercept + self.slope * min(max(gap, low_gap), high_gap)
        log_beta = min(max(log_raw, log_min), log_max)
        clamped = log_beta != log_raw
        if clamped:
            reason = (
                "A.3 warns that too large a beta harms the target-class "
                "prediction, and no teacher in Table A.1 does best above beta 8"
                if log_raw > log_max
                else "the paper uses no smaller beta anywhere (its smallest is for MS-COCO, A.2)"
            )
            warnings.append(
                f"predicted beta {_safe_exp(log_raw):.3g} clamped to [{BETA_MIN:g}, {BETA_MAX:g}]: {reason}"
            )
        rms = self.held_out_rms
        if math.isfinite(rms):
            spread = prior_spread(rms)
            source = f"leave-one-point-out error {rms:.2f} octaves (floor {PRIOR_SPREAD_FLOOR:g})"
        else:
            spread = DEFAULT_PRIOR_SPREAD
            source = f"no held-out error (too few points): the wide default {DEFAULT_PRIOR_SPREAD:g} octaves"
            warnings.append(
                f"calibration {self.name!r} has no measured held-out error; its spread is a wide default"
            )
        beta = _beta_from_log(log_beta)
        low, high = _interval(math.log2(beta), spread)
        return BetaSuggestion(
            gap=gap, beta=beta, low=low, high=high, extrapolated=extrapolated, clamped=clamped,
            warnings=tuple(warnings), calibration=self.name, family=self.family, spread=spread,
            spread_source=source, trust=self.trust(),
        )  # fmt: skip

    def report(self) -> str:
        """Human-readable summary: the fit, then each point's best beta next to the prediction."""
        low_gap, high_gap = self.gap_range
        lines = [
            f"calibration {self.name!r}: family {self.family}, {len(self.points)} teachers (points), "
            f"gaps {low_gap:.2f}..{high_gap:.2f}",
            f"fit: beta = {math.exp(self.intercept):.4g} * exp({self.slope:.4g} * gap)"
            + (
                f"  (beta doubles every {math.log(2.0) / self.slope:.2f} gap units)"
                if self.slope > 0
                else "  (slope held at 0: the points do not show beta growing with the gap)"
            ),
            f"trust: {self.trust()}",
        ]
        header = ("teacher", "gap", "best beta", "predicted", "80% interval", "error (log2)")
        rows = []
        for point, error in zip(self.points, self.log_errors(), strict=True):
            suggestion = self.predict(point.mean_logit_gap)
            rows.append(
                (
                    point.teacher,
                    f"{point.mean_logit_gap:.2f}",
                    f"{point.best_beta:g}",
                    f"{suggestion.beta:.2f}",
                    f"[{suggestion.low:.2f}, {suggestion.high:.2f}]",
                    f"{error:+.2f}",
                )
            )
        lines += _table(header, rows)
        lines.append(f"RMSE {self.rmse_log2:.3f} log2 units (a typical miss of x{2**self.rmse_log2:.2f})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The calibration file's content (format version FORMAT_VERSION)."""
        content: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "family": self.family,
            "provenance": self.provenance,
            "points": [point.to_dict() for point in self.points],
            "fit": {
                "form": FIT_FORM,
                "formula": FIT_FORMULA,
                "intercept": self.intercept,
                "slope": self.slope,
                "slope_held_at_zero": self.slope_held_at_zero,
                "residual_scale_fitted": self.residual_scale_fitted,
                "rmse_log2": self.rmse_log2,
                "gap_range": list(self.gap_range),
            },
        }
        if self.evidence is not None:
            content["evidence"] = self.evidence
        return content


@dataclass(frozen=True)
class ModelCalibration:
    """A grid's calibration: its teachers' curves, the hierarchical model on its chosen feature, and the
    held-out errors and regrets `dkd-tune validate-beta` measured for it."""

    name: str
    family: str
    provenance: str
    teachers: tuple[CalibratedTeacher, ...]
    feature: str | None
    log2_beta_range: tuple[float, float]
    held_out: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)  # fold kind -> summary
    evidence: dict[str, Any] | None = field(default=None, compare=False)

    @cached_property
    def model(self) -> BetaModel:
        return fit_beta_model(self.teachers, self.feature)

    @property
    def points(self) -> tuple[CalibrationPoint, ...]:
        """Each teacher as a (gap, fitted peak) point, for figures and tables."""
        return tuple(
            CalibrationPoint(t.label, t.features["gap"], 2.0**t.curve.peak, "fitted peak of its grid curve")
            for t in self.teachers
        )

    @property
    def gap_range(self) -> tuple[float, float]:
        gaps = [t.features["gap"] for t in self.teachers]
        return min(gaps), max(gaps)

    @property
    def predicts_from_gap(self) -> bool:
        """Whether `predict(gap)` works: the model's feature is the gap (or none)."""
        return self.feature in (None, "gap")

    @property
    def student_alone_val_acc(self) -> float | None:
        value = (self.evidence or {}).get("student_alone_val_acc")
        return float(value) if isinstance(value, (int, float)) else None

    def trust(self, architecture_known: bool = False) -> str:
        kind = "teacher" if architecture_known else "architecture"
        summary = self.held_out.get(kind)
        if not summary:
            return "no held-out error was measured for this calibration"
        what = (
            "its architecture's other teachers kept"
            if architecture_known
            else "its whole architecture left out"
        )
        line = (
            f"held out ({what}; {summary['teachers']} teachers): off by {summary['rms_error_octaves']:.2f} "
            f"octaves RMS"
        )
        if "autobeta_regret" in summary and "constant_regret" in summary:
            line += (
                f"; regret {summary['autobeta_regret'][0]:.2f} points against {summary['constant_regret'][0]:.2f} "
                "for one constant beta"
            )
        return line

    def suggest(
        self, stats: LogitGapStats, architecture: str | None = None, *, teacher_acc: float | None = None
    ) -> BetaSuggestion:
        """The belief for a teacher measured by `stats` (its gap pass); `architecture` its model name."""
        features = feature_values(stats, self.student_alone_val_acc)
        warnings = []
        low_gap, high_gap = self.gap_range
        extrapolated = not low_gap <= stats.mean <= high_gap
        if extrapolated:
            warnings.append(
                _outside_range_warning(stats.mean, self.gap_range, self.name, len(self.teachers), self.family)
                + "; the model extrapolates: trust its spread more than its centre"
            )
        model = self.model
        if self.feature is not None and not math.isfinite(features.get(self.feature, math.nan)):
            # E.g. the accuracy margin of a teacher measured without a validation split: the gap, always
            # measured, stands in (the held-out error below is then the chosen feature's, a lower bound).
            model = fit_beta_model(self.teachers, "gap")
            warnings.append(
                f"calibration {self.name!r} predicts from {FEATURES[self.feature]}, which this teacher's "
                "measurement lacks (a validation split gives it); predicting from the raw gap instead"
            )
        known = architecture in model.architectures
        predictive = model.predict(features, architecture)
        low_x, high_x = self.log2_beta_range
        candidates = [low_x + k * (high_x - low_x) / 120 for k in range(121)]
        centre = predictive.pick(candidates, model.k_left, model.k_right)
        student = self.student_alone_val_acc
        if teacher_acc is not None and student is not None and teacher_acc <= student:
            warnings.append(
                f"the teacher's top-1 {teacher_acc:.2f}% is no better than the calibration's student alone "
                f"({student:.2f}%): DKD may not help; suggesting the calibrated range's smallest beta"
            )
            centre = low_x
        summary = self.held_out.get("teacher" if known else "architecture")
        if summary:
            spread = prior_spread(summary["rms_error_octaves"], predictive.sd)
            source = (
                f"held-out error {summary['rms_error_octaves']:.2f} octaves RMS "
                f"({'leave one teacher out' if known else 'leave one architecture out'}), model sd "
                f"{predictive.sd:.2f}, floor {PRIOR_SPREAD_FLOOR:g}"
            )
        else:
            spread = max(DEFAULT_PRIOR_SPREAD, predictive.sd)
            source = f"no held-out error: the wide default {DEFAULT_PRIOR_SPREAD:g} octaves"
            warnings.append(
                f"calibration {self.name!r} has no measured held-out error; its spread is a wide default"
            )
        beta = min(max(2.0**centre, BETA_MIN), BETA_MAX)
        low, high = _interval(math.log2(beta), spread)
        return BetaSuggestion(
            gap=stats.mean, beta=beta, low=low, high=high, extrapolated=extrapolated, clamped=False,
            warnings=tuple(warnings), calibration=self.name, family=self.family, spread=spread,
            spread_source=source, trust=self.trust(known),
        )  # fmt: skip

    def predict(self, gap: float, *, teacher_acc: float | None = None) -> BetaSuggestion:
        """A suggestion from the gap alone (for figures): only when the model's feature is the gap or none."""
        if self.feature not in (None, "gap"):
            raise UserInputError(
                f"calibration {self.name!r} predicts from {FEATURES[self.feature]}, not from the gap alone"
            )
        return self.suggest(LogitGapStats(gap, gap, 0.0, 0.0, math.nan, math.nan, 0), teacher_acc=teacher_acc)

    def report(self) -> str:
        low_gap, high_gap = self.gap_range
        slope, slope_sd = self.model.slope()
        feature = FEATURES.get(self.feature, "none") if self.feature else "none (one peak for all)"
        lines = [
            f"calibration {self.name!r}: family {self.family}, {len(self.teachers)} teachers of "
            f"{len(self.model.architectures)} architectures (a grid's model), gaps {low_gap:.2f}..{high_gap:.2f}",
            f"model: peak log2(beta) from {feature}"
            + (f", slope {slope:+.3f} +- {slope_sd:.3f} octaves per unit" if self.feature else "")
            + f"; curvatures {self.model.k_left:.2f} (smaller beta) / {self.model.k_right:.2f} (larger beta) "
            "points per squared octave",
            f"trust, a teacher of another architecture: {self.trust(False)}",
            f"trust, a teacher of a calibrated architecture: {self.trust(True)}",
        ]
        header = ("teacher", "architecture", "gap", "fitted peak beta", "peak se (octaves)")
        rows = [
            (
                t.label,
                t.architecture,
                f"{t.features['gap']:.2f}",
                f"{2.0**t.curve.peak:.2f}",
                f"{t.curve.peak_se:.2f}",
            )
            for t in self.teachers
        ]
        return "\n".join(lines + _table(header, rows))

    def to_dict(self) -> dict[str, Any]:
        slope, slope_sd = self.model.slope()
        content: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "family": self.family,
            "provenance": self.provenance,
            "points": [
                {
                    "teacher": t.label,
                    "architecture": t.architecture,
                    "features": t.features,
                    "curve": dataclasses.asdict(t.curve),
                }
                for t in self.teachers
            ],
            "fit": {
                "form": MODEL_FORM,
                "formula": MODEL_FORMULA,
                "feature": self.feature,
                "log2_beta_range": list(self.log2_beta_range),
                "slope": slope,
                "slope_sd": slope_sd,
            },
            "held_out": self.held_out,
        }
        if self.evidence is not None:
            content["evidence"] = self.evidence
        return content


AnyCalibration = Calibration | ModelCalibration


def suggest_beta(
    calibration: AnyCalibration, stats: LogitGapStats, architecture: str | None = None
) -> BetaSuggestion:
    """One teacher's suggestion from its gap pass: the one place `suggest-beta` and `beta: auto` get it from."""
    teacher_acc = stats.val_acc if math.isfinite(stats.val_acc) else stats.test_acc
    teacher_acc = teacher_acc if math.isfinite(teacher_acc) else None
    if isinstance(calibration, ModelCalibration):
        return calibration.suggest(stats, architecture, teacher_acc=teacher_acc)
    return calibration.predict(stats.mean, teacher_acc=teacher_acc)


def _outside_range_warning(
    gap: float, gap_range: tuple[float, float], name: str, count: int, family: str
) -> str:
    low, high = gap_range
    return (
        f"gap {gap:.2f} is outside the calibrated range [{low:.2f}, {high:.2f}] of calibration {name!r} "
        f"({count} teachers, family {family})"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


@dataclass(frozen=True)
class BetaPrior:
    """Auto-beta as a search's prior: the suggestion (a centre and a spread) and the beta range searched."""

    suggestion: BetaSuggestion
    beta_range: tuple[float, float]

    @property
    def centre(self) -> float:
        """The first trial's beta (the suggestion, inside the searched range)."""
        return min(max(self.suggestion.beta, self.beta_range[0]), self.beta_range[1])

    @property
    def spread(self) -> float:
        return self.suggestion.spread

    def describe(self) -> str:
        s = self.suggestion
        return (
            f"{s.describe()} from calibration {s.calibration!r} (gap {s.gap:.2f}); the first trial at beta "
            f"{self.centre:.3g}, then the prior-guided sampler over [{self.beta_range[0]:g}, {self.beta_range[1]:g}]"
        )


def beta_prior(
    calibration: AnyCalibration, stats: LogitGapStats | float, architecture: str | None = None
) -> BetaPrior:
    """The prior `beta: auto` gives a teacher: its suggestion, and the range the calibration covers."""
    if not isinstance(stats, LogitGapStats):
        stats = LogitGapStats(float(stats), float(stats), 0.0, 0.0, math.nan, math.nan, 0)
    suggestion = suggest_beta(calibration, stats, architecture)
    if isinstance(calibration, ModelCalibration):
        low, high = calibration.log2_beta_range
        beta_range = (2.0**low, 2.0**high)
    else:
        beta_range = (BETA_MIN, BETA_MAX)
    return BetaPrior(suggestion, beta_range)


def fit_calibration(
    points: Iterable[CalibrationPoint],
    family: str,
    provenance: str,
    *,
    name: str | None = None,
    window_k: float = DEFAULT_WINDOW_K,
    residual_scale_floor: float = DEFAULT_RESIDUAL_SCALE_FLOOR,
    evidence: dict[str, Any] | None = None,
) -> Calibration:
    """Least-squares fit of log(beta) on the gap with the slope constrained to be >= 0."""
    points = tuple(points)
    _check_family(family, "family")
    if len(points) < 2:
        raise UserInputError(f"a beta calibration needs at least 2 points (teachers), got {len(points)}")
    gaps = [point.mean_logit_gap for point in points]
    if max(gaps) - min(gaps) <= 0:
        raise UserInputError(
            f"a beta calibration needs teachers with at least 2 different gaps, all {len(points)} have gap {gaps[0]:g}"
        )
    for label, value in (("window k", window_k), ("residual_scale_floor", residual_scale_floor)):
        if not (_is_finite_number(value) and value > 0):
            raise UserInputError(f"calibration {label} must be a positive number, got {value!r}")
    log_betas = [math.log(point.best_beta) for point in points]
    count = len(points)
    gap_mean = math.fsum(gaps) / count
    log_mean = math.fsum(log_betas) / count
    spread = math.fsum((gap - gap_mean) ** 2 for gap in gaps)
    covariance = math.fsum((gap - gap_mean) * (y - log_mean) for gap, y in zip(gaps, log_betas, strict=True))
    # With one regressor, the slope-constrained least-squares optimum is the unconstrained slope
    # when it is >= 0 and otherwise the boundary, where the best intercept is the mean log-beta.
    slope = covariance / spread
    slope_held_at_zero = slope < 0
    if slope_held_at_zero:
        slope = 0.0
    intercept = log_mean - slope * gap_mean
    residual_sum = math.fsum(
        (y - intercept - slope * gap) ** 2 for gap, y in zip(gaps, log_betas, strict=True)
    )
    # Two parameters are estimated; with two points the fit is exact and only the floor remains.
    residual_scale_fitted = math.sqrt(residual_sum / (count - 2)) if count > 2 else 0.0
    return Calibration(
        name=name or f"{family}-{count}-teachers",
        family=family,
        points=points,
        provenance=provenance,
        intercept=intercept,
        slope=slope,
        slope_held_at_zero=slope_held_at_zero,
        residual_scale_fitted=residual_scale_fitted,
        window_k=float(window_k),
        residual_scale_floor=float(residual_scale_floor),
        evidence=evidence,
    )


def default_calibration(family: str) -> AnyCalibration:
    """The calibration dkd-tune ships for a dataset family ("cifar": the paper's Table A.2; "synthetic": the
    all-CNN validation grid)."""
    _check_family(family, "family")
    if family not in _DEFAULT_FILES:
        raise UserInputError(
            f"no default beta calibration for family {family!r} ({_NO_DEFAULT_REASONS[family]}); "
            f"make one from finished searches with `dkd-tune calibrate RESULTS.parquet --out FILE --family {family}`"
        )
    resource = (
        importlib.resources.files("dkd_tune.teacher") / _CALIBRATIONS_PACKAGE_DIR / _DEFAULT_FILES[family]
    )
    with importlib.resources.as_file(resource) as path:
        return read_calibration(path)


def default_calibration_or_none(family: str) -> AnyCalibration | None:
    """The calibration dkd-tune ships for `family`, or None when it ships none (imagenet, coco)."""
    _check_family(family, "family")
    return default_calibration(family) if family in _DEFAULT_FILES else None


def load_calibration(path: str | os.PathLike | None, family: str) -> AnyCalibration:
    """The user's calibration file if a path is given, else the family's default; either must match `family`."""
    _check_family(family, "family")
    if path is None:
        return default_calibration(family)
    calibration = read_calibration(path)
    if calibration.family != family:
        raise UserInputError(
            f"{path}: key family is {calibration.family!r} but the dataset family is {family!r}; "
            "logit gaps are not comparable across families, use a calibration made for this one"
        )
    return calibration


def describe_calibration(
    path: str | os.PathLike | None, family: str | None = None, gaps: Sequence[float] = ()
) -> str:
    """The report of a calibration file (or a family's default, "cifar" if none) and its suggestions for `gaps`."""
    if path is None:
        calibration = default_calibration(family or "cifar")
    elif family is None:
        calibration = read_calibration(path)
    else:
        calibration = load_calibration(path, family)
    sections = [calibration.report()]
    for gap in gaps:
        suggestion = calibration.predict(gap)
        lines = [f"gap {suggestion.gap:.2f}: {suggestion.describe()}", f"spread: {suggestion.spread_source}"]
        lines += [f"warning: {warning}" for warning in suggestion.warnings]
        lines.append(suggestion.search_space_yaml().rstrip("\n"))
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def save_calibration(calibration: AnyCalibration, path: str | os.PathLike) -> None:
    """Write the calibration as human-readable JSON, atomically."""
    atomic_write_text(path, _format_json(calibration.to_dict()) + "\n")


def read_calibration(path: str | os.PathLike) -> AnyCalibration:
    """Read and validate a calibration file; the stored fit must be the one its points give."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{path}: calibration file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: cannot read calibration file ({error})") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserInputError(
            f"{path}: not valid JSON at line {error.lineno} column {error.colno} ({error.msg})"
        ) from None
    return _calibration_from_content(content, path)


def _calibration_from_content(content: Any, path: Path) -> AnyCalibration:
    reader = _FileReader(path)
    reader.require_object(content, "")
    reader.require_keys(
        content,
        "",
        required=("format", "format_version", "name", "family", "provenance", "points", "fit"),
        optional=("evidence", "window", "held_out"),
    )
    if content["format"] != FORMAT:
        raise UserInputError(f"{path}: key format is {content['format']!r}, expected {FORMAT!r}")
    version = content["format_version"]
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise UserInputError(
            f"{path}: key format_version is {version!r}; this dkd-tune reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    name = reader.string(content, "name")
    family = reader.string(content, "family")
    if family not in FAMILIES:
        raise UserInputError(f"{path}: key family is {family!r}, expected one of {', '.join(FAMILIES)}")
    provenance = reader.string(content, "provenance")
    stored = content["fit"]
    reader.require_object(stored, "fit")
    evidence = content.get("evidence")
    if evidence is not None:
        reader.require_object(evidence, "evidence")
    form = stored.get("form")
    if form == MODEL_FORM:
        return _model_calibration_from(content, reader, name, family, provenance, evidence)
    if form != FIT_FORM:
        raise UserInputError(
            f"{path}: key fit.form is {form!r}; this dkd-tune reads {FIT_FORM!r} and {MODEL_FORM!r} "
            "(a 'response_surface' file was written by an older validate-beta: run it again to refit)"
        )
    raw_points = content["points"]
    if not isinstance(raw_points, list) or len(raw_points) < 2:
        raise UserInputError(f"{path}: key points must be a list of at least 2 points")
    points = []
    for index, raw in enumerate(raw_points):
        where = f"points[{index}]"
        reader.require_object(raw, where)
        reader.require_keys(raw, where, required=("teacher", "mean_logit_gap", "best_beta", "source"))
        points.append(
            CalibrationPoint(
                teacher=reader.string(raw, "teacher", where),
                mean_logit_gap=reader.number(raw, "mean_logit_gap", where),
                best_beta=reader.number(raw, "best_beta", where, positive=True),
                source=reader.string(raw, "source", where),
            )
        )
    window = content.get("window") or {
        "k": DEFAULT_WINDOW_K,
        "residual_scale_floor": DEFAULT_RESIDUAL_SCALE_FLOOR,
    }
    reader.require_object(window, "window")
    reader.require_keys(window, "window", required=("k", "residual_scale_floor"))
    try:
        calibration = fit_calibration(
            points,
            family,
            provenance,
            name=name,
            window_k=reader.number(window, "k", "window", positive=True),
            residual_scale_floor=reader.number(window, "residual_scale_floor", "window", positive=True),
            evidence=evidence,
        )
    except UserInputError as error:
        raise UserInputError(f"{path}: {error}") from None
    _check_stored_fit(stored, calibration, reader)
    return calibration


def _model_calibration_from(
    content, reader: _FileReader, name, family, provenance, evidence
) -> ModelCalibration:
    stored = content["fit"]
    reader.require_keys(
        stored, "fit", required=("form", "formula", "feature", "log2_beta_range", "slope", "slope_sd")
    )
    feature = stored["feature"]
    if feature is not None and feature not in FEATURES:
        raise UserInputError(
            f"{reader.path}: key fit.feature is {feature!r}, expected null or one of {', '.join(FEATURES)}"
        )
    beta_range = stored["log2_beta_range"]
    if not (
        isinstance(beta_range, list)
        and len(beta_range) == 2
        and all(_is_finite_number(v) for v in beta_range)
    ):
        raise UserInputError(f"{reader.path}: key fit.log2_beta_range must be a list [low, high] of numbers")
    raw_points = content["points"]
    if not isinstance(raw_points, list) or len(raw_points) < 2:
        raise UserInputError(f"{reader.path}: key points must be a list of at least 2 teachers")
    teachers = []
    curve_keys = tuple(f.name for f in dataclasses.fields(TeacherCurve))
    for index, raw in enumerate(raw_points):
        where = f"points[{index}]"
        reader.require_object(raw, where)
        reader.require_keys(raw, where, required=("teacher", "architecture", "features", "curve"))
        reader.require_object(raw["features"], f"{where}.features")
        reader.require_object(raw["curve"], f"{where}.curve")
        reader.require_keys(raw["curve"], f"{where}.curve", required=curve_keys)
        features = {key: reader.number(raw["features"], key, f"{where}.features") for key in raw["features"]}
        if "gap" not in features:
            raise UserInputError(f"{reader.path}: missing key {where}.features.gap")
        curve = TeacherCurve(
            **{key: reader.number(raw["curve"], key, f"{where}.curve") for key in curve_keys}
        )
        teachers.append(
            CalibratedTeacher(
                reader.string(raw, "teacher", where),
                reader.string(raw, "architecture", where),
                features,
                curve,
            )
        )
    held_out = content.get("held_out") or {}
    reader.require_object(held_out, "held_out")
    calibration = ModelCalibration(
        name=name, family=family, provenance=provenance, teachers=tuple(teachers), feature=feature,
        log2_beta_range=(float(beta_range[0]), float(beta_range[1])), held_out=held_out, evidence=evidence,
    )  # fmt: skip
    try:
        slope, slope_sd = calibration.model.slope()
    except ValueError as error:
        raise UserInputError(f"{reader.path}: {error}") from None
    for key, value in (("slope", slope), ("slope_sd", slope_sd)):
        given = stored[key]
        if not (_is_finite_number(given) and math.isclose(given, value, rel_tol=1e-6, abs_tol=1e-9)):
            raise UserInputError(
                f"{reader.path}: key fit.{key} is {_short(given)} but the file's teachers give {value:.6g}; "
                "the fit must come from the points (run `dkd-tune validate-beta` again to refit)"
            )
    return calibration


def _check_stored_fit(stored: Any, calibration: Calibration, reader: _FileReader) -> None:
    """The file's fit block is written for readers; refuse it when it disagrees with the points."""
    reader.require_object(stored, "fit")
    expected = calibration.to_dict()["fit"]
    reader.require_keys(stored, "fit", required=tuple(expected))
    for key, value in expected.items():
        given = stored[key]
        if isinstance(value, float):
            matches = isinstance(given, (int, float)) and math.isclose(
                given, value, rel_tol=_RELATIVE_TOLERANCE, abs_tol=_RELATIVE_TOLERANCE
            )
        elif isinstance(value, list):
            matches = (
                isinstance(given, list)
                and len(given) == len(value)
                and all(
                    isinstance(item, (int, float)) and math.isclose(item, want, rel_tol=_RELATIVE_TOLERANCE)
                    for item, want in zip(given, value, strict=True)
                )
            )
        else:
            matches = given == value
        if not matches:
            raise UserInputError(
                f"{reader.path}: key fit.{key} is {_short(given)} but the file's points give {_short(value)}; "
                "the fit must come from the points (regenerate the file with `dkd-tune calibrate`)"
            )


class _FileReader:
    """Typed access to a calibration file's JSON with one-line errors naming the file and key."""

    def __init__(self, path: Path):
        self.path = path

    def _key(self, where: str, key: str) -> str:
        return f"{where}.{key}" if where else key

    def require_object(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise UserInputError(
                f"{self.path}: {'key ' + where if where else 'content'} must be a JSON object, "
                f"got {type(value).__name__}"
            )

    def require_keys(
        self, value: dict, where: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> None:
        missing = [key for key in required if key not in value]
        if missing:
            raise UserInputError(f"{self.path}: missing key {self._key(where, missing[0])}")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            raise UserInputError(
                f"{self.path}: unknown key {self._key(where, unknown[0])} "
                f"(expected {', '.join(list(required) + list(optional))})"
            )

    def string(self, value: dict, key: str, where: str = "") -> str:
        item = value[key]
        if not isinstance(item, str):
            raise UserInputError(
                f"{self.path}: key {self._key(where, key)} must be a string, got {_short(item)}"
            )
        return item

    def number(self, value: dict, key: str, where: str = "", positive: bool = False) -> float:
        item = value[key]
        if not _is_finite_number(item) or (positive and item <= 0):
            expected = "a positive finite number" if positive else "a finite number"
            raise UserInputError(
                f"{self.path}: key {self._key(where, key)} must be {expected}, got {_short(item)}"
            )
        return float(item)


def _check_family(family: Any, what: str) -> None:
    if family not in FAMILIES:
        raise UserInputError(
            f"{what} {family!r} is not a known dataset family (expected one of {', '.join(FAMILIES)})"
        )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _beta_from_log(log_beta: float) -> float:
    """exp(), returning the clamp bounds exactly (exp(log(16)) is not 16.0 in floating point)."""
    if log_beta <= math.log(BETA_MIN):
        return BETA_MIN
    if log_beta >= math.log(BETA_MAX):
        return BETA_MAX
    return math.exp(log_beta)


def _safe_exp(value: float) -> float:
    return math.exp(min(value, 700.0))


def _round_outward(value: float, up: bool) -> float:
    """Round to 3 significant digits away from the window's centre, so rounding never narrows it."""
    exponent = math.floor(math.log10(value)) - 2
    scaled = value / 10.0**exponent
    rounded = math.ceil(scaled - 1e-9) if up else math.floor(scaled + 1e-9)
    return float(f"{rounded * 10.0**exponent:.3g}")


def _format_json(value: Any, indent: int = 0, width: int = 100) -> str:
    """JSON with objects and lists of scalars kept on one line when they fit, for files people read."""
    compact = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or not value:
        return compact
    items = value.values() if isinstance(value, dict) else value
    if all(not isinstance(item, (dict, list)) for item in items) and indent + len(compact) <= width:
        return compact
    inner = " " * (indent + 2)
    if isinstance(value, dict):
        items = [
            f"{inner}{json.dumps(key, ensure_ascii=False)}: {_format_json(item, indent + 2, width)}"
            for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{inner}{_format_json(item, indent + 2, width)}" for item in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
