"""validate-beta: held-out predictions, what gets trained, compute accounting, the file checks, and a real tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis.beta_predictions import (
    EVALUATION_COLUMNS,
    betas_to_train,
    covering_trial,
    evaluation_rows,
    teacher_betas,
)
from analysis.compute_cost import StepFlops, compute_table, step_flops
from analysis.results import typed_results
from analysis.tables import beta_pivot, markdown_table
from analysis.validation import autobeta_space, check_validation_space
from dkd_tune.auto_beta import CalibrationPoint, default_calibration, fit_calibration
from dkd_tune.config import load_search_space
from dkd_tune.errors import UserInputError
from dkd_tune.tracking import TAG_KIND, TAG_PARENT
from tests.test_search_e2e import cli, tiny_space

GAPS = {"t1": 0.5, "t2": 1.5, "t3": 3.0, "t4": 6.0}
BEST = {"t1": 1.0, "t2": 2.0, "t3": 4.0, "t4": 8.0}


def trials_frame(best: dict[str, float] = BEST) -> pd.DataFrame:
    """A search's results: per teacher, completed trials at beta/2, beta (the best) and 2*beta, one stopped trial."""
    rows = []
    for teacher, gap in GAPS.items():
        for position, factor in enumerate((0.5, 1.0, 2.0)):
            rows.append(
                dict(part=teacher, teacher=teacher, teacher_model="resnet8", teacher_gap=gap, loss="dkd",
                     dataset_family="synthetic", trial_id=f"{teacher}-{position}", status="completed",
                     stop_epoch=8, max_epochs=8, beta=best[teacher] * factor, wall_time_s=10.0,
                     final_test_acc=80.0 - 5 * abs(math.log2(factor))),
            )  # fmt: skip
        rows.append(
            dict(part=teacher, teacher=teacher, teacher_model="resnet8", teacher_gap=gap, loss="dkd",
                 dataset_family="synthetic", trial_id=f"{teacher}-stopped", status="stopped", stop_epoch=2,
                 max_epochs=8, beta=best[teacher] * 1.01, wall_time_s=2.0, final_test_acc=95.0),
        )  # fmt: skip
    rows.append(
        dict(part="baseline-ce", teacher="none", teacher_model="none", loss="ce", dataset_family="synthetic",
             trial_id="ce", status="completed", stop_epoch=8, max_epochs=8, beta=8.0, final_test_acc=70.0,
             wall_time_s=8.0),
    )  # fmt: skip
    return typed_results(pd.DataFrame(rows))


def test_searched_best_ignores_stopped_trials_and_baselines():
    teachers = {t.teacher: t for t in teacher_betas(trials_frame(), "synthetic")}
    assert list(teachers) == ["t1", "t2", "t3", "t4"]  # by gap; the CE baseline is no teacher
    for name, entry in teachers.items():
        assert (
            entry.searched_beta == BEST[name] and entry.searched_acc == 80.0 and entry.completed_trials == 3
        )


def test_held_out_predictions_never_use_the_teachers_own_search():
    base = {t.teacher: t for t in teacher_betas(trials_frame(), "synthetic")}
    for teacher in GAPS:
        moved = dict(BEST, **{teacher: BEST[teacher] * 16})  # change only this teacher's search result
        changed = {t.teacher: t for t in teacher_betas(trials_frame(moved), "synthetic")}
        for predictor in ("loo", "constant"):
            assert changed[teacher].predictions[predictor].beta == pytest.approx(
                base[teacher].predictions[predictor].beta
            ), (teacher, predictor)
        assert changed[teacher].predictions["in_sample"].beta != pytest.approx(
            base[teacher].predictions["in_sample"].beta
        )  # the in-sample fit does see it: reported, never trained


def test_leave_one_out_is_the_fit_on_the_others():
    entry = next(t for t in teacher_betas(trials_frame(), "synthetic") if t.teacher == "t3")
    others = [CalibrationPoint(name, GAPS[name], BEST[name]) for name in ("t1", "t2", "t4")]
    expected = fit_calibration(others, "synthetic", "test").predict(GAPS["t3"]).beta
    assert entry.predictions["loo"].beta == pytest.approx(expected)
    geometric_mean = math.exp(sum(math.log(BEST[name]) for name in ("t1", "t2", "t4")) / 3)
    assert entry.predictions["constant"].beta == pytest.approx(geometric_mean)


def test_only_uncovered_predictions_are_trained_and_regret_is_measured_against_the_search():
    frame = trials_frame()
    teachers = teacher_betas(frame, "synthetic", cifar=default_calibration("cifar"))
    t1 = next(t for t in teachers if t.teacher == "t1")
    assert covering_trial(frame, "t1", BEST["t1"] * 1.001) is not None  # within 0.5%
    assert covering_trial(frame, "t1", BEST["t1"] * 1.01) is None  # the stopped trial there does not count
    pending = betas_to_train(teachers, frame)
    assert set(pending) == set(GAPS)
    for entry in teachers:
        wanted = {round(entry.predictions[p].beta, 9) for p in ("loo", "constant")}
        covered = {b for b in wanted if covering_trial(frame, entry.teacher, b) is not None}
        assert {round(b, 9) for b in pending[entry.teacher]} == wanted - covered
    assert "cifar" in t1.predictions  # reported, never trained
    runs = typed_results(
        pd.DataFrame(
            [
                dict(
                    part=teacher,
                    teacher=teacher,
                    trial_id=f"run-{teacher}-{i}",
                    status="completed",
                    beta=beta,
                    final_test_acc=78.0,
                    stop_epoch=8,
                    wall_time_s=12.0,
                )
                for teacher, betas in pending.items()
                for i, beta in enumerate(betas)
            ]
        )
    )
    evaluation = evaluation_rows(teachers, frame, runs)
    assert list(evaluation.columns) == list(EVALUATION_COLUMNS)
    assert {str(d) for d in evaluation.dtypes} <= {"string", "float64"}
    trained = evaluation[evaluation["predictor"].isin(["loo", "constant"])]
    assert trained["accuracy"].notna().all()
    assert (trained["regret"] == trained["searched_accuracy"] - trained["accuracy"]).all()
    reported = evaluation[evaluation["predictor"].isin(["in_sample", "cifar"])]
    assert reported["accuracy"].isna().all() and (reported["source"] == "not trained").all()


def test_compute_counts_trial_epochs_and_converts_teacher_passes():
    frame = trials_frame()
    flops = {teacher: StepFlops(student_train=3.0, teacher_forward=1.0) for teacher in GAPS}
    compute = compute_table(frame, pd.DataFrame(), flops, {"t4": 162}, 8, {"t1": 12.0}).set_index("teacher")
    assert compute.loc["t1", "search_trial_epochs"] == 3 * 8 + 2
    assert compute.loc["t1", "search_epoch_equivalents"] == pytest.approx(26 + 0.25)
    assert compute.loc["t1", "autobeta_epoch_equivalents"] == pytest.approx(8 + 0.25)
    # With the logit cache the trials skip the teacher forward but the cache cost one pass per view.
    assert compute.loc["t4", "search_epoch_equivalents"] == pytest.approx(26 * 0.75 + 163 * 0.25)
    assert compute.loc["t1", "autobeta_wall_time_s"] == 12.0 and pd.isna(
        compute.loc["t2", "autobeta_wall_time_s"]
    )
    measured = step_flops("resnet8", "resnet20", 10, 16)
    assert measured.teacher_forward > 0 and 0 < measured.teacher_pass_epochs < 1


def test_pivot_bins_continuous_betas_and_keeps_a_grid_as_it_is():
    frame = trials_frame()
    grid = beta_pivot(frame)
    assert not grid.binned and grid.table.shape == (6, 4)  # completed trials at 0.5, 1, 2, 4, 8 and 16
    assert (
        grid.table.loc[1.0, "t1"] == 80.0
        and grid.table.loc[2.0, "t1"] == 75.0
        and pd.isna(grid.table.loc[16.0, "t1"])
    )
    binned = beta_pivot(frame, bins=4)
    assert binned.binned and len(binned.table) == 4
    assert binned.table.max().tolist() == [80.0] * 4 and int(binned.counts.to_numpy().sum()) == 12
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
        {"model": "resnet8", "name": "mid", "train": {"overrides": {"epochs": 2, "batch_size": 32}}},
        {"model": "resnet14", "name": "strong", "train": {"overrides": {"epochs": 3, "batch_size": 32}}},
    ]
    return tiny_space(
        tmp_path,
        name="validation",
        teachers=teachers,
        overrides={"epochs": 3, "lr_milestones": [2], "warmup_epochs": 1, "batch_size": 32},
        space={"beta": {"loguniform": [0.25, 16.0]}, "alpha": 1.0},
        baselines=[],
        search={"algorithm": "optuna", "seed": 0, "num_samples": 3, "max_concurrent_trials": 2},
    )


def test_a_validation_file_searches_beta_alone_for_three_teachers(validation_file, tmp_path):
    space = load_search_space(validation_file)
    check_validation_space(space, validation_file)
    raw = yaml.safe_load(validation_file.read_text())
    for change, message in (
        (
            {"space": {"beta": {"loguniform": [0.25, 16.0]}, "temperature": {"choice": [2, 4]}}},
            "space.temperature",
        ),
        ({"teachers": raw["teachers"][:2]}, "at least 3 teachers"),
        ({"space": {"beta": 2.0}}, "beta must be searched"),
        ({"loss": "kd"}, "loss"),
    ):
        path = tmp_path / "changed.yaml"
        path.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(UserInputError, match=message) as error:
            check_validation_space(load_search_space(path), path)
        assert "\n" not in str(error.value)

    # The full runs' file: each teacher's betas as a grid, no pruning; it validates as a search file.
    derived = autobeta_space(space, "validation", {"weak": [0.5, 2.0], "strong": [3.0]})
    path = tmp_path / "autobeta.yaml"
    path.write_text(yaml.safe_dump(derived))
    autobeta = load_search_space(path)
    assert [t.label for t in autobeta.teachers] == ["weak", "strong"]
    assert autobeta.space_for(autobeta.teachers[0])["beta"].grid == [0.5, 2.0]
    assert (
        autobeta.scheduler.type == "none" and autobeta.search.algorithm == "grid" and not autobeta.baselines
    )
    assert autobeta.max_epochs() == space.max_epochs() and autobeta.name == space.name


@pytest.mark.slow
def test_validate_beta_end_to_end_and_resume(validation_file, tmp_path):
    result = cli("validate-beta", str(validation_file), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "auto-beta, leave-one-teacher-out" in result.stdout
    folder = tmp_path / "runs" / "validation"
    report = (folder / "validation.md").read_text()
    for heading in (
        "## Per teacher",
        "## Summary",
        "## Compute spent finding beta",
        "## Limits of this evidence",
    ):
        assert heading in report
    assert f"validate-beta {validation_file}" in report
    evaluation = pd.read_parquet(folder / "evaluation.parquet")
    assert list(evaluation.columns) == list(EVALUATION_COLUMNS)
    assert set(evaluation["teacher"]) == {"weak", "mid", "strong"}
    loo = evaluation[evaluation["predictor"] == "loo"].set_index("teacher")
    assert loo["accuracy"].notna().all()  # each prediction was trained (or covered by a completed trial)
    with_regret = loo.dropna(subset=["searched_accuracy"])
    assert (with_regret["regret"] == with_regret["searched_accuracy"] - with_regret["accuracy"]).all()
    compute = pd.read_parquet(folder / "compute.parquet")
    assert (compute["search_trial_epochs"] > 0).all() and (compute["autobeta_trial_epochs"] == 3).all()
    for figure in ("validation_beta_vs_gap.png", "validation_accuracy_vs_beta.png"):
        assert (folder / figure).stat().st_size > 1000

    state = json.loads((folder / "validation.json").read_text())
    assert state["status"] == "done"
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    validation_run = client.get_run(state["validation_run_id"])
    assert validation_run.info.status == "FINISHED" and validation_run.data.tags[TAG_KIND] == "validate-beta"
    assert "loo_mean_regret" in validation_run.data.metrics or loo["regret"].isna().all()
    nested = client.search_runs(
        [validation_run.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{state['validation_run_id']}'",
    )
    names = {run.info.run_name for run in nested}
    assert "validation-search" in names and names <= {"validation-search", "validation-autobeta"}
    assert {a.path for a in client.list_artifacts(state["validation_run_id"])} >= {
        "validation.md",
        "evaluation.parquet",
    }

    again = cli("validate-beta", str(validation_file), cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already finished, kept as is" in again.stdout
    assert (
        json.loads((folder / "validation.json").read_text())["validation_run_id"]
        == state["validation_run_id"]
    )


def test_the_shipped_validation_file_is_a_validation():
    path = Path(__file__).resolve().parents[1] / "search_spaces" / "validate_synthetic.yaml"
    space = load_search_space(path)
    check_validation_space(space, path)
    assert len({teacher.model for teacher in space.teachers}) >= 4  # four capacities
    assert space.space_for(space.teachers[0])["beta"].loguniform == (0.25, 16.0)
