"""The search algorithms a search file can name (`search.algorithm`), one row each: what they take, how they expand.

A row names its builder as "module:function" (resolved when a search starts, like an entry point),
so this table sits on the config floor while the builders, which import Ray and Optuna, sit in
`search/`. Adding a searcher is a row here and its builder there.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

ALL_KINDS = ("uniform", "loguniform", "int", "choice", "grid", "fixed")


@dataclass(frozen=True)
class SearcherKind:
    """One value of `search.algorithm`."""

    name: str
    description: str
    searches: tuple[str, ...]  # the distribution kinds it takes (`fixed`: one value)
    expands: tuple[
        str, ...
    ]  # the kinds whose every value is tried, each num_samples times (Tune's grid_search)
    takes_priors: bool  # `prior:` and `beta: auto` (the prior-guided sampler)
    builder: str  # "module:function" -> (searcher, Tuner param_space, num_samples); see search/tuner.py

    def build(self, *args: Any, **kwargs: Any):
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(*args, **kwargs)


SEARCHERS: dict[str, SearcherKind] = {
    row.name: row
    for row in (
        SearcherKind(
            "optuna",
            "Optuna: TPE, or the prior-guided sampler when a value has a prior (prior: or beta: auto)",
            searches=("uniform", "loguniform", "int", "choice", "fixed"),
            expands=(),
            takes_priors=True,
            builder="dkd_tune.search.tuner:optuna_searcher",
        ),
        SearcherKind(
            "random",
            "Ray Tune's random sampling; every grid value is tried",
            searches=ALL_KINDS,
            expands=("grid",),
            takes_priors=False,
            builder="dkd_tune.search.tuner:variant_searcher",
        ),
        SearcherKind(
            "grid",
            "every combination of the grid and choice values",
            searches=("choice", "grid", "fixed"),
            expands=("grid", "choice"),
            takes_priors=False,
            builder="dkd_tune.search.tuner:variant_searcher",
        ),
    )
}

SEARCHER_NAMES = tuple(SEARCHERS)


def searchers_taking(kind: str) -> list[str]:
    """The searchers that take the distribution kind `kind` (for "needs search.algorithm ..." messages)."""
    return [row.name for row in SEARCHERS.values() if kind in row.searches]
