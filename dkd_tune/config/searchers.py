"""The search algorithms a search file can name (`search.algorithm`), one row each: what they take, how they expand.

A row names its builder as "module:function" (resolved when a search starts, like an entry point),
so this table sits on the config floor while the builders, which import Ray and Optuna, sit in
`search/`. Adding a searcher is a row here and its builder there. The Optuna searcher's samplers
are rows of their own (`OPTUNA_SAMPLERS`), chosen by whether a searched value has a prior.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ALL_KINDS = ("uniform", "loguniform", "int", "choice", "grid", "fixed")


def resolve_builder(path: str) -> Callable[..., Any]:
    """The function a row names as "module:function" (imported when a search starts)."""
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


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
        return resolve_builder(self.builder)(*args, **kwargs)


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


@dataclass(frozen=True)
class SamplerKind:
    """One Optuna sampler the `optuna` searcher can draw trials with."""

    name: str
    description: str
    for_priors: bool  # used when some searched value has a prior (`prior:` or `beta: auto`), else not
    builder: str  # "module:function" -> builder(space, priors, startup_trials) -> optuna sampler

    def build(self, *args: Any, **kwargs: Any):
        return resolve_builder(self.builder)(*args, **kwargs)


OPTUNA_SAMPLERS: dict[str, SamplerKind] = {
    row.name: row
    for row in (
        SamplerKind(
            "tpe",
            "Optuna's multivariate TPE",
            for_priors=False,
            builder="dkd_tune.search.tuner:tpe_sampler",
        ),
        SamplerKind(
            "prior-guided",
            "uniform, prior and TPE proposals, the prior's share decaying as results come in",
            for_priors=True,
            builder="dkd_tune.search.prior_sampler:prior_guided_sampler",
        ),
    )
}


def optuna_sampler_kind(has_priors: bool) -> SamplerKind:
    """The sampler row for a part with (or without) priors."""
    return next(row for row in OPTUNA_SAMPLERS.values() if row.for_priors == has_priors)


def searchers_taking(kind: str) -> list[str]:
    """The searchers that take the distribution kind `kind` (for "needs search.algorithm ..." messages)."""
    return [row.name for row in SEARCHERS.values() if kind in row.searches]
