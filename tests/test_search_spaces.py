"""Every shipped search space validates and builds its Ray Tune Tuner (no training, no Ray started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dkd_tune.config.loading import load_search_space
from dkd_tune.config.plan import search_parts, trial_plan
from dkd_tune.core.errors import UserInputError
from dkd_tune.data import dataset_num_classes, parse_data_spec
from dkd_tune.models import create_model
from dkd_tune.models.detection import create_detector, is_detector
from dkd_tune.search.tuner import new_tuner

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
PAPER_PAIRS = [
    "res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn16_2", "wrn40_2_wrn40_1", "vgg13_vgg8",
    "res32x4_shuv1", "wrn40_2_shuv1", "vgg13_mv2", "res50_mv2", "res32x4_mv2", "res32x4_shuv2",
]  # fmt: skip


def placeholder_inputs(path: Path, tmp_path: Path) -> list[str]:
    """`--set` overrides that point a file's data and checkpoints at placeholders made here."""
    raw = yaml.safe_load(path.read_text())
    overrides = []
    data = raw["data"]
    name = data["name"] if isinstance(data, dict) else data.split(":", 1)[0]
    root = tmp_path / "data"
    if name == "imagenet":
        for split in ("train", "val"):
            (root / split / "n01440764").mkdir(parents=True)
    elif name == "coco":
        (root / "annotations").mkdir(parents=True)
        from dkd_tune.models.detector_conversion import COCO_THING_IDS  # COCO's ids, with their gaps

        categories = [{"id": i, "name": f"category{i}"} for i in COCO_THING_IDS]
        for split in ("train2017", "val2017"):
            (root / split).mkdir()
            instances = {"images": [], "annotations": [], "categories": categories}
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    elif name == "cifar100":
        (root / "cifar-100-python").mkdir(parents=True)
        for file in ("train", "test", "meta"):
            (root / "cifar-100-python" / file).write_bytes(b"")
    if name != "synthetic":
        overrides.append(f"data.root={root}" if isinstance(data, dict) else f"data={name}:{root}")
        data = {**data, "root": str(root)} if isinstance(data, dict) else f"{name}:{root}"
    spec = parse_data_spec(data, source="data")
    for index, teacher in enumerate(raw.get("teachers", [])):
        if "checkpoint" in teacher:
            # Teacher files are read and checked before a search starts: give each a real model.
            checkpoint = tmp_path / f"teacher{index}.pth"
            num_classes = dataset_num_classes(spec)
            model = (
                create_detector(teacher["model"], num_classes)
                if is_detector(teacher["model"])
                else create_model(teacher["model"], num_classes=num_classes)
            )
            torch.save(model.state_dict(), checkpoint)
            overrides.append(f"teachers.{index}.checkpoint={checkpoint}")
    return overrides


def measured_teacher(teacher):
    """What the search knows of a teacher once it is prepared (`beta: auto` reads its gap)."""
    from dkd_tune.teacher.gap import LogitGapStats
    from dkd_tune.teacher.preparation import TeacherArtifacts

    if teacher is None:
        return None
    gap = LogitGapStats(mean=2.5, median=2.5, std=1.0, negative_fraction=0.05, train_acc=90.0, test_acc=80.0,
                        num_samples=100)  # fmt: skip
    return TeacherArtifacts(teacher.label, teacher.model, "teacher.pth", 100, gap, None)


def dummy_trainable(config):
    raise AssertionError("no trial runs in this test")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_search_space_validates_and_builds_its_tuners(path, tmp_path):
    from ray import tune

    space = load_search_space(path, placeholder_inputs(path, tmp_path))
    parts = search_parts(space)
    assert parts
    for part_name, teacher in parts:
        plan = trial_plan(space, teacher, measured_teacher(teacher), part_name)
        assert plan.max_epochs <= plan.base_recipe.epochs
        run_config = tune.RunConfig(name=part_name, storage_path=str(tmp_path / "runs"))
        tuner = new_tuner(space, part_name, teacher, plan, dummy_trainable, run_config)
        assert isinstance(tuner, tune.Tuner)


def test_the_paper_pairs_and_ablations_are_all_shipped():
    stems = {p.stem for p in SHIPPED}
    assert {f"cifar_{pair}" for pair in PAPER_PAIRS} <= stems
    assert {"demo", "cifar_shufflenet", "imagenet_res34_res18", "imagenet_res50_mv1"} <= stems
    assert {"detection_demo", "coco_frcnn_r101_r18", "coco_frcnn_r101_r50", "coco_frcnn_r50_mv2"} <= stems
    assert {
        "ablation_loss_modes",
        "ablation_tckd_temperature",
        "ablation_autoaugment",
        "ablation_label_noise",
    } <= stems


def test_cifar_shufflenet_follows_table_a1(tmp_path):
    path = ROOT / "search_spaces" / "cifar_shufflenet.yaml"
    space = load_search_space(path, placeholder_inputs(path, tmp_path))
    assert space.student == "ShuffleV1"
    assert [t.model for t in space.teachers] == ["resnet56", "wrn_40_2", "resnet32x4"]
    paper_best = {"resnet56": 2.0, "wrn_40_2": 6.0, "resnet32x4": 8.0}
    for teacher in space.teachers:
        low, high = space.space_for(teacher)["beta"].loguniform
        assert low < paper_best[teacher.model] < high
        assert space.base_recipe(teacher).lr == 0.01  # ShuffleV1


def demo_part(tmp_path):
    space = load_search_space(
        ROOT / "search_spaces" / "demo.yaml",
        placeholder_inputs(ROOT / "search_spaces" / "demo.yaml", tmp_path),
    )
    part_name, teacher = next((name, t) for name, t in search_parts(space) if t is not None)
    return space, teacher, trial_plan(space, teacher, None, part_name)


SEARCHED = {"beta": {"loguniform": [0.5, 8.0]}, "temperature": {"choice": [2, 4]}, "alpha": 1.0}


def searched_space():
    from dkd_tune.config.schema import Distribution

    return {name: Distribution.model_validate(value) for name, value in SEARCHED.items()}


def test_the_search_file_maps_to_optuna_distributions_seed_and_budget(tmp_path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from dkd_tune.search.tuner import search_algorithm

    space, _, _ = demo_part(tmp_path)
    searcher, param_space, num_samples = search_algorithm(space, searched_space())
    assert isinstance(searcher, OptunaSearch) and param_space == {} and num_samples == 8
    distributions = searcher._space  # what Optuna samples from, by name
    assert distributions == {
        "beta": optuna.distributions.FloatDistribution(0.5, 8.0, log=True),
        "temperature": optuna.distributions.CategoricalDistribution([2, 4]),
    }  # alpha is fixed: not searched
    sampler = searcher._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)


def _suggestions(space, count: int) -> list[dict]:
    from dkd_tune.search.tuner import search_algorithm

    searcher, _, _ = search_algorithm(space, searched_space())
    return [searcher.suggest(f"trial-{index}") for index in range(count)]


def test_one_seed_gives_the_same_trials_and_another_seed_others(tmp_path):
    space, _, _ = demo_part(tmp_path)
    first, again = _suggestions(space, 4), _suggestions(space, 4)
    assert first == again
    reseeded = space.model_copy(update={"search": space.search.model_copy(update={"seed": 1})})
    assert _suggestions(reseeded, 4) != first
    assert all(0.5 <= trial["beta"] <= 8.0 and trial["temperature"] in (2, 4) for trial in first)


@pytest.mark.parametrize(
    ("kind", "value", "sampler_name"),
    [
        ("loguniform", [0.5, 8.0], "LogUniform"),
        ("uniform", [0.5, 8.0], "Uniform"),
        ("int", [5, 30], "Uniform"),
    ],
)
def test_random_search_maps_each_distribution_to_its_tune_sampler(tmp_path, kind, value, sampler_name):
    from ray.tune.search import BasicVariantGenerator

    from dkd_tune.config.schema import Distribution
    from dkd_tune.search.tuner import search_algorithm

    space, _, _ = demo_part(tmp_path)
    space = space.model_copy(update={"search": space.search.model_copy(update={"algorithm": "random"})})
    searcher, param_space, num_samples = search_algorithm(
        space, {"beta": Distribution.model_validate({kind: value})}
    )
    assert isinstance(searcher, BasicVariantGenerator) and num_samples == 8
    domain = param_space["beta"]
    assert type(domain.get_sampler()).__name__.lstrip("_") == sampler_name
    assert type(domain).__name__ == ("Integer" if kind == "int" else "Float")
    assert (domain.lower, domain.upper) == ((5, 31) if kind == "int" else (0.5, 8.0))  # int: both ends in


def test_asha_rungs_follow_the_scheduler_settings(tmp_path):
    from dkd_tune.search.tuner import asha_scheduler

    space, _, plan = demo_part(tmp_path)
    scheduler = asha_scheduler(space, plan.max_epochs)
    assert scheduler._time_attr == "epoch" and scheduler._max_t == 20
    (bracket,) = scheduler._brackets
    assert sorted(milestone for milestone, _ in bracket._rungs) == [5, 10, 20]  # grace 5, factor 2, max_t 20
    assert (
        asha_scheduler(
            space.model_copy(update={"scheduler": space.scheduler.model_copy(update={"type": "none"})}), 8
        )
        is None
    )


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("uniform", [0.5, 8.0], "FloatDistribution(0.5, 8.0)"),
        ("loguniform", [0.5, 8.0], "FloatDistribution(0.5, 8.0, log=True)"),
        ("int", [5, 30], "IntDistribution(5, 30)"),
        ("choice", [2, 4, 8], "CategoricalDistribution([2, 4, 8])"),
    ],
)
def test_each_distribution_becomes_its_optuna_distribution(tmp_path, kind, value, expected):
    import optuna

    from dkd_tune.config.schema import Distribution
    from dkd_tune.search.tuner import search_algorithm

    space, _, _ = demo_part(tmp_path)
    searcher, _, _ = search_algorithm(space, {"beta": Distribution.model_validate({kind: value})})
    assert searcher._space == {"beta": eval(expected, {**vars(optuna.distributions)})}


def with_search(space, **changes):
    return space.model_copy(update={"search": space.search.model_copy(update=changes)})


@pytest.mark.parametrize(("num_samples", "startup"), [(3, 2), (8, 2), (24, 8), (60, 10)])
def test_tpe_starts_with_a_third_of_the_budget_at_random_within_2_to_10(tmp_path, num_samples, startup):
    from dkd_tune.search.tuner import search_algorithm

    space, _, _ = demo_part(tmp_path)
    searcher, _, samples = search_algorithm(with_search(space, num_samples=num_samples), searched_space())
    assert samples == num_samples
    sampler = searcher._sampler
    assert sampler._n_startup_trials == startup and isinstance(sampler._n_startup_trials, int)
    assert sampler._multivariate is True
    assert (searcher.metric, searcher.mode) == ("val_acc", "max")  # chosen on the validation split


def test_grid_and_random_algorithms_map_choice_and_grid(tmp_path):
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.sample import Categorical

    from dkd_tune.config.schema import Distribution
    from dkd_tune.search.tuner import search_algorithm

    space, _, _ = demo_part(tmp_path)
    searched = {
        "temperature": Distribution.model_validate({"choice": [2, 4]}),
        "alpha": Distribution.model_validate({"grid": [0.5, 1.0]}),
    }
    grid, grid_space, _ = search_algorithm(
        with_search(space, algorithm="grid", max_concurrent_trials=3), searched
    )
    assert grid_space == {"temperature": {"grid_search": [2, 4]}, "alpha": {"grid_search": [0.5, 1.0]}}
    assert isinstance(grid, BasicVariantGenerator) and grid.max_concurrent == 3
    _, random_space, _ = search_algorithm(with_search(space, algorithm="random"), searched)
    assert isinstance(random_space["temperature"], Categorical)
    assert random_space["temperature"].categories == [2, 4]
    assert random_space["alpha"] == {"grid_search": [0.5, 1.0]}  # grid: every value, whatever the algorithm


def test_random_search_is_seeded_and_limits_concurrency(tmp_path):
    from dkd_tune.config.schema import Distribution
    from dkd_tune.search.tuner import search_algorithm

    space, _, _ = demo_part(tmp_path)
    searched = {"beta": Distribution.model_validate({"loguniform": [0.5, 8.0]})}

    def generator(seed, concurrency):
        found, _, _ = search_algorithm(
            with_search(space, algorithm="random", seed=seed, max_concurrent_trials=concurrency), searched
        )
        return found

    def first_draw(seed):
        return generator(seed, 2)._random_state.uniform()

    assert first_draw(0) == first_draw(0) != first_draw(5)  # the seed fixes the generator's draws
    assert generator(0, 2).max_concurrent == 2
    assert generator(0, None).max_concurrent == 0  # 0: no limit of its own


def test_a_part_with_nothing_to_search_runs_once_seeded(tmp_path):
    from ray.tune.search import BasicVariantGenerator

    from dkd_tune.search.tuner import search_algorithm

    space, _, _ = demo_part(tmp_path)
    searcher, param_space, samples = search_algorithm(with_search(space, max_concurrent_trials=2), {})
    assert isinstance(searcher, BasicVariantGenerator) and param_space == {} and samples == 1
    seeded, _, _ = search_algorithm(with_search(space, max_concurrent_trials=2), {})
    assert searcher._random_state.uniform() == seeded._random_state.uniform()
    other, _, _ = search_algorithm(with_search(space, seed=space.search.seed + 1), {})
    assert other._random_state.uniform() != seeded._random_state.uniform()
    assert searcher.max_concurrent == 2


@pytest.mark.parametrize(
    ("grace", "warmup", "searched", "warned"),
    [(6, 5, None, False), (2, 5, None, True), (3, 2, {"int": [1, 5]}, True), (5, 2, {"int": [1, 5]}, False)],
)
def test_a_first_rung_inside_the_warm_up_is_warned_about(tmp_path, grace, warmup, searched, warned):
    from dkd_tune.config.plan import rung_warnings
    from dkd_tune.config.schema import Distribution

    demo, _, _ = demo_part(tmp_path)
    assert rung_warnings(demo, "demo.yaml") == []  # the demo's first rung is at the warm-up's end
    space = demo.model_copy(
        update={
            "scheduler": demo.scheduler.model_copy(update={"grace_period": grace}),
            "overrides": {**demo.overrides, "warmup_epochs": warmup},
        }
    )
    if searched is not None:
        space.space["warmup_epochs"] = Distribution.model_validate(searched)
    lines = rung_warnings(space, "demo.yaml")
    assert len(lines) == int(warned)
    if warned:
        longest = 5 if searched else warmup
        assert lines[0].startswith(f"dkd-tune: warning: demo.yaml: scheduler.grace_period {grace} ")
        assert lines[0].endswith(f"set scheduler.grace_period to at least {longest}")


def test_beta_auto_starts_optuna_at_the_priors_centre_and_keeps_the_calibrated_range_reachable(tmp_path):
    from dkd_tune.config.schema import Distribution
    from dkd_tune.search.prior_sampler import PriorGuidedSampler
    from dkd_tune.search.tuner import auto_beta_distribution, search_algorithm
    from dkd_tune.teacher.auto_beta import beta_prior, default_calibration

    calibration = default_calibration("synthetic")
    prior = beta_prior(calibration, sum(calibration.gap_range) / 2)
    low, high = prior.beta_range
    assert low <= prior.centre <= high
    space, _, plan = demo_part(tmp_path)
    searched = {
        "beta": auto_beta_distribution(prior),
        "temperature": Distribution.model_validate({"choice": [2, 4]}),
    }
    searcher, _, _ = search_algorithm(
        with_search(space, num_samples=30), searched, max_epochs=4, base_recipe=plan.base_recipe
    )
    assert isinstance(searcher._sampler, PriorGuidedSampler)
    trials = [searcher.suggest(f"trial-{index}") for index in range(30)]
    assert trials[0] == {
        "beta": pytest.approx(prior.centre),
        "temperature": 4,
    }  # the recipe's value for the others
    later = [trial["beta"] for trial in trials[1:]]
    assert all(low <= beta <= high for beta in later)
    assert (
        min(later) < prior.suggestion.low or max(later) > prior.suggestion.high
    )  # the range stays reachable


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"space": {"temperature": "auto"}}, "auto is auto-beta's prior for beta"),
        ({"search": {"algorithm": "random", "num_samples": 4}}, "needs search.algorithm optuna"),
        ({"loss": "kd"}, "loss 'kd' has no beta"),
        ({}, "ships none"),
    ],
)
def test_beta_auto_without_what_it_needs_is_one_line(tmp_path, monkeypatch, change, message):
    import dkd_tune.teacher.auto_beta

    if not change:  # a family without a shipped calibration
        monkeypatch.delitem(dkd_tune.teacher.auto_beta._DEFAULT_FILES, "synthetic")
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["data"]["root"] = str(tmp_path / "data")
    for key, value in change.items():
        if key == "space":
            raw["space"] = {**raw["space"], **value}
        else:
            raw[key] = value
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserInputError, match=message) as error:
        load_search_space(path)
    assert "\n" not in str(error.value)
