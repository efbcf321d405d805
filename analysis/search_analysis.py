"""`dkd-tune analyze`: a finished search (its folder or its MLflow parent run) to Parquet, Markdown tables and PNG figures.

The same files are written at the end of every search (`write_analysis`, called by the search)
and logged to the search's MLflow parent run under `analysis/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.plots import plot_accuracy_vs_beta, plot_best_beta_vs_gap, plot_learning_curves
from analysis.results import write_results
from analysis.tables import beta_pivot, markdown_table, teacher_summary
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_path, atomic_write_text
from dkd_tune.tracking.store import TrackingStore

RESULTS_FILE = "results.parquet"
HISTORIES_FILE = "histories.parquet"
TABLES_FILE = "tables.md"
LEARNING_CURVES_FIGURE = "learning_curves.png"
ACCURACY_VS_BETA_FIGURE = "accuracy_vs_beta.png"
BETA_VS_GAP_FIGURE = "best_beta_vs_gap.png"
MLFLOW_ARTIFACT_DIR = "analysis"


@dataclass
class AnalysisOutputs:
    """What an analysis wrote, and the tables as text."""

    out_dir: Path
    results_path: Path
    histories_path: Path
    tables_path: Path
    figures: list[Path]
    summary: str
    pivot: str
    notes: list[str] = field(default_factory=list)
    logged_to: str | None = None  # "run <id> in <store>" when the files were logged to MLflow

    def main_table(self) -> str:
        return f"{self.summary}\n\n{self.pivot}"


def write_analysis(
    frame: pd.DataFrame,
    histories: pd.DataFrame,
    out_dir: str | Path,
    *,
    title: str,
    metric: str = "final_test_acc",
) -> AnalysisOutputs:
    """Write the results and histories Parquet, the tables (Markdown) and the three figures into `out_dir`.

    `metric` is the results' column the tables and figures rank by; a detection search's is
    `final_test_ap` (COCO AP) and is taken when the frame has it.
    """
    if metric == "final_test_acc" and "final_test_ap" in frame and frame["final_test_ap"].notna().any():
        metric = "final_test_ap"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = write_results(frame, out_dir / RESULTS_FILE)
    histories_path = _write_histories(histories, out_dir / HISTORIES_FILE)
    summary = teacher_summary(frame, metric)
    pivot = beta_pivot(frame, metric=metric)
    calibration, calibration_label, points, notes = _beta_curve(frame)
    summary_text = markdown_table(summary) if not summary.empty else "(no trials)"
    tables = [
        f"# {title}",
        "",
        "## Teachers",
        "",
        summary_text,
        "",
        f"## {'AP' if metric.endswith('_ap') else 'Top-1'} by beta and teacher (as Table A.1)",
        "",
        pivot.markdown(),
        "",
        *[f"- {note}" for note in notes],
    ]
    tables_path = out_dir / TABLES_FILE
    atomic_write_text(tables_path, "\n".join(tables).rstrip() + "\n")
    figures = [
        plot_learning_curves(
            histories, frame, out_dir / LEARNING_CURVES_FIGURE, metric=metric.removeprefix("final_")
        ),
        plot_accuracy_vs_beta(frame, out_dir / ACCURACY_VS_BETA_FIGURE, metric=metric),
        plot_best_beta_vs_gap(
            points,
            out_dir / BETA_VS_GAP_FIGURE,
            calibration=calibration,
            calibration_label=calibration_label,
            note=_beta_figure_note(points, calibration),
        ),
    ]
    return AnalysisOutputs(
        out_dir=out_dir,
        results_path=results_path,
        histories_path=histories_path,
        tables_path=tables_path,
        figures=figures,
        summary=summary_text,
        pivot=pivot.markdown(),
        notes=notes,
    )


def analyze_search(
    name_or_path: str,
    *,
    out: str | Path | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
) -> AnalysisOutputs:
    """Analyse a search given by its folder (or name under `storage`), else by its MLflow parent run's name or id."""
    from dkd_tune.tracking.connect import open_store, resolve_tracking_uri

    folder = _search_folder(name_or_path, storage)
    if folder is not None:
        from analysis.results import load_search_results, load_trial_histories
        from dkd_tune.config.search_state import SearchState

        state = SearchState.load(folder)
        frame = load_search_results(folder, state=state)
        histories = load_trial_histories(folder)
        uri, run_id = tracking_uri or state.tracking_uri, state.parent_run_id
        name, default_out = state.name, folder / MLFLOW_ARTIFACT_DIR
    else:
        from analysis.mlflow_results import find_parent_run, load_mlflow_histories, load_mlflow_results

        parent = find_parent_run(tracking_uri, name_or_path)
        frame = load_mlflow_results(parent.tracking_uri, parent.run_id)
        histories = load_mlflow_histories(parent.tracking_uri, parent.run_id)
        uri, run_id, name = parent.tracking_uri, parent.run_id, parent.name
        default_out = Path.cwd() / f"{name}-analysis"
    if frame.empty:
        raise UserInputError(f"search {name!r}: no trials recorded yet; nothing to analyse")
    outputs = write_analysis(frame, histories, Path(out) if out else default_out, title=f"Search {name}")
    if log_to_mlflow and run_id:
        try:
            log_analysis(open_store(uri), run_id, outputs.out_dir)
        except Exception as error:  # an unreachable store, or a run it does not hold
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserInputError(
                f"wrote {outputs.out_dir} but cannot log it to MLflow run {run_id} in "
                f"{resolve_tracking_uri(uri)} ({reason}); pass --tracking-uri or --no-mlflow"
            ) from None
        outputs.logged_to = f"run {run_id} in {resolve_tracking_uri(uri)}"
    return outputs


def log_analysis(store: TrackingStore, run_id: str, out_dir: Path) -> None:
    """Log the analysis folder's files to the run under `analysis/`."""
    store.log_artifacts(run_id, out_dir, folder=MLFLOW_ARTIFACT_DIR)


def _search_folder(name_or_path: str, storage: str | None) -> Path | None:
    from dkd_tune.config.folders import locate_search

    try:
        return locate_search(name_or_path, storage)
    except UserInputError:
        return None


def _beta_curve(frame: pd.DataFrame):
    """(calibration, its label, searched points, notes) for the beta-vs-gap figure."""
    from analysis.best_beta import calibration_points_from_results
    from dkd_tune.teacher.auto_beta import FAMILIES, default_calibration_or_none, fit_calibration

    notes = []
    try:
        points = calibration_points_from_results([frame])
    except UserInputError as error:
        points = []
        notes.append(f"best beta vs gap: {error}")
    families = frame["dataset_family"].dropna().unique()
    family = str(families[0]) if len(families) == 1 else None
    shipped = default_calibration_or_none(family) if family in FAMILIES else None
    if shipped is not None:
        return shipped, f"auto-beta, shipped calibration {shipped.name!r}", points, notes
    if len(points) >= 2 and len({p.mean_logit_gap for p in points}) >= 2:
        fitted = fit_calibration(points, family or "synthetic", "fitted to this search's own best betas")
        notes.append(
            f"no calibration ships for family {family!r}: the curve is fitted to this search's own points "
            "(in-sample, not a prediction; `dkd-tune validate-beta` measures held-out predictions)"
        )
        return fitted, "fit to these teachers (in-sample)", points, notes
    return None, None, points, notes


def _beta_figure_note(points, calibration) -> str | None:
    """What the figure cannot show, said on the figure itself."""
    if not points:
        return "no teacher has a completed DKD trial yet: no best beta to draw"
    if len(points) == 1 and calibration is None:
        return "one teacher: a curve needs the best betas of 2 or more teachers, or a shipped calibration"
    if calibration is not None and not calibration.predicts_from_gap:
        return (
            f"calibration {calibration.name!r} predicts beta from another property of the teacher than its gap "
            "(suggest-beta prints it): no curve over the gap to draw"
        )
    if len(points) == 1:
        return "one teacher: its best beta against the shipped calibration (not fitted to this search)"
    return None


def _write_histories(histories: pd.DataFrame, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = histories.copy()
    for column in ("part", "trial_id"):
        if column in frame:
            frame[column] = frame[column].astype("string")
    if "epoch" in frame:
        frame["epoch"] = pd.to_numeric(frame["epoch"], errors="coerce").fillna(0).astype("int64")
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    return path
