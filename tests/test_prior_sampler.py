"""The prior-guided sampler: draws follow the prior before there is evidence, and the results decide how
much the prior counts afterwards; only its centre is ever enqueued."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from dkd_tune.search.prior_sampler import COMPONENT_ATTR, ParameterPrior, PriorGuidedSampler

SPACE = {"beta": optuna.distributions.FloatDistribution(0.25, 16.0, log=True)}


def study_with(sampler, trials: list[tuple[float, float]]) -> optuna.Study:
    """A study holding finished trials (beta, value at step 5), told as PRUNED at step 5."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for beta, value in trials:
        study.add_trial(
            optuna.trial.create_trial(
                params={"beta": beta},
                distributions=SPACE,
                intermediate_values={5: value},
                state=optuna.trial.TrialState.PRUNED,
            )
        )
    return study


def test_before_any_evidence_the_rest_goes_to_the_prior():
    sampler = PriorGuidedSampler({"beta": ParameterPrior(4.0, 0.75)}, seed=0, uniform_share=0.25)
    study = study_with(sampler, [(4.0, 70.0), (3.0, 69.0)])  # 2 results: fewer than min_results
    assert sampler.component_shares(study) == {"uniform": 0.25, "prior": 0.75, "model": 0.0}


def test_a_prior_far_from_the_best_trials_loses_its_share_and_a_close_one_keeps_it():
    optimum = 1.0  # log2 beta where the values are best
    trials = [(2.0**x, 70 - 3 * (x - optimum) ** 2) for x in (-2, -1, 0, 0.5, 1, 1.5, 2, 3, 4)]
    wrong = PriorGuidedSampler({"beta": ParameterPrior(16.0, 0.75)}, seed=0)
    right = PriorGuidedSampler({"beta": ParameterPrior(2.0, 0.75)}, seed=0)
    wrong_shares = wrong.component_shares(study_with(wrong, trials))
    right_shares = right.component_shares(study_with(right, trials))
    assert wrong_shares["prior"] < 0.15 and right_shares["prior"] > 0.3
    assert wrong_shares["model"] > 0.6
    assert all(math.isclose(sum(s.values()), 1.0) for s in (wrong_shares, right_shares))


def test_prior_draws_centre_on_the_prior_and_widen_as_trials_finish():
    sampler = PriorGuidedSampler(
        {"beta": ParameterPrior(2.0, 0.5)}, seed=1, uniform_share=0.0, min_results=10**6
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    early = []
    for _ in range(40):
        trial = study.ask(SPACE)
        early.append(math.log2(trial.params["beta"]))
        study.tell(trial, 0.0)
    assert np.mean(early[:10]) == pytest.approx(1.0, abs=0.4)
    assert np.std(early[:20]) < np.std(early[20:])  # the decayed prior is wider
    components = [t.user_attrs[COMPONENT_ATTR] for t in study.trials]
    assert set(components) == {"prior"}


def test_an_enqueued_centre_is_marked_and_the_rest_are_drawn():
    sampler = PriorGuidedSampler({"beta": ParameterPrior(4.0, 1.0)}, seed=2)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({"beta": 4.0})
    for _ in range(12):
        trial = study.ask(SPACE)
        trial.report(60 + float(np.random.default_rng(trial.number).normal()), 5)
        study.tell(trial, None, state=optuna.trial.TrialState.PRUNED)
    components = [t.user_attrs[COMPONENT_ATTR] for t in study.trials]
    assert components[0] == "enqueued" and study.trials[0].params["beta"] == 4.0
    assert components.count("enqueued") == 1
    assert set(components[1:]) <= {"uniform", "prior", "model"} and "uniform" in components


def test_the_search_file_builds_the_prior_guided_sampler_and_enqueues_only_the_centre(tmp_path):
    from dkd_tune.config.schema import Distribution
    from dkd_tune.search.tuner import optuna_sampler, prior_centre, search_algorithm
    from tests.test_search_spaces import demo_part

    space, _, plan = demo_part(tmp_path)
    searched = {
        "beta": Distribution(loguniform=[0.25, 16], prior={"centre": 2.0, "spread": 1.0}),
        "temperature": Distribution(choice=[2, 4]),
    }
    assert prior_centre(searched, plan.base_recipe)["beta"] == 2.0
    searcher, _, _ = search_algorithm(space, searched, max_epochs=4, base_recipe=plan.base_recipe)
    assert isinstance(searcher._sampler, PriorGuidedSampler)
    assert searcher._points_to_evaluate == [{"beta": 2.0, "temperature": 4}]
    assert isinstance(optuna_sampler(space, {}), optuna.samplers.TPESampler)
