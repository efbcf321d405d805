"""The Ray Tune Tuner of one part of a search: the search file's distributions for Optuna (TPE, or the
prior-guided sampler when a parameter has a prior) or Tune, ASHA's rungs, resources, the MLflow callback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dkd_tune.config.plan import BASELINE_PREFIX
from dkd_tune.config.schema import Distribution, SearchSpaceFile, TeacherConfig
from dkd_tune.config.search_state import SearchState
from dkd_tune.config.searchers import SEARCHERS, optuna_sampler_kind

if TYPE_CHECKING:
    from collections.abc import Callable

    from ray.tune import RunConfig
    from ray.tune.experiment import Trial

    from dkd_tune.core.recipes import Recipe
    from dkd_tune.search.mlflow_trial_logger import MLflowTrialLogger
    from dkd_tune.teacher.auto_beta import BetaPrior
    from dkd_tune.trial import TrialPlan

# TPE needs a few random trials before its model is worth anything; a third of the budget, 2..10.
MIN_STARTUP_TRIALS, MAX_STARTUP_TRIALS = 2, 10


def trial_logger(
    space: SearchSpaceFile, part_name: str, teacher: TeacherConfig | None, plan: TrialPlan, state: SearchState
) -> MLflowTrialLogger:
    """The tracking callback of one part: a child run per trial under the search's run."""
    from dkd_tune.search.mlflow_trial_logger import MLflowTrialLogger
    from dkd_tune.tracking.runs import TAG_SEARCH

    return MLflowTrialLogger(
        state.tracking_uri,
        space.name,
        state.parent_run_id,
        teacher_label=teacher.label if teacher else part_name,
        max_epochs=plan.max_epochs,
        fixed_params=trial_fixed_params(space, plan, teacher),
        extra_tags={TAG_SEARCH: state.name},
    )


def new_tuner(
    space: SearchSpaceFile,
    part_name: str,
    teacher: TeacherConfig | None,
    plan: TrialPlan,
    trainable: Callable[..., Any],
    run_config: RunConfig,
    *,
    study_storage: str | None = None,
    prior: BetaPrior | None = None,
):
    """The Ray Tune Tuner of one part: its searcher, ASHA and budget (a baseline runs once, unpruned).

    `study_storage` is the Optuna storage URL where the part's study persists (in memory if None).
    """
    from ray import tune
    from ray.tune.search import Searcher

    from dkd_tune.search.study import study_name

    is_baseline = part_name.startswith(BASELINE_PREFIX)
    searched = {} if is_baseline else space.space_for(teacher)
    if prior is None and "beta" in searched and searched["beta"].kind == "auto":
        prior = auto_beta_prior(space, plan)  # `beta: auto`; the caller may pass the prior it announced
    if prior is not None:
        searched = {**searched, "beta": auto_beta_distribution(prior)}
    searcher, param_space, num_samples = search_algorithm(
        space,
        searched,
        max_epochs=plan.max_epochs,
        study=(study_storage, study_name(space.name, part_name)) if study_storage else None,
        base_recipe=plan.base_recipe,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=None if is_baseline else asha_scheduler(space, plan.max_epochs),
            num_samples=num_samples,
            max_concurrent_trials=space.search.max_concurrent_trials
            if isinstance(searcher, Searcher)
            else None,
            reuse_actors=True,  # a new trial reuses a finished trial's process: no Python + torch start-up
            trial_name_creator=TrialName(part_name),
            trial_dirname_creator=TrialName(part_name),
        ),
        run_config=run_config,
    )


class TrialName:
    """Trial names and folders `<part>-<trial id>` (picklable, so a restored Tuner keeps them)."""

    def __init__(self, part_name: str):
        self.part_name = part_name

    def __call__(self, trial: Trial) -> str:
        return f"{self.part_name}-{trial.trial_id}"


def trial_resources(space: SearchSpaceFile) -> dict[str, float]:
    if space.resources.workers > 1:
        # The trial itself only coordinates; its DDP workers ask Ray Train for CPUs and GPUs. A trial
        # must reserve something, and any CPU share would leave too little for the workers' whole CPUs.
        return {"cpu": 0, "memory": 1}
    return {"cpu": space.resources.cpu, "gpu": space.resources.gpu}


def trial_fixed_params(
    space: SearchSpaceFile, plan: TrialPlan, teacher: TeacherConfig | None
) -> dict[str, Any]:
    params: dict[str, Any] = dict(plan.base_recipe.to_dict())
    params.update(
        loss=plan.loss_mode,
        student=space.student,
        teacher=teacher.label if teacher else "none",
        teacher_model=teacher.model if teacher else "none",
        dataset=plan.dataset_name,
        augment=plan.augment,
        max_epochs=plan.max_epochs,
    )
    if plan.teacher is not None and plan.teacher.gap is not None:
        params["teacher_gap"] = round(plan.teacher.gap.mean, 4)
    return params


def auto_beta_prior(space: SearchSpaceFile, plan: TrialPlan) -> BetaPrior:
    """`beta: auto`: the teacher's measured gap read through its dataset family's shipped calibration."""
    from dkd_tune.teacher.auto_beta import beta_prior, default_calibration

    family = space.data_spec.family
    if plan.teacher is None or plan.teacher.gap is None:
        raise ValueError("beta: auto needs the teacher's measured gap (prepare the teacher first)")
    return beta_prior(default_calibration(family), plan.teacher.gap, plan.teacher.model)


def auto_beta_distribution(prior: BetaPrior) -> Distribution:
    """`beta: auto` as a searched distribution: the calibrated range, and auto-beta's belief as its prior."""
    return Distribution(loguniform=prior.beta_range, prior={"centre": prior.centre, "spread": prior.spread})


def parameter_priors(searched: dict[str, Distribution]) -> dict[str, Any]:
    """The `prior:` of every searched parameter that has one, for the prior-guided sampler."""
    from dkd_tune.search.prior_sampler import ParameterPrior

    return {
        name: ParameterPrior(d.prior.centre, d.prior.spread)
        for name, d in searched.items()
        if d.prior is not None and d.kind != "fixed"
    }


def prior_centre(searched: dict[str, Distribution], base: Recipe | None) -> dict[str, Any]:
    """The one enqueued first trial of a search with priors: each prior at its centre, the other searched
    values at the recipe's (or their range's low end when the recipe's lies outside)."""
    point = {}
    for name, distribution in searched.items():
        if distribution.kind == "fixed":
            continue
        if distribution.prior is not None:
            centre = distribution.prior.centre
            point[name] = round(centre) if distribution.kind == "int" else centre
            continue
        value = getattr(base, name, None)
        bounds = distribution.extremes()
        if distribution.kind in ("choice", "grid"):
            point[name] = value if value in bounds else bounds[0]
        else:
            inside = value is not None and bounds[0] <= value <= bounds[1]
            point[name] = value if inside else bounds[0]
    return point


def optuna_sampler(space: SearchSpaceFile, priors: dict[str, Any], *, enqueued: int = 0):
    """The sampler row's sampler: TPE, or the prior-guided one when some parameter has a prior. TPE's
    start-up counts only drawn trials (`enqueued` trials, the prior's centre, are not TPE's draws)."""
    startup = max(MIN_STARTUP_TRIALS, min(MAX_STARTUP_TRIALS, space.search.num_samples // 3)) + enqueued
    return optuna_sampler_kind(bool(priors)).build(space, priors, startup)


def tpe_sampler(space: SearchSpaceFile, priors: dict[str, Any], startup_trials: int):
    """The `tpe` sampler row."""
    import optuna

    return optuna.samplers.TPESampler(
        seed=space.search.seed, n_startup_trials=startup_trials, multivariate=True
    )


def search_algorithm(
    space: SearchSpaceFile,
    searched: dict[str, Distribution],
    *,
    max_epochs: int | None = None,
    study: tuple[str, str] | None = None,
    base_recipe: Recipe | None = None,
):
    """(search algorithm, Tuner param_space, num_samples) for one part, from `search.algorithm`'s row.

    `study` is (Optuna storage URL, study name): where the part's study persists (in memory if None).
    With priors (`prior:` or `beta: auto`), the first trial is their centre (the other searched values
    at `base_recipe`'s) and the prior-guided sampler draws the rest.
    """
    variable = {name: d for name, d in searched.items() if d.kind != "fixed"}
    if any(d.kind == "auto" for d in variable.values()):
        raise ValueError(
            "beta: auto is resolved to a range and first trials (new_tuner) before the searcher is built"
        )
    if not variable:  # nothing to search: one trial of the fixed values
        return variant_generator(space), {}, 1
    return SEARCHERS[space.search.algorithm].build(
        space, variable, max_epochs=max_epochs, study=study, base_recipe=base_recipe
    )


def optuna_searcher(
    space: SearchSpaceFile,
    variable: dict[str, Distribution],
    *,
    max_epochs: int | None,
    study: tuple[str, str] | None,
    base_recipe: Recipe | None,
):
    """The `optuna` row: Ray's Optuna searcher with TPE, or the prior-guided sampler after the priors' centre."""
    import optuna

    from dkd_tune.search.study import TruthfulOptunaSearch

    priors = parameter_priors(variable)
    first_points = [prior_centre(variable, base_recipe)] if priors else None
    sampler = optuna_sampler(space, priors, enqueued=len(first_points or []))
    distributions = {name: optuna_distribution(d) for name, d in variable.items()}
    storage, name = study if study is not None else (None, None)
    searcher = TruthfulOptunaSearch(
        space=distributions,
        metric=space.metric,
        mode=space.mode,
        sampler=sampler,
        max_epochs=max_epochs or space.max_epochs(),
        storage=optuna.storages.RDBStorage(storage) if storage else None,
        study_name=name,
        points_to_evaluate=first_points,
    )
    return searcher, {}, space.search.num_samples


def variant_searcher(space: SearchSpaceFile, variable: dict[str, Distribution], **_unused):
    """The `random` and `grid` rows: Ray Tune's variant generator over Tune distributions (grid values expanded)."""
    expands = SEARCHERS[space.search.algorithm].expands
    param_space = {name: tune_distribution(d, expands) for name, d in variable.items()}
    return variant_generator(space), param_space, space.search.num_samples


def variant_generator(space: SearchSpaceFile):
    """Ray Tune's seeded variant generator; it limits concurrency itself (TuneConfig's limit only applies to
    Searchers)."""
    from ray.tune.search import BasicVariantGenerator

    settings = space.search
    return BasicVariantGenerator(
        random_state=settings.seed, max_concurrent=settings.max_concurrent_trials or 0
    )


def expected_trials(space: SearchSpaceFile, teacher: TeacherConfig | None) -> int:
    """How many trials one part runs: 1 with nothing searched, else num_samples, times the grid's size
    where Tune expands grid dimensions (every grid point is repeated num_samples times)."""
    variable = [d for d in (space.space_for(teacher) if teacher else {}).values() if d.kind != "fixed"]
    if not variable:
        return 1
    grid_points = 1
    for distribution in variable:
        if distribution.kind in SEARCHERS[space.search.algorithm].expands:
            grid_points *= len(distribution.grid or distribution.choice)
    return grid_points * space.search.num_samples


def optuna_distribution(distribution: Distribution):
    import optuna

    if distribution.kind == "uniform":
        return optuna.distributions.FloatDistribution(*distribution.uniform)
    if distribution.kind == "loguniform":
        return optuna.distributions.FloatDistribution(*distribution.loguniform, log=True)
    if distribution.kind == "int":
        return optuna.distributions.IntDistribution(*distribution.int_range)
    return optuna.distributions.CategoricalDistribution(distribution.choice)


def tune_distribution(distribution: Distribution, expands: tuple[str, ...]):
    """`distribution` as a Tune sampler; a kind in `expands` becomes a grid (every value tried)."""
    from ray import tune

    kind = distribution.kind
    if kind in expands:
        return tune.grid_search(list(distribution.grid or distribution.choice))
    if kind == "uniform":
        return tune.uniform(*distribution.uniform)
    if kind == "loguniform":
        return tune.loguniform(*distribution.loguniform)
    if kind == "int":
        low, high = distribution.int_range
        return tune.randint(low, high + 1)
    return tune.choice(list(distribution.choice))


def asha_scheduler(space: SearchSpaceFile, max_epochs: int):
    if space.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        max_t=max_epochs,
        grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
    )
