"""Auto-beta: predict DKD's NCKD weight beta from the teacher's mean logit gap, and fit, save and load the calibrations behind it.

The paper's appendix (A.3) observes that the best beta grows with the teacher's mean gap
``z_t - z_max`` between the target logit and the largest non-target logit. A *calibration* is a
handful of (teacher, gap, best beta) points measured on one dataset family, plus a fit through
them. Gaps are not comparable across datasets (more classes and different recipes move them), so
every calibration belongs to exactly one family and is refused for another.

The fit is ``log(beta) = intercept + slope * gap`` with ``slope >= 0``:

* two parameters, because a calibration has a few noisy points (the paper's has six);
* in log-beta, because beta is searched on a log scale and the paper's best betas span 2..8,
  so a miss by a factor of two should cost the same at beta 2 as at beta 8 (the gap itself is a
  difference of logits, i.e. already a log-odds, so it enters linearly);
* monotone non-decreasing (slope held at 0 when the points say otherwise), because the
  appendix's claim is that a more confident teacher wants at least as much NCKD; a falling fit
  from noisy points would invert that advice.

The search window around a prediction is multiplicative, ``beta * exp(+-k * s * lev)``, where
``s`` is the fit's residual scale in log units and ``lev = sqrt(1 + 1/n + (gap - mean)^2 / Sxx)``
is the usual prediction-interval widening, so the window grows away from the calibrated gaps.
``s`` has a floor: the best betas come from coarse grids (the paper's steps are up to an octave
apart), so even a perfect fit only knows them to a rounding error of about ``ln 2 / sqrt 12``
(the standard deviation of a uniform error over one octave); two points fit exactly and would
otherwise give a zero-width window.

Predictions and window ends are clamped to ``[BETA_MIN, BETA_MAX]`` = [0.25, 16]: 0.25 is the
smallest beta the paper uses (MS-COCO, A.2) and 16 is twice the largest best beta it reports
(8, Table A.2). A.3 warns that too large a beta harms the student's target-class prediction,
no teacher in Table A.1 does best above beta 8 (at 10 all three are below their best), and A.2
needs a 20-epoch warm-up because large betas make the initial loss large. An exponential fit
extrapolated a few gap units leaves that range quickly.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_text
from dkd_tune.teacher.beta_surface import SurfaceFit

FORMAT = "dkd-tune-beta-calibration"
FORMAT_VERSION = 1
FAMILIES = ("cifar", "imagenet", "synthetic", "coco")
FIT_FORM = "log_beta_linear_in_gap"
FIT_FORMULA = "beta = exp(intercept + slope * mean_logit_gap), slope >= 0"
SURFACE_FORM = "response_surface"
SURFACE_FORMULA = (
    "top-1(teacher, beta) = level(teacher) - curvature * (log2(beta) - intercept - slope * mean_logit_gap)^2"
)

BETA_MIN = 0.25
BETA_MAX = 16.0
DEFAULT_WINDOW_K = 2.0
DEFAULT_RESIDUAL_SCALE_FLOOR = math.log(2.0) / math.sqrt(12.0)

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
    """A predicted beta for one teacher gap, the log-uniform window to search around it, and any warnings."""

    gap: float
    beta: float
    low: float
    high: float
    extrapolated: bool
    clamped: bool
    warnings: tuple[str, ...]
    calibration: str
    family: str

    def search_window(self) -> tuple[float, float]:
        """(low, high) rounded outward to 3 significant digits, so rounding never narrows the window."""
        return _round_outward(self.low, up=False), _round_outward(self.high, up=True)

    def search_space_yaml(self) -> str:
        """The `space:` block of one teacher's search-space entry, narrowed to this window."""
        low, high = self.search_window()
        return (
            "space:\n"
            f"  # auto-beta: gap {self.gap:.2f} -> beta {self.beta:.3g} "
            f"(calibration {self.calibration!r}, family {self.family})\n"
            f"  beta: {{loguniform: [{low!r}, {high!r}]}}\n"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "gap": self.gap,
            "beta": self.beta,
            "low": self.low,
            "high": self.high,
            "extrapolated": self.extrapolated,
            "clamped": self.clamped,
            "warnings": list(self.warnings),
            "calibration": self.calibration,
            "family": self.family,
        }


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
    window_k: float = DEFAULT_WINDOW_K
    residual_scale_floor: float = DEFAULT_RESIDUAL_SCALE_FLOOR
    evidence: dict[str, Any] | None = field(default=None, compare=False)
    surface: SurfaceFit | None = None  # a grid's response surface (then the points are its oracle betas)

    @property
    def gap_range(self) -> tuple[float, float]:
        gaps = [point.mean_logit_gap for point in self.points]
        return min(gaps), max(gaps)

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

    def predict(self, gap: float, *, teacher_acc: float | None = None) -> BetaSuggestion:
        """The beta for a teacher with this mean logit gap, its search window, and warnings.

        The fit is never extrapolated: a gap outside the calibrated range is read at the nearest
        calibrated gap. With `teacher_acc` (test top-1, %) and a calibration that knows the student
        trained alone, a teacher no better than that student gets the window's smallest beta.
        """
        if not _is_finite_number(gap):
            raise UserInputError(f"teacher gap must be a finite number, got {gap!r}")
        gap = float(gap)
        low_gap, high_gap = self.gap_range
        extrapolated = not low_gap <= gap <= high_gap
        warnings = []
        if extrapolated:
            warnings.append(
                f"gap {gap:.2f} is outside the calibrated range [{low_gap:.2f}, {high_gap:.2f}] of "
                f"calibration {self.name!r} ({len(self.points)} teachers, family {self.family}); "
                f"the prediction is the one at gap {min(max(gap, low_gap), high_gap):.2f} (never extrapolated): "
                "search the whole window"
            )
        if self.surface is not None:
            return self._predict_on_surface(gap, extrapolated, warnings, teacher_acc)
        log_min, log_max = math.log(BETA_MIN), math.log(BETA_MAX)
        log_raw = self.intercept + self.slope * min(max(gap, low_gap), high_gap)
        log_beta = min(max(log_raw, log_min), log_max)
        half_width = self.window_k * self.residual_scale * self._leverage(gap)
        log_low = min(max(log_beta - half_width, log_min), log_max)
        log_high = min(max(log_beta + half_width, log_min), log_max)
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
        return BetaSuggestion(
            gap=gap,
            beta=_beta_from_log(log_beta),
            low=_beta_from_log(log_low),
            high=_beta_from_log(log_high),
            extrapolated=extrapolated,
            clamped=clamped,
            warnings=tuple(warnings),
            calibration=self.name,
            family=self.family,
        )

    def _predict_on_surface(
        self, gap: float, extrapolated: bool, warnings: list[str], teacher_acc: float | None
    ) -> BetaSuggestion:
        surface = self.surface
        assert surface is not None
        peak, _ = surface.peak(gap)
        width = surface.half_width()
        low_x, high_x = surface.log2_beta_range
        low, high = max(peak - width, low_x), min(peak + width, high_x)
        student = (self.evidence or {}).get("student_alone_test_acc")
        if teacher_acc is not None and isinstance(student, (int, float)) and teacher_acc <= student:
            warnings.append(
                f"the teacher's test top-1 {teacher_acc:.2f}% is no better than the student trained alone in "
                f"this calibration ({student:.2f}%): DKD may not help; suggesting the window's smallest beta"
            )
            peak = low
        return BetaSuggestion(
            gap=gap,
            beta=2.0**peak,
            low=2.0**low,
            high=2.0**high,
            extrapolated=extrapolated,
            clamped=False,
            warnings=tuple(warnings),
            calibration=self.name,
            family=self.family,
        )

    def _leverage(self, gap: float) -> float:
        gaps = [point.mean_logit_gap for point in self.points]
        mean = math.fsum(gaps) / len(gaps)
        spread = math.fsum((value - mean) ** 2 for value in gaps)
        offset = gap - mean
        # A product overflows to inf (a window clamped to the whole range) where ** would raise.
        return math.sqrt(1.0 + 1.0 / len(gaps) + offset * offset / spread)

    def report(self) -> str:
        """Human-readable summary: the fit, then each point's searched beta next to the prediction."""
        low_gap, high_gap = self.gap_range
        lines = [
            f"calibration {self.name!r}: family {self.family}, {len(self.points)} teachers, "
            f"gaps {low_gap:.2f}..{high_gap:.2f}",
            f"fit: beta = {math.exp(self.intercept):.4g} * exp({self.slope:.4g} * gap)"
            + (
                f"  (beta doubles every {math.log(2.0) / self.slope:.2f} gap units)"
                if self.slope > 0
                else "  (slope held at 0: the points do not show beta growing with the gap)"
            ),
            f"window: beta * exp(+-{self.window_k:g} * {self.residual_scale:.3f} * leverage)  "
            f"(residual scale fitted {self.residual_scale_fitted:.3f}, floor {self.residual_scale_floor:.3f}, log units)",
        ]
        header = ("teacher", "gap", "best beta", "predicted", "window", "error (log2)")
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
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
        for row in [header, *rows]:
            lines.append(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            )
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
            "window": {"k": self.window_k, "residual_scale_floor": self.residual_scale_floor},
        }
        if self.surface is not None:
            content["fit"] = {"form": SURFACE_FORM, "formula": SURFACE_FORMULA, **self.surface.to_dict()}
        if self.evidence is not None:
            content["evidence"] = self.evidence
        return content


@dataclass(frozen=True)
class BetaPrior:
    """Auto-beta as a search's prior: the trials to start from, and the whole calibrated range to search after."""

    suggestion: BetaSuggestion
    beta_range: tuple[float, float]

    def first_betas(self) -> list[float]:
        """The predicted beta first (Optuna's first trial), then the window's ends, each once."""
        betas: list[float] = []
        for beta in (self.suggestion.beta, self.suggestion.low, self.suggestion.high):
            beta = min(max(beta, self.beta_range[0]), self.beta_range[1])
            if all(not math.isclose(beta, seen, rel_tol=1e-6) for seen in betas):
                betas.append(beta)
        return betas

    def describe(self) -> str:
        s = self.suggestion
        return (
            f"beta {s.beta:.3g}, window [{s.low:.3g}, {s.high:.3g}] (calibration {s.calibration!r}, gap {s.gap:.2f}); "
            f"then TPE over [{self.beta_range[0]:g}, {self.beta_range[1]:g}]"
        )


def beta_prior(calibration: Calibration, gap: float, teacher_acc: float | None = None) -> BetaPrior:
    """The prior `beta: auto` gives a teacher: its suggestion, and the range the calibration covers."""
    suggestion = calibration.predict(gap, teacher_acc=teacher_acc)
    if calibration.surface is not None:
        low, high = calibration.surface.log2_beta_range
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


def default_calibration(family: str) -> Calibration:
    """The calibration dkd-tune ships for a dataset family (only "cifar", from the paper's Table A.2)."""
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


def default_calibration_or_none(family: str) -> Calibration | None:
    """The calibration dkd-tune ships for `family`, or None when it ships none (imagenet, synthetic)."""
    _check_family(family, "family")
    return default_calibration(family) if family in _DEFAULT_FILES else None


def load_calibration(path: str | os.PathLike | None, family: str) -> Calibration:
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
        low, high = suggestion.search_window()
        lines = [f"gap {suggestion.gap:.2f}: beta {suggestion.beta:.3g}, search window [{low:g}, {high:g}]"]
        lines += [f"warning: {warning}" for warning in suggestion.warnings]
        lines.append(suggestion.search_space_yaml().rstrip("\n"))
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def save_calibration(calibration: Calibration, path: str | os.PathLike) -> None:
    """Write the calibration as human-readable JSON, atomically."""
    atomic_write_text(path, _format_json(calibration.to_dict()) + "\n")


def read_calibration(path: str | os.PathLike) -> Calibration:
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


def _calibration_from_content(content: Any, path: Path) -> Calibration:
    reader = _FileReader(path)
    reader.require_object(content, "")
    reader.require_keys(
        content,
        "",
        required=("format", "format_version", "name", "family", "provenance", "points", "fit", "window"),
        optional=("evidence",),
    )
    if content["format"] != FORMAT:
        raise UserInputError(f"{path}: key format is {content['format']!r}, expected {FORMAT!r}")
    version = content["format_version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UserInputError(
            f"{path}: key format_version is {version!r}; this dkd-tune reads version {FORMAT_VERSION}"
        )
    name = reader.string(content, "name")
    family = reader.string(content, "family")
    if family not in FAMILIES:
        raise UserInputError(f"{path}: key family is {family!r}, expected one of {', '.join(FAMILIES)}")
    provenance = reader.string(content, "provenance")
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
    window = content["window"]
    reader.require_object(window, "window")
    reader.require_keys(window, "window", required=("k", "residual_scale_floor"))
    evidence = content.get("evidence")
    if evidence is not None:
        reader.require_object(evidence, "evidence")
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
    stored = content["fit"]
    if isinstance(stored, dict) and stored.get("form") == SURFACE_FORM:
        return surface_calibration(calibration, _surface_from(stored, reader))
    _check_stored_fit(stored, calibration, reader)
    return calibration


def surface_calibration(calibration: Calibration, surface: SurfaceFit) -> Calibration:
    """`calibration` predicting from a grid's response surface (its points are then the grid's oracle betas)."""
    ln2 = math.log(2.0)
    return dataclasses.replace(
        calibration,
        surface=surface,
        intercept=surface.intercept * ln2,
        slope=surface.slope * ln2,
        slope_held_at_zero=surface.slope == 0,
    )


def _surface_from(stored: dict, reader: _FileReader) -> SurfaceFit:
    keys = ("intercept", "slope", "curvature", "gap_range", "log2_beta_range", "noise_variance", "teachers")
    reader.require_keys(stored, "fit", required=("form", "formula", *keys))
    for key in ("intercept", "slope", "curvature", "noise_variance"):
        reader.number(stored, key, "fit")
    for key in ("gap_range", "log2_beta_range"):
        value = stored[key]
        if not (isinstance(value, list) and len(value) == 2 and all(_is_finite_number(v) for v in value)):
            raise UserInputError(f"{reader.path}: key fit.{key} must be a list [low, high] of numbers")
        if value[0] > value[1]:
            raise UserInputError(f"{reader.path}: key fit.{key} is {value}; expected low <= high")
    if stored["curvature"] < 0:
        raise UserInputError(f"{reader.path}: key fit.curvature is {stored['curvature']!r}; expected >= 0")
    return SurfaceFit.from_dict(stored)


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
