"""The searchers table: `search.algorithm`'s values are its rows, and a search builds whatever its row names."""

from __future__ import annotations

import dataclasses
import importlib
import typing

from dkd_tune.config.schema import Distribution, SearchAlgorithm
from dkd_tune.config.searchers import SEARCHERS
from dkd_tune.search import tuner
from tests.test_search_spaces import demo_part, with_search


def test_the_schema_takes_exactly_the_tables_searchers_and_each_builder_resolves():
    annotation = SearchAlgorithm.model_fields["algorithm"].annotation
    assert typing.get_args(annotation) == tuple(SEARCHERS)
    for row in SEARCHERS.values():
        module, _, function = row.builder.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), row.name
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
