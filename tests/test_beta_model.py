"""Auto-beta's model: a teacher's curve and its peak's error, the hierarchical prediction, its pick."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dkd_tune.teacher.beta_model import (
    CalibratedTeacher,
    Predictive,
    TeacherCurve,
    fit_beta_model,
    fit_teacher_curve,
    pooled_curvatures,
)

LADDER = np.log2([0.25, 0.5, 1, 2, 4, 8, 16])
X = LADDER


def curve_data(peak, k_left=1.0, k_right=2.0, sd=0.5, seeds=3, seed=0):
    rng = np.random.default_rng(seed)
    x = LADDER
    mean = 70 - np.where(x < peak, k_left, k_right) * (x - peak) ** 2
    return mean[:, None] + rng.normal(0, sd, (len(X), seeds))


def test_an_exact_asymmetric_parabola_is_recovered():
    exact = np.repeat((70 - np.where(X < 1.0, 0.8, 3.0) * (X - 1.0) ** 2)[:, None], 3, axis=1)
    exact[:, 0] += 1e-6  # a seed spread of (almost) nothing
    exact[:, 1] -= 1e-6
    curve = fit_teacher_curve(X, exact)
    assert curve.peak == pytest.approx(1.0, abs=1e-9)
    assert (curve.k_left, curve.k_right) == pytest.approx((0.8, 3.0), rel=1e-6)
    assert curve.loss(np.array([0.0, 2.0])) == pytest.approx([0.8, 3.0])


def test_a_flat_curve_has_an_uncertain_peak_and_a_sharp_one_a_certain_peak():
    sharp = fit_teacher_curve(X, curve_data(1.0, 2.0, 2.0))
    flat = fit_teacher_curve(X, curve_data(1.0, 0.05, 0.05))
    assert sharp.peak_se < 0.3 < flat.peak_se


def test_a_monotone_curve_peaks_at_or_beyond_the_grid_end():
    rising = np.repeat((60 + 1.5 * X)[:, None], 3, axis=1) + np.random.default_rng(0).normal(0, 0.1, (7, 3))
    assert fit_teacher_curve(X, rising).peak >= X.max()


def teachers_on_a_line(slope=0.8, arch_effect=None, noise=0.0, seed=0):
    """Teachers whose true peak is -1 + slope * gap (+ an effect per architecture)."""
    rng = np.random.default_rng(seed)
    arch_effect = arch_effect or {"a": 0.0, "b": 0.0, "c": 0.0}
    teachers = []
    for i, (arch, gap) in enumerate([(a, g) for a in arch_effect for g in (2.0, 3.5, 5.0)]):
        peak = -1 + slope * gap + arch_effect[arch] + rng.normal(0, noise)
        curve = TeacherCurve(peak=peak, peak_se=0.1, level=70, k_left=1.0, k_right=2.0, noise_variance=0.1)
        teachers.append(
            CalibratedTeacher(f"{arch}{i}", arch, {"gap": gap, "other": float(rng.normal())}, curve)
        )
    return teachers


def test_a_clear_relation_is_found_and_predicted():
    model = fit_beta_model(teachers_on_a_line(), "gap")
    slope, sd = model.slope()
    assert slope == pytest.approx(0.8, abs=0.1) and sd < 0.2
    predicted = model.predict({"gap": 4.0}, "new-architecture")
    assert predicted.mean == pytest.approx(-1 + 0.8 * 4.0, abs=0.3)


def test_an_unseen_architecture_is_predicted_with_more_doubt_than_a_seen_one():
    teachers = teachers_on_a_line(arch_effect={"a": -1.0, "b": 0.0, "c": 1.2})
    model = fit_beta_model(teachers, "gap")
    seen, unseen = model.predict({"gap": 3.5}, "c"), model.predict({"gap": 3.5}, "zzz")
    assert seen.mean == pytest.approx(-1 + 0.8 * 3.5 + 1.2, abs=0.4)
    assert unseen.sd > seen.sd
    low, high = unseen.interval(0.8)
    assert low < unseen.mean < high


def test_without_a_feature_one_peak_serves_every_teacher():
    model = fit_beta_model(teachers_on_a_line(), None, uses_architecture=False)
    assert model.slope() == (0.0, 0.0)
    first, second = model.predict(None), model.predict({"gap": 99.0})
    assert first.mean == pytest.approx(second.mean)


def test_a_missing_feature_is_refused():
    teachers = teachers_on_a_line()
    with pytest.raises(ValueError, match="missing"):
        fit_beta_model(teachers, "standardized_gap")
    with pytest.raises(ValueError, match="at least 2"):
        fit_beta_model(teachers[:1], "gap")


def test_the_pick_leans_away_from_the_steep_side():
    predictive = Predictive(np.array([1.0]), np.array([1.0]), np.array([1.0]))
    candidates = np.linspace(-2, 4, 601)
    assert predictive.pick(candidates, 1.0, 1.0) == pytest.approx(1.0, abs=0.02)
    # A cliff at large beta (right side steep): pick a smaller beta than the mean.
    assert predictive.pick(candidates, 1.0, 4.0) < 0.7
    assert predictive.pick(candidates, 4.0, 1.0) > 1.3


def test_predictive_quantiles_and_density_of_a_mixture():
    predictive = Predictive(np.array([0.5, 0.5]), np.array([0.0, 2.0]), np.array([1.0, 1.0]))
    assert predictive.mean == pytest.approx(1.0)
    assert predictive.sd == pytest.approx(math.sqrt(2.0))
    assert predictive.cdf(predictive.quantile(0.3)) == pytest.approx(0.3, abs=1e-6)
    single = Predictive(np.array([1.0]), np.array([0.0]), np.array([1.0]))
    assert single.log_density(0.0) == pytest.approx(-0.5 * math.log(2 * math.pi))
    assert single.log_density(0.0, extra_variance=3.0) == pytest.approx(-0.5 * math.log(2 * math.pi * 4))


def test_pooled_curvatures_ignore_sides_without_data():
    teachers = teachers_on_a_line()
    edge = TeacherCurve(peak=-3.0, peak_se=0.5, level=60, k_left=0.0, k_right=5.0, noise_variance=0.1)
    teachers.append(CalibratedTeacher("edge", "a", {"gap": 1.0}, edge))
    left, right = pooled_curvatures(teachers)
    assert left == pytest.approx(1.0) and right == pytest.approx(2.0)


def test_the_feature_is_chosen_by_held_out_score_and_none_when_too_few_teachers_can_score_it():
    from analysis.beta_ground_truth import choose_feature

    teachers = teachers_on_a_line(slope=1.2, noise=0.05)
    assert choose_feature(teachers) == "gap"  # "other" is noise: it predicts held-out peaks worse
    # Two teachers: leaving one out leaves one to fit on, so no feature can be scored.
    assert choose_feature(teachers[:2]) is None
