"""The report of `dkd-tune validate-beta`: Markdown, the comparison table, the fitted calibration and the figures."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.beta_ground_truth import BetaGrid, MethodComparison, regrets, relation_verdict, verdict
from analysis.grid_curves import rung_correlations
from analysis.plots import BetaMark, plot_accuracy_vs_beta, plot_best_beta_vs_gap
from analysis.tables import markdown_table
from dkd_tune.config.loading import load_search_space
from dkd_tune.config.schema import SearchSpaceFile
from dkd_tune.core.files import atomic_path, atomic_write_text
from dkd_tune.teacher.auto_beta import (
    Calibration,
    CalibrationPoint,
    fit_calibration,
    save_calibration,
    surface_calibration,
)
from dkd_tune.teacher.beta_surface import fit_surface, nearest_grid_index

REPORT_FILE = "validation.md"
COMPARISON_FILE = "comparison.parquet"
CALIBRATION_FILE = "calibration.json"
BETA_VS_GAP_FIGURE = "validation_beta_vs_gap.png"
ACCURACY_FIGURE = "validation_accuracy_vs_beta.png"


@dataclass
class ValidationContext:
    """What the report states about how the validation was run."""

    name: str
    space: SearchSpaceFile
    source: str
    command: str
    sessions: list[dict[str, Any]]
    machine: str
    load_average: tuple[float, float]
    grid_dir: Path
    family: str
    checked_calibration: Calibration | None = None
    checked_calibration_path: str | None = None


def fitted_calibration(grid: BetaGrid, context: ValidationContext) -> Calibration:
    """The calibration fitted on every teacher of the grid (the one a family ships), with its provenance."""
    surface = fit_surface(
        grid.gaps, grid.log2_betas, grid.val.mean(axis=2), noise_variance=grid.noise_variance()
    )
    oracle = grid.val.mean(axis=2).argmax(axis=1)
    points = [
        CalibrationPoint(
            teacher=teacher,
            mean_logit_gap=float(grid.gaps[i]),
            best_beta=float(grid.betas[oracle[i]]),
            source=f"grid oracle: best mean validation top-1 over {len(grid.seeds)} seeds",
        )
        for i, teacher in enumerate(grid.teachers)
    ]
    finished = context.sessions[-1]["started"] if context.sessions else time.strftime("%Y-%m-%d")
    provenance = (
        f"Fitted by `{context.command or 'dkd-tune validate-beta ' + context.source}` "
        f"(validation {context.name!r}, {finished}): the response surface of a grid of "
        f"{len(grid.teachers)} teachers ({', '.join(grid.teachers)}) x betas "
        f"{', '.join(f'{b:g}' for b in grid.betas)} x seeds {', '.join(str(s) for s in grid.seeds)}, "
        f"student {context.space.student} on data {_data_text(context.space)}; "
        f"chosen on the validation split."
    )
    evidence = {
        "student": context.space.student,
        "betas": [float(b) for b in grid.betas],
        "seeds": list(grid.seeds),
        "teacher_test_acc": {t: grid.teacher_test_acc.get(t) for t in grid.teachers},
    }
    if grid.student_alone:
        evidence["student_alone_test_acc"] = grid.student_alone["test"]
    base = fit_calibration(points, context.family, provenance, name=context.name, evidence=evidence)
    return surface_calibration(base, surface)


def write_validation_outputs(
    context: ValidationContext,
    grid: BetaGrid,
    comparison: MethodComparison,
    replays: pd.DataFrame,
    folder: Path,
    curves=None,
):
    """Write the report, the comparison table, the calibration and the two figures; return the outcome."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis.validation_report import ValidationOutcome

    calibration = fitted_calibration(grid, context)
    calibration_path = folder / CALIBRATION_FILE
    save_calibration(calibration, calibration_path)
    checked = _checked_calibration_table(grid, context)
    figures = [
        _accuracy_figure(grid, comparison, folder / ACCURACY_FIGURE),
        plot_best_beta_vs_gap(
            calibration.points,
            folder / BETA_VS_GAP_FIGURE,
            calibration=calibration,
            calibration_label="auto-beta fitted on every teacher (peak and window)",
            points_label="oracle beta (best mean validation top-1 on the grid)",
            title="The grid's best beta vs the teacher's gap",
        ),
    ]
    rungs = rung_correlations(curves, sorted({1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24})) if curves else None
    report = report_markdown(context, grid, comparison, replays, calibration, checked, rungs)
    report_path = folder / REPORT_FILE
    atomic_write_text(report_path, report)
    comparison_path = folder / COMPARISON_FILE
    with atomic_path(comparison_path) as tmp:
        pq.write_table(pa.Table.from_pandas(comparison.table, preserve_index=False), tmp)
    return ValidationOutcome(
        folder=folder,
        report_path=report_path,
        comparison_path=comparison_path,
        calibration_path=calibration_path,
        figures=figures,
        summary=verdict(comparison.differences, "autobeta-constant", "the constant"),
        comparison=comparison.table,
    )


def report_markdown(
    context: ValidationContext,
    grid: BetaGrid,
    comparison: MethodComparison,
    replays: pd.DataFrame,
    calibration: Calibration,
    checked: pd.DataFrame | None,
    rungs: pd.DataFrame | None = None,
) -> str:
    space = context.space
    recipe = space.base_recipe(space.teachers[0])
    wall = sum(session["seconds"] for session in context.sessions)
    seeds, betas = len(grid.seeds), len(grid.betas)
    epochs = space.max_epochs()
    test_size, val_size = _split_sizes(context.grid_dir)
    lines = [
        f"# Auto-beta validation '{context.name}'",
        "",
        f"- Command: `{context.command}`",
        f"- Started {context.sessions[0]['started'] if context.sessions else '?'}; wall time {wall:.0f} s "
        f"({wall / 60:.1f} min) in {len(context.sessions)} session(s), teacher training included",
        f"- Machine: {context.machine}; 1-minute load average {context.load_average[0]:.1f} at the start of the "
        f"last session, {context.load_average[1]:.1f} at its end",
        f"- Data: {_data_text(space)} (family {context.family}); student {space.student}, {epochs} epochs per run; "
        f"alpha {recipe.alpha:g}, T {recipe.temperature:g}, warm-up {recipe.warmup_epochs} epochs, lr {recipe.lr:g}, "
        f"batch {recipe.batch_size}",
        f"- Ground truth: {len(grid.teachers)} teachers x {betas} betas ({', '.join(f'{b:g}' for b in grid.betas)}) x "
        f"{seeds} seeds = {len(grid.teachers) * betas * seeds} full runs, none pruned. Every choice is made on "
        f"the validation split ({val_size} images); every accuracy reported is on the test split ({test_size} "
        "images).",
        f"- Replayed searches: for each teacher and seed, an ASHA-pruned Optuna (TPE) search of "
        f"{int(replays['trials'].max()) if len(replays) else 0} trials over beta in [{grid.betas[0]:g}, "
        f"{grid.betas[-1]:g}] (log-uniform; each trial reads the grid run of the nearest grid beta), rungs from "
        f"grace period {space.scheduler.grace_period}, reduction factor {space.scheduler.reduction_factor}.",
        "",
        "## Verdict",
        "",
        verdict(comparison.differences, "autobeta-constant", "the constant"),
    ]
    if "autobeta-search" in comparison.differences:
        lines.append(verdict(comparison.differences, "autobeta-search", "the replayed search"))
    lines.append(relation_verdict(comparison.slope, grid.gaps, grid.betas))
    lines += [
        "",
        f"Intervals: 95% percentile bootstrap over teachers and seeds ({comparison.resamples} resamples), both "
        "models (and the relation's fit on every teacher) refitted inside every resample. Regret = mean test top-1 at the oracle's beta (best mean "
        "validation top-1 on the grid) minus mean test top-1 at the method's beta, paired by seed.",
        "",
        "| method | mean regret (points) | compute to choose beta |",
        "|---|---|---|",
        f"| auto-beta, leave-one-teacher-out | {comparison.mean_regret['autobeta']:.2f} | one pass of the teacher "
        "over the training set (its gap), given a calibration |",
        f"| constant, leave-one-teacher-out | {comparison.mean_regret['constant']:.2f} | none, given a calibration |",
    ]
    if "search" in comparison.mean_regret:
        mean_epochs = float(replays["trial_epochs"].mean()) if len(replays) else float("nan")
        lines.append(
            f"| ASHA-pruned Optuna search (replayed) | {comparison.mean_regret['search']:.2f} | "
            f"{mean_epochs:.0f} trial-epochs ({mean_epochs / epochs:.1f} full runs) per teacher |"
        )
    lines += ["", "| difference | mean | 95% interval |", "|---|---|---|"]
    for key, (mean, low, high) in comparison.differences.items():
        lines.append(f"| {key.replace('-', ' - ')} | {mean:+.2f} | {low:+.2f} to {high:+.2f} |")
    lines += ["", "## Per teacher", "", markdown_table(_teacher_table(grid, comparison)), ""]
    if rungs is not None and not rungs.empty:
        lines += [
            "## Where ASHA's rungs can rank betas",
            "",
            f"Spearman correlation across the {betas} betas between validation top-1 at an epoch and at the end "
            f"({epochs}), per teacher and seed; the warm-up ends at epoch {recipe.warmup_epochs}.",
            "",
            markdown_table(rungs),
            "",
        ]
    lines += _noise_lines(grid, test_size)
    lines += ["", "## The calibration fitted on every teacher", ""]
    surface = calibration.surface
    assert surface is not None
    lines += [
        f"Peak log2(beta) = {surface.intercept:.2f} + {surface.slope:.3f} x gap (beta "
        + (
            f"doubles every {1 / surface.slope:.2f} gap units"
            if surface.slope > 0
            else (
                "halves every %.2f gap units" % (-1 / surface.slope)
                if surface.slope < 0
                else "is the same for every gap"
            )
        )
        + f"), curvature {surface.curvature:.2f} points per squared octave, window +-{surface.half_width():.2f} "
        f"octaves; gaps {surface.gap_range[0]:.2f} to {surface.gap_range[1]:.2f}. Written to `{CALIBRATION_FILE}` "
        "(with this provenance) for `dkd-tune suggest-beta --calibration` and `beta: auto`.",
    ]
    if checked is not None:
        lines += [
            "",
            f"## Calibration held out: `{context.checked_calibration_path}`",
            "",
            "Its predictions for this grid's teachers (nothing of this grid was used to fit it):",
            "",
            markdown_table(checked),
        ]
    lines += [
        "",
        "![top-1 vs beta](validation_accuracy_vs_beta.png)",
        "",
        "![beta vs gap](validation_beta_vs_gap.png)",
        "",
    ]
    return "\n".join(lines)


def _teacher_table(grid: BetaGrid, comparison: MethodComparison) -> pd.DataFrame:
    table = comparison.table.copy()
    alone = grid.student_alone.get("test")
    table["better than student alone"] = [
        "" if alone is None or not math.isfinite(acc) else ("yes" if acc > alone else "NO")
        for acc in table["teacher_test_acc"]
    ]
    columns = {
        "teacher": "teacher",
        "gap": "gap",
        "teacher_test_acc": "teacher top-1",
        "better than student alone": "better than student alone",
        "oracle_beta": "oracle beta (val)",
        "oracle_test_acc": "top-1 at oracle",
        "oracle_test_sd": "seed sd",
        "autobeta_beta": "auto-beta",
        "autobeta_regret": "regret",
        "constant_beta": "constant",
        "constant_regret": "regret ",
        "search_betas": "search (per seed)",
        "search_regret": "regret  ",
        "search_epochs": "search trial-epochs",
    }
    present = [c for c in columns if c in table]
    return table[present].rename(columns=columns)


def _noise_lines(grid: BetaGrid, test_size: int) -> list[str]:
    seed_sd = float(np.sqrt(grid.test.var(axis=2, ddof=1).mean())) if len(grid.seeds) > 1 else float("nan")
    p = float(grid.test.mean()) / 100
    binomial = 100 * math.sqrt(p * (1 - p) / max(test_size, 1))
    lines = [
        f"Noise: the seed-to-seed standard deviation of a cell's test top-1 is {seed_sd:.2f} points (root mean "
        f"variance over cells); the test split alone carries a binomial standard deviation of {binomial:.2f} points "
        f"at the mean top-1 {100 * p:.1f}%.",
    ]
    if grid.student_alone:
        lines.append(
            f"The student trained alone (CE, one seed): validation {grid.student_alone['val']:.2f}%, test "
            f"{grid.student_alone['test']:.2f}%."
        )
    return lines


def _checked_calibration_table(grid: BetaGrid, context: ValidationContext) -> pd.DataFrame | None:
    calibration = context.checked_calibration
    if calibration is None:
        return None
    teachers = np.arange(len(grid.teachers))
    seeds = np.arange(len(grid.seeds))
    picks = np.array(
        [
            nearest_grid_index(math.log2(calibration.predict(float(gap)).beta), grid.log2_betas)
            for gap in grid.gaps
        ]
    )
    regret = regrets(grid, teachers, seeds, picks).mean(axis=1)
    oracle = grid.val.mean(axis=2).argmax(axis=1)
    return pd.DataFrame(
        {
            "teacher": grid.teachers,
            "gap": grid.gaps,
            "predicted beta": [calibration.predict(float(g)).beta for g in grid.gaps],
            "grid beta used": grid.betas[picks],
            "oracle beta (val)": grid.betas[oracle],
            "regret (test)": regret,
        }
    )


def _accuracy_figure(grid: BetaGrid, comparison: MethodComparison, path: Path) -> Path:
    """Mean validation top-1 over the seeds against beta per teacher, with auto-beta's and the constant's picks."""
    rows = []
    for i, teacher in enumerate(grid.teachers):
        for j, beta in enumerate(grid.betas):
            rows.append(
                {
                    "part": teacher,
                    "teacher": teacher,
                    "teacher_gap": grid.gaps[i],
                    "beta": beta,
                    "loss": "dkd",
                    "status": "completed",
                    "final_val_acc": grid.val[i, j].mean(),
                }
            )
    frame = pd.DataFrame(rows)
    marks = []
    for i, row in comparison.table.iterrows():
        for method, marker, label in (
            ("autobeta", "X", "auto-beta (held out)"),
            ("constant", "s", "constant"),
        ):
            j = int(np.argmin(np.abs(grid.betas - row[f"{method}_beta"])))
            marks.append(BetaMark(row["teacher"], grid.betas[j], grid.val[i, j].mean(), label, marker))
    return plot_accuracy_vs_beta(frame, path, metric="final_val_acc", marks=marks)


def _split_sizes(grid_dir: Path) -> tuple[int, int]:
    """(test images, validation images) of the grid's data, from its search file."""

    try:
        space = load_search_space(grid_dir / "search.yaml")
        spec = space.data_spec
        generate = spec.generate or {}
        classes = generate.get("classes")
        test = classes * generate["test_per_class"] if classes and "test_per_class" in generate else 0
        return test, (classes or 0) * spec.validation
    except Exception:  # the sizes are for the reader; a missing file must not fail the report
        return 0, 0


def _data_text(space: SearchSpaceFile) -> str:
    if isinstance(space.data, str):
        return f"`{space.data}`"
    value = space.data.model_dump(exclude_none=True)
    parts = [f"{key}: {value[key]}" for key in ("name", "root", "validation") if key in value]
    if "generate" in value:
        parts.append("generate: {" + ", ".join(f"{k}: {v}" for k, v in value["generate"].items()) + "}")
    return "`{" + ", ".join(parts) + "}`"


@dataclass
class ValidationOutcome:
    folder: Path
    report_path: Path
    comparison_path: Path
    calibration_path: Path
    figures: list[Path]
    summary: str
    comparison: pd.DataFrame = field(repr=False)
