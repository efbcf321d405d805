"""The analysis of a small finished search: its DataFrame, Parquet schema, tables, figures, MLflow copy and CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from analysis.mlflow_results import load_mlflow_histories, load_mlflow_results
from analysis.results import RESULT_COLUMNS, load_search_results, load_trial_histories
from analysis.search_analysis import (
    ACCURACY_VS_BETA_FIGURE,
    BETA_VS_GAP_FIGURE,
    LEARNING_CURVES_FIGURE,
    analyze_search,
)
from analysis.tables import beta_pivot, teacher_summary
from dkd_tune.tracking.status import STATUSES
from tests.test_search_e2e import cli, tiny_space

pytestmark = pytest.mark.slow
FIGURES = (LEARNING_CURVES_FIGURE, ACCURACY_VS_BETA_FIGURE, BETA_VS_GAP_FIGURE)
ARROW_TYPES = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64()}
# What MLflow does not hold (docs/analysis.md: "Loading from MLflow"); every other column must match the folder's.
NOT_IN_MLFLOW = {"wall_time_s", "num_failures", "checkpoint_path", "teacher_gap", "predicted_beta"}


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> Path:
    """A real tiny search: two teachers of different strength, a CE baseline, beta searched, ASHA."""
    root = tmp_path_factory.mktemp("analysis")
    teachers = [
        {"model": "resnet8", "name": "weak", "train": {"overrides": {"epochs": 1, "batch_size": 32}}},
        {"model": "resnet8", "name": "strong", "train": {"overrides": {"epochs": 3, "batch_size": 32}}},
    ]
    path = tiny_space(
        root,
        name="analysis",
        teachers=teachers,
        space={"beta": {"loguniform": [0.5, 8.0]}},
        search={"algorithm": "optuna", "seed": 0, "num_samples": 4, "max_concurrent_trials": 2},
    )
    result = cli("run", str(path), cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "runs" / "analysis"


def test_results_frame_has_one_typed_row_per_trial(search):
    frame = load_search_results(search)
    assert list(frame.columns) == list(RESULT_COLUMNS)
    assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == {
        name: "string" if dtype == "string" else dtype for name, dtype in RESULT_COLUMNS.items()
    }
    assert len(frame) == 4 + 4 + 1 and frame["trial_id"].is_unique
    assert set(frame["status"]) <= set(STATUSES) and (frame["status"] == "completed").any()
    searched = frame[frame["part"] != "baseline-ce"]
    assert searched["teacher_gap"].notna().all() and searched["beta"].between(0.5, 8.0).all()
    assert (frame["stop_epoch"].between(1, 4)).all() and (frame["wall_time_s"] > 0).all()
    assert (frame["best_test_acc"] >= frame["final_test_acc"]).all()
    assert set(json.loads(searched["config_json"].iloc[0])) == {"beta"}


def test_parquet_schema_is_the_documented_one(search):
    schema = pq.read_schema(search / "results.parquet")
    assert schema.names == list(RESULT_COLUMNS)
    for name, dtype in RESULT_COLUMNS.items():
        assert schema.field(name).type == ARROW_TYPES[dtype], name
    documented = (Path(__file__).resolve().parents[1] / "docs" / "analysis.md").read_text()
    for name, dtype in RESULT_COLUMNS.items():
        assert f"| `{name}` | {dtype} |" in documented, (
            f"docs/analysis.md's schema table lacks {name} ({dtype})"
        )


def test_pivot_and_summary_match_the_trials(search):
    frame = load_search_results(search)
    pivot = beta_pivot(frame)
    completed = frame[(frame["status"] == "completed") & (frame["part"] != "baseline-ce")]
    assert list(pivot.table.columns) == list(completed.sort_values("teacher_gap")["teacher"].unique())
    for teacher in pivot.table.columns:
        assert (
            pivot.table[teacher].max() == completed[completed["teacher"] == teacher]["final_test_acc"].max()
        )
    assert int(pivot.counts.to_numpy().sum()) == len(completed)
    assert "gap z_t - z_max" in pivot.markdown() and "**" in pivot.markdown()
    summary = teacher_summary(frame).set_index("teacher")
    assert summary.loc["baseline-ce", "trials"] == 1
    assert summary["trial_epochs"].sum() == frame["stop_epoch"].sum()


def test_the_search_wrote_and_logged_its_figures(search):
    for name in (*FIGURES, "tables.md", "results.parquet", "histories.parquet"):
        assert _png_or_file_ok(search / "analysis" / name), name
    state = json.loads((search / "state.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    logged = {artifact.path for artifact in client.list_artifacts(state["parent_run_id"], "analysis")}
    assert {f"analysis/{name}" for name in FIGURES} <= logged


def test_analyze_from_the_folder_and_from_mlflow_agree(search, tmp_path):
    state = json.loads((search / "state.json").read_text())
    from_folder = analyze_search(str(search), out=tmp_path / "folder", log_to_mlflow=False)
    from_mlflow = analyze_search(
        state["parent_run_id"],
        out=tmp_path / "mlflow",
        tracking_uri=state["tracking_uri"],
        log_to_mlflow=False,
    )
    for outputs in (from_folder, from_mlflow):
        for name in FIGURES:
            assert _png_or_file_ok(outputs.out_dir / name), name
    folder = pd.read_parquet(from_folder.results_path).sort_values("trial_id").reset_index(drop=True)
    mlflow = pd.read_parquet(from_mlflow.results_path).sort_values("trial_id").reset_index(drop=True)
    assert list(mlflow.dtypes) == list(folder.dtypes)
    for column in set(RESULT_COLUMNS) - NOT_IN_MLFLOW:
        pd.testing.assert_series_equal(mlflow[column], folder[column], check_names=False, obj=column)
    assert (mlflow["teacher_gap"] - folder["teacher_gap"]).abs().max() < 1e-4
    # MLflow holds auto-beta's prediction as the 3-decimal tag the search logged.
    assert folder["predicted_beta"].notna().any()
    assert (mlflow["predicted_beta"].isna() == folder["predicted_beta"].isna()).all()
    assert (mlflow["predicted_beta"] - folder["predicted_beta"]).abs().max() <= 5e-4
    assert from_folder.main_table() == from_mlflow.main_table()

    # The same search found by its name, and its histories through the client.
    by_name = load_mlflow_results(state["tracking_uri"], state["name"])
    assert sorted(by_name["trial_id"]) == sorted(folder["trial_id"])
    histories = load_mlflow_histories(state["tracking_uri"], state["name"])
    ray = load_trial_histories(search)
    merged = histories.merge(ray, on=["part", "trial_id", "epoch"], suffixes=("", "_ray"))
    assert len(merged) == len(ray) == int(folder["stop_epoch"].sum())
    assert (merged["test_acc"] == merged["test_acc_ray"]).all()


def test_analyze_command_prints_the_table_and_logs_to_the_run(search, tmp_path):
    result = cli(
        "analyze", "analysis", "--storage", str(search.parent), "--out", str(tmp_path / "out"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| beta |" in result.stdout and "gap z_t - z_max" in result.stdout
    assert "logged to MLflow run" in result.stdout
    for name in FIGURES:
        assert _png_or_file_ok(tmp_path / "out" / name)

    missing = cli(
        "analyze", "no-such-search", "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}", cwd=tmp_path
    )
    assert missing.returncode == 2
    assert "no-such-search" in missing.stderr and "Traceback" not in missing.stderr


def _png_or_file_ok(path: Path) -> bool:
    """The file exists and is not empty; a PNG has its signature and a non-zero width and height."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    if path.suffix != ".png":
        return True
    header = path.read_bytes()[:24]
    width, height = struct.unpack(">II", header[16:24])
    return header[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100


def test_a_one_teacher_search_draws_its_point_and_says_why_there_is_no_curve(search, tmp_path, monkeypatch):
    from analysis import plots
    from analysis.search_analysis import write_analysis

    frame = pd.read_parquet(search / "results.parquet")
    one = frame[frame["teacher"] == "strong"]
    drawn = {}

    def keep(figure, path):
        drawn[Path(path).name] = figure
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    # A family without a shipped calibration: the point alone, and the reason on the figure.
    monkeypatch.setattr("dkd_tune.teacher.auto_beta.default_calibration_or_none", lambda family: None)
    outputs = write_analysis(one, load_trial_histories(search), tmp_path / "analysis", title="one teacher")
    axis = drawn["best_beta_vs_gap.png"].axes[0]
    best = one[(one["loss"] == "dkd") & (one["status"] == "completed")].sort_values("final_test_acc").iloc[-1]
    points = [line.get_xydata()[0] for line in axis.lines if len(line.get_xydata()) == 1]
    assert any(np.allclose(point, (best["teacher_gap"], best["beta"])) for point in points)
    notes = [text.get_text() for text in axis.texts]
    assert any("one teacher: a curve needs the best betas of 2 or more teachers" in note for note in notes)
    assert outputs.figures


def test_a_calibration_that_does_not_predict_from_the_gap_draws_no_curve_and_says_why():
    from analysis.search_analysis import _beta_figure_note
    from dkd_tune.teacher.auto_beta import default_calibration

    synthetic = default_calibration("synthetic")  # the all-CNN calibration: the accuracy margin, not the gap
    assert not synthetic.predicts_from_gap
    note = _beta_figure_note(["a point"], synthetic)
    assert "predicts beta from another property of the teacher than its gap" in note
    assert _beta_figure_note(["a point"], default_calibration("cifar")) is not None  # one teacher: said so
