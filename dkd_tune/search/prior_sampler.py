"""A prior-guided Optuna sampler: each trial drawn from uniform, the user's prior, or TPE around the incumbents,
with the prior's weight earned from the results (PriorBand's mixture, piBO's decay).

`beta: auto` (and any `prior:` in a search file) is a belief, not a set of hard first trials. A
wrong belief must not steer the search, so each new trial picks one of three proposals:

- **uniform** over the whole range, with a fixed share (`uniform_share`): the search never stops
  looking everywhere, whatever the prior says;
- **prior**: a draw from the prior, a normal distribution in the parameter's search space (log2
  for log-scaled parameters) truncated to its range, whose width grows with the number of
  finished trials (``spread * sqrt(1 + n / decay_trials)``), so it flattens as evidence arrives
  (piBO's decaying prior);
- **model**: TPE's proposal, which concentrates around the best trials so far.

The prior's and the model's shares of the rest are set as PriorBand sets them: at the highest
step (epoch) that at least `min_results` trials reached, take the top `top_fraction` of those
trials by their value there (the per-epoch values the truthful searcher reports, so pruned trials
count), and weigh each proposal by how densely it covers them (the decayed prior's density against
a narrow density around the incumbent). A prior that keeps proposing poor regions loses its share
to the model within a few rungs; a right one keeps it. Until any step has enough results, the
rest goes to the prior. Each trial's proposal is stored as its user attribute `prior_component`
(optuna-dashboard shows it); a trial enqueued by the caller (the prior's centre) is "enqueued".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from dkd_tune.config.schema import SearchSpaceFile

COMPONENT_ATTR = "prior_component"
COMPONENTS = ("uniform", "prior", "model", "enqueued")
UNIFORM_SHARE = 0.25
DECAY_TRIALS = 8.0
MIN_RESULTS = 3
INCUMBENT_WIDTH = 0.1  # the incumbent density's sd, as a share of each parameter's search-space width


@dataclass(frozen=True)
class ParameterPrior:
    """A normal belief about one parameter: its centre in the parameter's units, its spread in the search
    space's units (octaves for a log-scaled parameter, the parameter's own units otherwise)."""

    centre: float
    spread: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.centre) and math.isfinite(self.spread) and self.spread > 0):
            raise ValueError(f"a prior needs a finite centre and a positive spread, got {self}")


class PriorGuidedSampler(BaseSampler):
    """Optuna sampler mixing uniform, prior and TPE proposals (module docstring)."""

    def __init__(
        self,
        priors: Mapping[str, ParameterPrior],
        *,
        seed: int | None = None,
        n_startup_trials: int = 4,
        uniform_share: float = UNIFORM_SHARE,
        top_fraction: float = 0.5,
        decay_trials: float = DECAY_TRIALS,
        min_results: int = MIN_RESULTS,
    ):
        if not priors:
            raise ValueError("a prior-guided sampler needs at least one prior")
        if not 0 <= uniform_share < 1 or not 0 < top_fraction <= 1:
            raise ValueError("uniform_share must be in [0, 1) and top_fraction in (0, 1]")
        self.priors = dict(priors)
        self.uniform_share = uniform_share
        self.top_fraction = top_fraction
        self.decay_trials = decay_trials
        self.min_results = min_results
        self._rng = np.random.RandomState(seed)
        self._random = RandomSampler(seed=None if seed is None else seed + 1)
        self._model = TPESampler(
            seed=None if seed is None else seed + 2, n_startup_trials=n_startup_trials, multivariate=True
        )
        self._components: dict[int, str] = {}

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()
        self._model.reseed_rng()

    # -- which proposal a trial gets -------------------------------------------------------------

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if "fixed_params" in trial.system_attrs:
            component = "enqueued"
        else:
            shares = self.component_shares(study)
            component = str(self._rng.choice(list(shares), p=list(shares.values())))
        self._components[trial.number] = component
        # Optuna's own samplers keep per-trial state through the storage the same way.
        study._storage.set_trial_user_attr(trial._trial_id, COMPONENT_ATTR, component)
        self._model.before_trial(study, trial)

    def component_shares(self, study: Study) -> dict[str, float]:
        """The probability of each proposal for the next trial, from the trials finished so far."""
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        rest = 1.0 - self.uniform_share
        top = self._top_trials(study, finished)
        if not top:
            return {"uniform": self.uniform_share, "prior": rest, "model": 0.0}
        spaces = self._spaces(study, top[0])
        incumbent = top[0]
        widths = {name: _internal_width(d) for name, d in spaces.items()}
        prior_score = sum(self._prior_density(trial, spaces, len(finished)) for trial in top)
        model_score = sum(_incumbent_density(trial, incumbent, spaces, widths) for trial in top)
        total = prior_score + model_score
        prior_part = rest * prior_score / total if total > 0 else rest / 2
        return {"uniform": self.uniform_share, "prior": prior_part, "model": rest - prior_part}

    def _top_trials(self, study: Study, finished: list[FrozenTrial]) -> list[FrozenTrial]:
        """The best `top_fraction` of the trials at the highest step that `min_results` of them reached, best first."""
        steps: dict[int, list[tuple[float, FrozenTrial]]] = {}
        for trial in finished:
            for step, value in trial.intermediate_values.items():
                if math.isfinite(value):
                    steps.setdefault(step, []).append((value, trial))
            if (
                trial.state == TrialState.COMPLETE
                and trial.value is not None
                and not trial.intermediate_values
            ):
                steps.setdefault(math.inf, []).append((trial.value, trial))
        enough = [step for step, values in steps.items() if len(values) >= self.min_results]
        if not enough:
            return []
        values = steps[max(enough)]
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        values.sort(key=lambda pair: sign * pair[0])
        count = max(1, math.ceil(self.top_fraction * len(values)))
        return [trial for _, trial in values[:count]]

    def _spaces(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {
            name: d for name, d in trial.distributions.items() if not isinstance(d, CategoricalDistribution)
        }

    def _prior_density(self, trial: FrozenTrial, spaces: dict[str, BaseDistribution], finished: int) -> float:
        """The decayed prior's density at the trial (parameters without a prior: uniform)."""
        density = 1.0
        for name, distribution in spaces.items():
            if name not in trial.params:
                continue
            x = _internal(trial.params[name], distribution)
            low, high = _internal_bounds(distribution)
            if name in self.priors:
                centre, sd = self._decayed(name, distribution, finished)
                density *= _truncated_normal_pdf(x, centre, sd, low, high)
            else:
                density *= 1.0 / max(high - low, 1e-12)
        return density

    def _decayed(self, name: str, distribution: BaseDistribution, finished: int) -> tuple[float, float]:
        prior = self.priors[name]
        centre = _internal(prior.centre, distribution)
        return centre, prior.spread * math.sqrt(1.0 + finished / self.decay_trials)

    # -- the three proposals ---------------------------------------------------------------------

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._components.get(trial.number) == "model":
            return self._model.infer_relative_search_space(study, trial)
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if self._components.get(trial.number) == "model":
            return self._model.sample_relative(study, trial, search_space)
        return {}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        component = self._components.get(trial.number, "uniform")
        if component == "model":
            return self._model.sample_independent(study, trial, param_name, param_distribution)
        if component == "prior" and param_name in self.priors and _is_numeric(param_distribution):
            finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
            centre, sd = self._decayed(param_name, param_distribution, finished)
            low, high = _internal_bounds(param_distribution)
            return _external(_truncated_normal_draw(self._rng, centre, sd, low, high), param_distribution)
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: list[float] | None
    ) -> None:
        self._model.after_trial(study, trial, state, values)


def trial_components(study: optuna.Study) -> list[str]:
    """The proposal of each trial of `study`, in trial order ("" where the sampler recorded none)."""
    return [str(t.user_attrs.get(COMPONENT_ATTR, "")) for t in study.get_trials(deepcopy=False)]


# ------------------------------------------------------------------------------------------------
# A parameter's search space: log2 for log-scaled parameters, the parameter's own units otherwise


def _is_numeric(distribution: BaseDistribution) -> bool:
    return isinstance(distribution, (FloatDistribution, IntDistribution))


def _internal(value: float, distribution: BaseDistribution) -> float:
    return math.log2(value) if getattr(distribution, "log", False) else float(value)


def _internal_bounds(distribution: BaseDistribution) -> tuple[float, float]:
    return _internal(distribution.low, distribution), _internal(distribution.high, distribution)


def _internal_width(distribution: BaseDistribution) -> float:
    low, high = _internal_bounds(distribution)
    return max(high - low, 1e-12)


def _external(x: float, distribution: BaseDistribution) -> Any:
    value = 2.0**x if getattr(distribution, "log", False) else x
    value = min(max(value, distribution.low), distribution.high)
    if isinstance(distribution, IntDistribution):
        step = distribution.step
        value = distribution.low + round((value - distribution.low) / step) * step
        return int(min(max(value, distribution.low), distribution.high))
    if distribution.step is not None:
        value = distribution.low + round((value - distribution.low) / distribution.step) * distribution.step
    return float(min(max(value, distribution.low), distribution.high))


def _incumbent_density(
    trial: FrozenTrial, incumbent: FrozenTrial, spaces: dict[str, BaseDistribution], widths: dict[str, float]
) -> float:
    density = 1.0
    for name, distribution in spaces.items():
        if name not in trial.params or name not in incumbent.params:
            continue
        x = _internal(trial.params[name], distribution)
        centre = _internal(incumbent.params[name], distribution)
        low, high = _internal_bounds(distribution)
        density *= _truncated_normal_pdf(x, centre, INCUMBENT_WIDTH * widths[name], low, high)
    return density


def _truncated_normal_pdf(x: float, centre: float, sd: float, low: float, high: float) -> float:
    mass = _phi((high - centre) / sd) - _phi((low - centre) / sd)
    if mass <= 0:
        return 1.0 / max(high - low, 1e-12)
    z = (x - centre) / sd
    return math.exp(-0.5 * z * z) / (sd * math.sqrt(2 * math.pi) * mass)


def _truncated_normal_draw(
    rng: np.random.RandomState, centre: float, sd: float, low: float, high: float
) -> float:
    """Inverse-CDF draw from N(centre, sd) truncated to [low, high] (the centre clamped into the range)."""
    a, b = _phi((low - centre) / sd), _phi((high - centre) / sd)
    if b - a < 1e-12:
        return min(max(centre, low), high)
    u = a + (b - a) * rng.uniform()
    return min(max(centre + sd * _phi_inverse(u), low), high)


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _phi_inverse(p: float) -> float:
    """The standard normal quantile by bisection on erf (p in (0, 1))."""
    low, high = -12.0, 12.0
    for _ in range(80):
        middle = 0.5 * (low + high)
        if _phi(middle) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def prior_guided_sampler(space: SearchSpaceFile, priors: Mapping[str, ParameterPrior], startup_trials: int):
    """The `prior-guided` sampler row: its top fraction is what ASHA keeps at a rung (1 / eta)."""
    return PriorGuidedSampler(
        priors,
        seed=space.search.seed,
        n_startup_trials=startup_trials,
        top_fraction=1.0 / space.scheduler.reduction_factor,
    )
