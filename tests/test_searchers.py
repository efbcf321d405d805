"""The searchers table: `search.algorithm`'s values are its rows, and a search builds whatever its row names;
the Optuna searcher's samplers are rows too."""

from __future__ import annotations

import dataclasses
import typing

from dkd_tune.config.schema import Distribution, SearchAlgorithm
from dkd_tune.config.searchers import OPTUNA_SAMPLERS, SEARCHERS, resolve_builder
from dkd_tune.search import tuner
from tests.test_search_spaces import demo_part, with_search


def test_the_schema_takes_exactly_the_tables_searchers_and_each_builder_resolves():
    annotation = SearchAlgorithm.model_fields["algorithm"].annotation
    assert typing.get_args(annotation) == tuple(SEARCHERS)
    for row in SEARCHERS.values():
        assert callable(resolve_builder(row.builder)), row.name
        assert set(row.expands) <= set(row.searches)


def calls_builder(*args, **kwargs):
    return "built", args, kwargs


def test_a_search_builds_the_searcher_its_row_names(monkeypatch, tmp_path):
    space = with_search(demo_part(tmp_path)[0], algorithm="random")
    row = dataclasses.replace(SEARCHERS["random"], builder=f"{__name__}:calls_builder")
    monkeypatch.setitem(SEARCHERS, "random", row)
    searched = {"beta": Distribution.model_validate({"loguniform": [0.5, 8]})}
    built, args, kwargs = tuner.search_algorithm(space, searched, max_epochs=3)
    assert built == "built" and args == (space, searched) and kwargs["max_epochs"] == 3


def test_what_a_row_expands_sets_the_trial_count(tmp_path):
    space, teacher, _ = demo_part(tmp_path)
    space = space.model_copy(
        update={"space": {"temperature": Distribution.model_validate({"choice": [2, 4, 8]})}}
    )
    for algorithm, trials in (("optuna", 1), ("random", 1), ("grid", 3)):
        searched = with_search(space, algorithm=algorithm, num_samples=1)
        assert tuner.expected_trials(searched, teacher) == trials, algorithm


def test_each_sampler_row_resolves_and_one_serves_each_case():
    for row in OPTUNA_SAMPLERS.values():
        assert callable(resolve_builder(row.builder)), row.name
    assert sorted(row.for_priors for row in OPTUNA_SAMPLERS.values()) == [False, True]


def test_a_part_with_priors_draws_with_the_prior_row_and_one_without_with_the_other(monkeypatch, tmp_path):
    from dkd_tune.search.prior_sampler import ParameterPrior, PriorGuidedSampler

    space = demo_part(tmp_path)[0]
    priors = {"beta": ParameterPrior(2.0, 1.0)}
    assert isinstance(tuner.optuna_sampler(space, priors, enqueued=1), PriorGuidedSampler)
    assert type(tuner.optuna_sampler(space, {})).__name__ == "TPESampler"
    row = dataclasses.replace(OPTUNA_SAMPLERS["tpe"], builder=f"{__name__}:calls_builder")
    monkeypatch.setitem(OPTUNA_SAMPLERS, "tpe", row)
    built, args, _ = tuner.optuna_sampler(space, {}, enqueued=1)
    assert built == "built" and args[:2] == (space, {}) and args[2] >= 3  # start-up counts the enqueued trial
