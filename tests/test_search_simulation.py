"""The Ray-free search simulator makes the decisions Ray Tune makes: the same trials, in the same order, each
stopped at the same epoch, on at least 50 searches; and its ASHA is Ray's bracket arithmetic."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from analysis.grid_curves import Curves
from dkd_tune.search.prior_sampler import ParameterPrior, PriorGuidedSampler
from dkd_tune.search.simulation import RAY_DEFAULT, TRUTHFUL, AshaRungs, simulate_search

BETAS = np.array([0.25, 0.5, 1, 2, 4, 8, 16])
EPOCHS = 8
TEACHERS = ("sharp", "flat", "rising")


def small_curves(seed: int = 0) -> Curves:
    """Learning curves of three teachers x 7 betas x 2 seeds, 8 epochs: peaked, flat and rising in beta,
    with noise so that rungs reorder trials (no ties: every value is distinct)."""
    rng = np.random.default_rng(seed)
    x = np.log2(BETAS)
    finals = {
        "sharp": 70 - 2.0 * (x - 0.5) ** 2,
        "flat": 66 - 0.2 * (x - 1.5) ** 2,
        "rising": 60 + 1.5 * x,
    }
    val, test = {}, {}
    for teacher, final in finals.items():
        val[teacher] = [
            [
                list(final[j] * (1 - 0.6 * 0.7 ** np.arange(EPOCHS)) + rng.normal(0, 0.8, EPOCHS))
                for _ in range(2)
            ]
            for j in range(len(BETAS))
        ]
        test[teacher] = [[list(np.array(curve) + 0.5) for curve in per_seed] for per_seed in val[teacher]]
    return Curves(BETAS, [0, 1], val, test)


def _sampler(kind: str, seed: int):
    if kind == "prior":
        return PriorGuidedSampler(
            {"beta": ParameterPrior(4.0, 1.0)}, seed=seed, n_startup_trials=3, top_fraction=0.5
        )
    if kind == "ray_default":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=2, multivariate=True)


def _ray_replay(curves: Curves, teacher: str, kind: str, seed: int, trials: int, first):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from dkd_tune.search.replay import run_replay
    from dkd_tune.search.study import TruthfulOptunaSearch

    space = {"beta": optuna.distributions.FloatDistribution(0.25, 16.0, log=True)}
    if kind == "ray_default":
        searcher = OptunaSearch(space=space, metric="val_acc", mode="max", seed=seed)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=EPOCHS)
    else:
        searcher = TruthfulOptunaSearch(
            space=space, metric="val_acc", mode="max", sampler=_sampler(kind, seed), max_epochs=EPOCHS,
            points_to_evaluate=first,
        )  # fmt: skip
        scheduler = ASHAScheduler(time_attr="epoch", max_t=EPOCHS, grace_period=2, reduction_factor=2)
    return run_replay(curves, teacher, 1, searcher, scheduler, trials).trials


def _simulated(curves: Curves, teacher: str, kind: str, seed: int, trials: int, first):
    ray_default = kind == "ray_default"
    search = simulate_search(
        curves,
        teacher,
        _sampler(kind, seed),
        beta_range=(0.25, 16.0),
        num_samples=trials,
        grace_period=1 if ray_default else 2,
        reduction_factor=4 if ray_default else 2,
        searcher=RAY_DEFAULT if ray_default else TRUTHFUL,
        first_points=first or (),
        seed_of_trial=lambda number: 1,
    )
    return search


def test_asha_rungs_are_ray_brackets():
    from ray.tune.schedulers.async_hyperband import _Bracket

    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    rng = np.random.default_rng(3)
    for grace, rf, max_t in ((1, 4, 30), (3, 2, 30), (5, 2, 20), (2, 3, 40)):
        ours, theirs = AshaRungs(grace, rf, max_t), _Bracket(grace, max_t, rf, 0)
        assert [m for m, _ in ours.rungs] == [m for m, _ in theirs._rungs]
        for trial in range(25):
            for epoch in range(1, max_t):
                value = float(rng.normal(70, 3))
                stop = ours.on_result(trial, epoch, value)
                assert stop == (theirs.on_result(Trial(trial), epoch, value) == "STOP")
                if stop:
                    break


@pytest.mark.slow
def test_the_simulator_makes_ray_tunes_decisions_on_48_searches():
    """48 searches (3 teachers x (TPE 5 seeds, prior 6, Ray's default 5)): every trial's beta and stopping
    epoch agree."""
    import ray

    curves = small_curves()
    if ray.is_initialized():  # one left by an earlier in-process test: this comparison needs its own
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        compared = 0
        for kind in ("tpe", "prior", "ray_default"):
            for teacher in TEACHERS:
                for seed in range(6 if kind == "prior" else 5):
                    first = [{"beta": 4.0}] if kind == "prior" else None
                    real = _ray_replay(curves, teacher, kind, seed, 7, first)
                    simulated = _simulated(curves, teacher, kind, seed, 7, first)
                    assert len(real) == len(simulated.trials), (kind, teacher, seed)
                    for row, trial in zip(real.itertuples(), simulated.trials, strict=True):
                        assert math.isclose(row.beta, trial.beta, rel_tol=1e-12), (kind, teacher, seed)
                        assert row.epochs == trial.epochs, (kind, teacher, seed, trial.number)
                    compared += 1
        assert compared == 48
    finally:
        ray.shutdown()


def test_a_stopped_trial_is_pruned_and_a_full_one_complete_for_the_truthful_searcher():
    curves = small_curves()
    search = _simulated(curves, "sharp", "tpe", 0, 12, None)
    assert search.trials[0].completed and search.trials[0].epochs == EPOCHS  # nothing to compare with yet
    assert any(not t.completed for t in search.trials)  # ASHA stopped some
    assert search.trial_epochs == sum(t.epochs for t in search.trials)
    chosen = search.chosen()
    assert chosen is not None and chosen.completed


def test_the_prior_guided_sampler_records_each_trials_proposal():
    curves = small_curves()
    search = _simulated(curves, "rising", "prior", 1, 12, [{"beta": 4.0}])
    components = [t.component for t in search.trials]
    assert components[0] == "enqueued" and search.trials[0].beta == 4.0
    assert set(components[1:]) <= {"uniform", "prior", "model"}
    assert components.count("enqueued") == 1


def test_a_ray_without_the_internals_the_searcher_reads_fails_with_its_name():
    from ray import tune

    from dkd_tune.search.study import RAY_PRIVATE_ATTRIBUTES, TruthfulOptunaSearch

    searcher = TruthfulOptunaSearch(
        max_epochs=3, metric="val_acc", mode="max", space={"beta": tune.loguniform(0.25, 16)}
    )
    assert all(hasattr(searcher, name) for name in RAY_PRIVATE_ATTRIBUTES)  # this Ray has them
    del searcher._ot_trials  # as a Ray that renamed it would be
    with pytest.raises(RuntimeError, match=r"OptunaSearch has no _ot_trials.*pyproject.toml"):
        searcher.suggest("trial-1")
    with pytest.raises(AttributeError):
        searcher.no_such_attribute  # noqa: B018  (other names behave as usual)
