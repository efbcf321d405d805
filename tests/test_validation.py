"""validate-beta: the grid ground truth, regrets paired by seed, the bootstrap, the file checks, and a real tiny run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis.beta_ground_truth import (
    BetaGrid,
    calibrated_teachers,
    compare_methods,
    grid_from_results,
    held_out_predictions,
    movement_verdict,
    regrets,
    verdict,
)
from analysis.results import typed_results
from analysis.tables import markdown_table
from dkd_tune.commands.validate import check_validation_space, grid_space
from dkd_tune.config.loading import load_search_space
from dkd_tune.core.errors import UserInputError
from dkd_tune.teacher.auto_beta import ModelCalibration, read_calibration
from dkd_tune.tracking.runs import TAG_KIND, TAG_PARENT
from tests.test_search_e2e import cli, tiny_space

BETAS = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])


def synthetic_grid(
    slope: float,
    *,
    seeds: int = 3,
    noise: float = 0.3,
    architectures: int = 4,
    per_architecture: int = 2,
    arch_effect: float = 0.0,
    seed: int = 0,
) -> BetaGrid:
    """A grid whose peak log2(beta) is -1 + slope * gap (+ an effect per architecture); the architectures'
    gap ranges overlap, as the all-CNN family's do."""
    rng = np.random.default_rng(seed)
    archs = [f"arch{a}" for a in range(architectures) for _ in range(per_architecture)]
    gaps = np.array([2.0 + 3.0 * k / max(per_architecture - 1, 1) + 0.2 * a
                     for a in range(architectures) for k in range(per_architecture)])  # fmt: skip
    effects = {f"arch{a}": arch_effect * (a - (architectures - 1) / 2) for a in range(architectures)}
    x = np.log2(BETAS)
    peaks = -1.0 + slope * (gaps - 2.0) + np.array([effects[a] for a in archs])
    surface = 80.0 - 1.5 * (x[None, :] - peaks[:, None]) ** 2
    count = len(gaps)
    val = surface[:, :, None] + rng.normal(0, noise, (count, len(BETAS), seeds))
    test = surface[:, :, None] + rng.normal(0, noise, (count, len(BETAS), seeds))
    return BetaGrid(
        teachers=[f"t{i}" for i in range(count)],
        gaps=gaps,
        betas=BETAS,
        seeds=list(range(seeds)),
        val=val,
        test=test,
        teacher_test_acc={f"t{i}": 85.0 + i for i in range(count)},
        student_alone={"val": 70.0, "test": 70.0, "test_sd": 0.3},
        architectures=archs,
        features=[{"gap": float(g), "noise": float(rng.normal())} for g in gaps],
    )


def test_a_gap_that_moves_the_peak_makes_auto_beta_beat_the_constant_held_out_both_ways():
    grid = synthetic_grid(slope=0.8)
    teachers = calibrated_teachers(grid)
    for kind in ("teacher", "architecture"):
        comparison = compare_methods(grid, teachers, kind, resamples=300)
        mean, _low, high = comparison.differences["autobeta-constant"]
        assert high < 0 and mean < -1.0, kind
        assert verdict(comparison.differences["autobeta-constant"], "the constant").startswith(
            "Auto-beta beats"
        )
        # Held out, the pick is within one grid step of each teacher's oracle, and the 80% interval
        # covers most oracles.
        steps = np.abs(np.log2(comparison.table["autobeta_beta"]) - np.log2(comparison.table["oracle_beta"]))
        assert steps.max() <= 1.0, kind
        assert comparison.coverage >= 0.6 and comparison.rms_error < 0.7
        assert all(p.feature == "gap" for p in comparison.predictions)  # chosen inside each fold


def test_a_gap_that_does_not_matter_is_not_chosen_and_auto_beta_is_no_worse():
    grid = synthetic_grid(slope=0.0, seed=3)
    comparison = compare_methods(grid, calibrated_teachers(grid), "architecture", resamples=300)
    mean, low, high = comparison.differences["autobeta-constant"]
    assert low <= 0 <= high and abs(mean) < 0.5
    assert "gap" not in {p.feature for p in comparison.predictions} - {None} or abs(mean) < 0.5


def test_an_architecture_effect_is_what_leave_one_architecture_out_cannot_know():
    grid = synthetic_grid(slope=0.0, arch_effect=1.5, noise=0.2, seed=5)
    teachers = calibrated_teachers(grid)
    loto = compare_methods(grid, teachers, "teacher", resamples=200)
    loao = compare_methods(grid, teachers, "architecture", resamples=200)
    # Its twin tells LOTO where an architecture's peaks are; LOAO must predict it from the others.
    assert loto.rms_error < 0.6 < loao.rms_error
    assert np.mean([p.sd for p in loao.predictions]) > np.mean([p.sd for p in loto.predictions])


def test_held_out_means_the_teacher_and_for_architectures_its_twins_too():
    grid = synthetic_grid(slope=0.8)
    teachers = calibrated_teachers(grid)
    before = {p.teacher: p for p in held_out_predictions(grid, teachers, "architecture")}
    # Change everything about arch1's teachers (t2, t3): their own predictions do not move.
    changed = [t for t in teachers]
    for i in (2, 3):
        curve = dataclasses.replace(teachers[i].curve, peak=teachers[i].curve.peak + 3.0)
        changed[i] = dataclasses.replace(teachers[i], curve=curve)
    after = {p.teacher: p for p in held_out_predictions(grid, changed, "architecture")}
    for label in ("t2", "t3"):
        assert after[label].mean == pytest.approx(before[label].mean)
        assert after[label].peak != pytest.approx(before[label].peak)
    # ...while a teacher of another architecture sees them.
    assert after["t0"].mean != pytest.approx(before["t0"].mean)
    # Leave one teacher out: its twin is in the fit, the teacher itself is not.
    before = {p.teacher: p for p in held_out_predictions(grid, teachers, "teacher")}
    alone = [t for t in teachers]
    alone[2] = changed[2]
    after = {p.teacher: p for p in held_out_predictions(grid, alone, "teacher")}
    assert after["t2"].mean == pytest.approx(before["t2"].mean)
    assert after["t3"].mean != pytest.approx(before["t3"].mean)


def test_regret_is_paired_by_seed_and_uses_the_test_split_only_for_reporting():
    grid = synthetic_grid(slope=0.5, seeds=2)
    grid.val[0, 2, :] = 99.0  # the validation split says beta 1 for teacher 0 ...
    grid.test[0, :, :] = np.array([[50.0, 60.0]] * len(BETAS))
    grid.test[0, 2, :] = [52.0, 61.0]  # ... and the test split is only read at the picks
    teachers, seeds = np.arange(len(grid.teachers)), np.arange(2)
    picks = np.full(len(grid.teachers), 5)
    got = regrets(grid, teachers, seeds, picks)
    assert got[0].tolist() == [2.0, 1.0]  # oracle (val) beta 1 minus the pick, seed by seed
    per_seed = np.tile(picks[:, None], (1, 2))
    assert np.array_equal(regrets(grid, teachers, seeds, per_seed), got)


def test_the_verdicts_follow_the_protocol():
    assert verdict((-0.5, -0.9, -0.1), "the constant").startswith("Auto-beta beats")
    assert verdict((-0.1, -0.9, 0.4), "the constant").startswith("Auto-beta is no worse")
    assert verdict((0.2, -0.3, 0.8), "the constant").startswith("Auto-beta is not shown to be no worse")
    assert verdict((0.5, 0.1, 0.9), "the constant").startswith("Auto-beta is worse")
    assert movement_verdict((2.0, 1.2, 2.8)).startswith("moves with the gap")
    assert movement_verdict((0.1, -0.6, 0.7)).startswith("does not move")
    assert movement_verdict((0.6, -0.2, 1.4)).startswith("undecided")


def test_the_grid_is_read_from_a_results_table_and_a_missing_cell_is_one_line():
    rows = []
    for t, gap in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        for beta in (0.5, 1.0, 2.0):
            for seed in (0, 1):
                rows.append(
                    dict(part=t, teacher=t, teacher_gap=gap, beta=beta, seed=seed, status="completed",
                         final_val_acc=70 + beta + seed, final_test_acc=60 + beta, trial_id=f"{t}{beta}{seed}")
                )  # fmt: skip
    rows.append(dict(part="baseline-ce", teacher="none", status="completed", final_val_acc=50.0,
                     final_test_acc=51.0, trial_id="ce", beta=8.0, seed=0))  # fmt: skip
    frame = typed_results(pd.DataFrame(rows))
    grid = grid_from_results(frame)
    assert (
        grid.teachers == ["a", "b", "c"] and grid.betas.tolist() == [0.5, 1.0, 2.0] and grid.seeds == [0, 1]
    )
    assert grid.val[1, 2, 1] == 73.0 and {k: grid.student_alone[k] for k in ("val", "test")} == {
        "val": 50.0,
        "test": 51.0,
    }
    diverged = frame.copy()
    diverged.loc[(diverged["teacher"] == "c") & (diverged["beta"] == 2.0), "status"] = "diverged"
    assert grid_from_results(diverged).val[2, 2, 0] == 72.0  # a diverged run is what that beta gives
    frame.loc[(frame["teacher"] == "b") & (frame["beta"] == 1.0) & (frame["seed"] == 1), "status"] = "error"
    with pytest.raises(UserInputError, match="teacher 'b', beta 1, seed 1") as error:
        grid_from_results(frame)
    assert "\n" not in str(error.value)


def test_markdown_table_formats_numbers_and_blanks():
    assert markdown_table(pd.DataFrame({"a": [1.23456, None], "b": ["x", "y"]})).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| 1.23 | x |",
        "|  | y |",
    ]


@pytest.fixture
def validation_file(tmp_path) -> Path:
    teachers = [
        {"model": "resnet8", "name": "weak", "train": {"overrides": {"epochs": 1, "batch_size": 32}}},
        # An intervened teacher rides along (the permuted control of 'weak': the same trained teacher),
        # to run its path through Ray end to end.
        {
            "model": "resnet8",
            "name": "mid",
            "train": {"overrides": {"epochs": 1, "batch_size": 32}},
            "non_target": "permuted",
        },
        {"model": "resnet14", "name": "strong", "train": {"overrides": {"epochs": 3, "batch_size": 32}}},
    ]
    data = {
        "name": "synthetic",
        "root": str(tmp_path / "data"),
        "validation": 10,
        "generate": {
            "classes": 5,
            "superclasses": 5,
            "train_per_class": 40,
            "test_per_class": 20,
            "image_size": 8,
        },
    }
    return tiny_space(
        tmp_path,
        name="validation",
        data=data,
        student="mlp_256",
        teachers=teachers,
        overrides={"epochs": 3, "lr_milestones": [2], "warmup_epochs": 1, "batch_size": 32, "lr": 0.01},
        space={"beta": {"grid": [0.5, 1.0, 2.0]}, "seed": {"grid": [0, 1]}, "alpha": 1.0},
        baselines=["ce"],
        metric="val_acc",
        search={"algorithm": "grid", "seed": 0, "num_samples": 1, "max_concurrent_trials": 2},
    )


def test_a_validation_file_is_a_log2_grid_of_betas_and_seeds_for_three_teachers(validation_file, tmp_path):
    space = load_search_space(validation_file)
    check_validation_space(space, validation_file)
    raw = yaml.safe_load(validation_file.read_text())
    grid_beta = raw["space"]
    for change, message in (
        ({"space": {**grid_beta, "temperature": {"grid": [2, 4]}}}, "space.temperature"),
        ({"teachers": raw["teachers"][:2]}, "at least 3 teachers"),
        ({"space": {**grid_beta, "beta": {"grid": [0.5, 1.0]}}}, "at least 3 betas"),
        ({"space": {**grid_beta, "beta": {"grid": [0.5, 1.0, 3.0]}}}, "log2 ladder"),
        ({"space": {**grid_beta, "seed": {"grid": [0]}}}, "at least 2 seeds"),
        ({"metric": "test_acc"}, "metric"),
        ({"loss": "kd"}, "loss"),
        ({"scheduler": {"type": "none"}}, "scheduler.type"),
    ):
        path = tmp_path / "changed.yaml"
        path.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(UserInputError, match=message) as error:
            check_validation_space(load_search_space(path), path)
        assert "\n" not in str(error.value)
    path = tmp_path / "no_validation_split.yaml"
    path.write_text(
        yaml.safe_dump({**raw, "data": {k: v for k, v in raw["data"].items() if k != "validation"}})
    )
    with pytest.raises(UserInputError, match="metric: 'val_acc' needs a validation split"):
        load_search_space(path)

    # The grid's file: the same file with nothing pruned; it validates as a search file.
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid_space(space, "validation")))
    grid = load_search_space(path)
    assert grid.scheduler.type == "none" and grid.search.algorithm == "grid" and grid.baselines == ["ce"]
    assert grid.max_epochs() == space.max_epochs() and grid.name == space.name


@pytest.mark.slow
def test_validate_beta_end_to_end_and_resume(validation_file, tmp_path):
    result = cli(
        "validate-beta", str(validation_file), "--resamples", "100", "--search-trials", "3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Auto-beta" in result.stdout
    folder = tmp_path / "runs" / "validation"
    report = (folder / "validation.md").read_text()
    for heading in (
        "## Verdict",
        "## Per teacher",
        "## Which feature",
        "## Noise",
        "## The calibration fitted on every teacher",
    ):
        assert heading in report
    assert "leave one teacher out" in report
    assert f"validate-beta {validation_file}" in report
    comparison = pd.read_parquet(folder / "comparison.parquet")
    assert set(comparison["teacher"]) == {"weak", "mid", "strong"}
    for method in ("autobeta", "constant", "beta8", "search"):
        assert comparison[f"{method}_regret"].notna().all()
    assert (comparison["oracle_beta"].isin([0.5, 1.0, 2.0])).all()

    # Every grid run trained its full budget, on both splits, and its curve is kept.
    curves = pd.read_parquet(folder / "curves.parquet")
    runs = curves[~curves["part"].str.startswith("baseline-")]
    assert len(runs.groupby(["teacher", "beta", "seed"])) == 3 * 3 * 2
    assert (runs.groupby("trial_id")["epoch"].max() == 3).all()
    assert runs["val_acc"].notna().all() and runs["test_acc"].notna().all()
    replays = pd.read_parquet(folder / "replays.parquet")
    assert len(replays) == 3 * 2 and (replays["trials"] == 3).all() and (replays["trial_epochs"] >= 3).all()

    calibration = read_calibration(folder / "calibration.json")
    assert isinstance(calibration, ModelCalibration) and calibration.family == "synthetic"
    assert "validate-beta" in calibration.provenance and "weak" in calibration.provenance
    assert set(calibration.held_out) == {"teacher", "architecture"}  # resnet8 x2 and resnet14
    for figure in ("validation_beta_vs_gap.png", "validation_accuracy_vs_beta.png"):
        assert (folder / figure).stat().st_size > 1000

    state = json.loads((folder / "validation.json").read_text())
    assert state["status"] == "done"
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    validation_run = client.get_run(state["validation_run_id"])
    assert validation_run.info.status == "FINISHED" and validation_run.data.tags[TAG_KIND] == "validate-beta"
    for metric in ("loao_autobeta_mean_regret", "loto_autobeta_minus_constant_ci_low", "loao_coverage_80"):
        assert metric in validation_run.data.metrics
    assert "## Interventions on the gap" in report and "| mid | weak | permuted |" in report
    grid_state = json.loads((folder / "validation-grid" / "state.json").read_text())
    assert [
        grid_state["teachers"][name]["intervention"]["non_target"] for name in ("weak", "mid", "strong")
    ] == [
        "as_is",
        "permuted",
        "as_is",
    ]
    nested = client.search_runs(
        [validation_run.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{state['validation_run_id']}'",
    )
    assert {run.info.run_name for run in nested} == {"validation-grid"}
    assert {a.path for a in client.list_artifacts(state["validation_run_id"])} >= {
        "validation.md",
        "comparison.parquet",
        "calibration.json",
    }

    # Held out twice: the calibration checked on a grid it was not fitted on (here: itself, by path).
    again = cli(
        "validate-beta", str(validation_file), "--resamples", "100", "--search-trials", "3",
        "--calibration", str(folder / "calibration.json"), cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already finished, kept as is" in again.stdout
    assert "## Calibration held out" in (folder / "validation.md").read_text()
    assert (
        json.loads((folder / "validation.json").read_text())["validation_run_id"]
        == state["validation_run_id"]
    )


def test_the_shipped_validation_files_are_validations():
    root = Path(__file__).resolve().parents[1] / "search_spaces"
    for name in (
        "validate_cnn.yaml",
        "validate_cnn_interventions.yaml",
        "validate_synthetic.yaml",
        "validate_synthetic_control.yaml",
        "validate_synthetic_heldout.yaml",
    ):
        path = root / name
        space = load_search_space(path)
        check_validation_space(space, path)
    positive = load_search_space(root / "validate_synthetic.yaml")
    assert len(positive.teachers) >= 6
    assert all(len(set(positive.space_for(t)["seed"].grid)) >= 3 for t in positive.teachers)
