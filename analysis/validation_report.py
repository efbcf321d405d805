"""The report of `dkd-tune validate-beta`: Markdown, the comparison table, the fitted calibration and the figures."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.beta_ground_truth import (
    FOLD_KINDS,
    PREDICTIVE_COVERAGE,
    BetaGrid,
    MethodComparison,
    calibrated_teachers,
    choose_feature,
    feature_scores,
    intervention_series,
    movement_verdict,
    regrets,
    verdict,
)
from analysis.grid_curves import rung_correlations
from analysis.plots import BetaMark, plot_accuracy_vs_beta, plot_best_beta_vs_gap
from analysis.tables import markdown_table
from dkd_tune.config.loading import load_search_space
from dkd_tune.config.schema import SearchSpaceFile
from dkd_tune.core.files import atomic_path, atomic_write_text
from dkd_tune.teacher.auto_beta import AnyCalibration, ModelCalibration, save_calibration, suggest_beta
from dkd_tune.teacher.beta_model import FEATURES, CalibratedTeacher, nearest_grid_index
from dkd_tune.teacher.gap import LogitGapStats

REPORT_FILE = "validation.md"
COMPARISON_FILE = "comparison.parquet"
CALIBRATION_FILE = "calibration.json"
BETA_VS_GAP_FIGURE = "validation_beta_vs_gap.png"
ACCURACY_FIGURE = "validation_accuracy_vs_beta.png"
ABSOLUTE_GOAL = 0.5  # points: the upper end of auto-beta's held-out-architecture regret interval
COVERAGE_GOAL = 0.7  # share of held-out-architecture teachers whose oracle lies in the 80% interval


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
    checked_calibration: AnyCalibration | None = None
    checked_calibration_path: str | None = None
    interventions: dict[str, dict] = field(
        default_factory=dict
    )  # teacher -> {base, target_shift, scale, non_target}


@dataclass
class ValidationAnalysis:
    """Everything the report states, computed once from the grid."""

    teachers: list[CalibratedTeacher]
    comparisons: dict[str, MethodComparison]  # fold kind -> held-out comparison
    scores: dict[str, dict[str | None, float]]  # fold kind -> feature -> mean held-out log score
    feature: str | None  # the family's feature (best held-out-architecture log score)
    calibration: ModelCalibration


def analyse(
    grid: BetaGrid,
    context: ValidationContext,
    *,
    search_picks: np.ndarray | None = None,
    search_epochs: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> ValidationAnalysis:
    """The protocol's analysis (search_spaces/validate_cnn.protocol.md): curves, feature choice, held-out
    comparisons for both fold kinds, and the calibration fitted on every teacher."""
    from analysis.beta_ground_truth import compare_methods

    teachers = calibrated_teachers(grid)
    comparisons = {
        kind: compare_methods(
            grid,
            teachers,
            kind,
            search_picks=search_picks,
            search_epochs=search_epochs,
            resamples=resamples,
            seed=seed,
        )
        for kind in FOLD_KINDS
        if kind == "teacher" or len({t.architecture for t in teachers}) >= 2
    }
    scores = {kind: feature_scores(teachers, kind) for kind in comparisons}
    feature = choose_feature(teachers, "architecture" if "architecture" in scores else "teacher")
    calibration = fitted_calibration(grid, context, teachers, feature, comparisons)
    return ValidationAnalysis(teachers, comparisons, scores, feature, calibration)


def fitted_calibration(
    grid: BetaGrid,
    context: ValidationContext,
    teachers: list[CalibratedTeacher],
    feature: str | None,
    comparisons: dict[str, MethodComparison],
) -> ModelCalibration:
    """The calibration fitted on every teacher of the grid (the one a family ships), with its held-out errors."""
    finished = context.sessions[-1]["started"] if context.sessions else time.strftime("%Y-%m-%d")
    provenance = (
        f"Fitted by `{context.command or 'dkd-tune validate-beta ' + context.source}` "
        f"(validation {context.name!r}, {finished}): a grid of {len(grid.teachers)} teachers "
        f"({', '.join(grid.teachers)}) x betas {', '.join(f'{b:g}' for b in grid.betas)} x seeds "
        f"{', '.join(str(s) for s in grid.seeds)}, student {context.space.student} on data {_data_text(context.space)}; "
        "chosen on the validation split; feature chosen by held-out log score."
    )
    held_out = {}
    for kind, comparison in comparisons.items():
        held_out[kind] = {
            "teachers": len(comparison.predictions),
            "rms_error_octaves": comparison.rms_error,
            "coverage_80": comparison.coverage,
            "peak_coverage_80": comparison.peak_coverage,
            **{f"{name}_regret": list(values) for name, values in comparison.mean_regret.items()},
        }
    evidence = {
        "student": context.space.student,
        "betas": [float(b) for b in grid.betas],
        "seeds": list(grid.seeds),
        "teacher_test_acc": {t: grid.teacher_test_acc.get(t) for t in grid.teachers},
    }
    if grid.student_alone:
        evidence["student_alone_test_acc"] = grid.student_alone["test"]
        evidence["student_alone_val_acc"] = grid.student_alone["val"]
    return ModelCalibration(
        name=context.name, family=context.family, provenance=provenance, teachers=tuple(teachers),
        feature=feature, log2_beta_range=(float(grid.log2_betas[0]), float(grid.log2_betas[-1])),
        held_out=held_out, evidence=evidence,
    )  # fmt: skip


def write_validation_outputs(
    context: ValidationContext,
    grid: BetaGrid,
    analysis: ValidationAnalysis,
    replays: pd.DataFrame,
    folder: Path,
    curves=None,
):
    """Write the report, the comparison table, the calibration and the two figures; return the outcome."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    calibration_path = folder / CALIBRATION_FILE
    save_calibration(analysis.calibration, calibration_path)
    main = analysis.comparisons.get("architecture") or analysis.comparisons["teacher"]
    figures = [
        _accuracy_figure(grid, main, folder / ACCURACY_FIGURE),
        plot_best_beta_vs_gap(
            analysis.calibration.points,
            folder / BETA_VS_GAP_FIGURE,
            calibration=analysis.calibration,
            calibration_label="auto-beta fitted on every teacher (a teacher of another architecture)",
            points_label="fitted peak of each teacher's curve",
            title="Each teacher's best beta (fitted peak) vs its gap",
            note=None
            if analysis.calibration.predicts_from_gap
            else f"no curve: the model predicts from {FEATURES[analysis.feature]}, not the gap",
        ),
    ]
    rungs = rung_correlations(curves, sorted({1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24})) if curves else None
    report = report_markdown(context, grid, analysis, replays, rungs)
    report_path = folder / REPORT_FILE
    atomic_write_text(report_path, report)
    comparison_path = folder / COMPARISON_FILE
    table = pd.concat(
        [c.table.assign(fold=kind) for kind, c in analysis.comparisons.items()], ignore_index=True
    )
    with atomic_path(comparison_path) as tmp:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)
    return ValidationOutcome(
        folder=folder,
        report_path=report_path,
        comparison_path=comparison_path,
        calibration_path=calibration_path,
        figures=figures,
        summary=verdict(main.differences["autobeta-constant"], "the constant"),
        comparison=table,
    )


def report_markdown(
    context: ValidationContext,
    grid: BetaGrid,
    analysis: ValidationAnalysis,
    replays: pd.DataFrame,
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
        f"- Ground truth: {len(grid.teachers)} teachers of {len(set(grid.architectures))} architectures x {betas} "
        f"betas ({', '.join(f'{b:g}' for b in grid.betas)}) x {seeds} seeds = {len(grid.teachers) * betas * seeds} "
        f"full runs, none pruned. Every choice is made on the validation split ({val_size} images); every "
        f"accuracy reported is on the test split ({test_size} images).",
        f"- Replayed searches: for each teacher and seed, an ASHA-pruned Optuna (TPE) search of "
        f"{int(replays['trials'].max()) if len(replays) else 0} trials over beta in [{grid.betas[0]:g}, "
        f"{grid.betas[-1]:g}] (log-uniform; each trial reads the grid run of the nearest grid beta), rungs from "
        f"grace period {space.scheduler.grace_period}, reduction factor {space.scheduler.reduction_factor}.",
        "- Protocol: `search_spaces/validate_cnn.protocol.md` (fixed before the runs). Regret = mean test top-1 "
        "at the oracle's beta (best mean validation top-1 on the grid) minus at the method's beta, paired by seed; "
        f"95% intervals: bootstrap over teachers as clusters ({next(iter(analysis.comparisons.values())).resamples} "
        "resamples).",
        "",
        "## Verdict",
        "",
    ]
    lines += _precondition_lines(grid)
    for kind, comparison in analysis.comparisons.items():
        lines.append(f"**{FOLD_KINDS[kind].capitalize()}.**")
        lines.append("")
        for other, label in (
            ("constant", "the constant"),
            ("beta8", "beta 8"),
            ("search", "the replayed search"),
        ):
            key = f"autobeta-{other}"
            if key in comparison.differences:
                lines.append(f"- {verdict(comparison.differences[key], label)}")
        mean, low, high = comparison.mean_regret["autobeta"]
        lines.append(
            f"- Auto-beta's mean regret {mean:.2f} points (95% interval {low:.2f} to {high:.2f}); its "
            f"{PREDICTIVE_COVERAGE:.0%} predictive interval covers the oracle beta for "
            f"{sum(p.covers_oracle for p in comparison.predictions)} of {len(comparison.predictions)} teachers "
            f"({comparison.coverage:.0%}; each teacher's fitted peak: {comparison.peak_coverage:.0%}); predicted "
            f"peak off by {comparison.rms_error:.2f} octaves RMS."
        )
        if kind == "architecture":
            lines.append(
                f"- Goals: regret's upper end <= {ABSOLUTE_GOAL} points: "
                f"{'met' if high <= ABSOLUTE_GOAL else f'missed by {high - ABSOLUTE_GOAL:.2f}'}; coverage >= "
                f"{COVERAGE_GOAL:.0%}: {'met' if comparison.coverage >= COVERAGE_GOAL else 'missed'}."
            )
        lines.append("")
    lines += ["| fold | method | mean regret (points) | 95% interval |", "|---|---|---|---|"]
    names = {"autobeta": "auto-beta", "constant": "constant", "beta8": "beta 8", "search": "replayed search"}
    for kind, comparison in analysis.comparisons.items():
        for name, (mean, low, high) in comparison.mean_regret.items():
            lines.append(f"| {kind} | {names[name]} | {mean:.2f} | {low:.2f} to {high:.2f} |")
    if len(replays):
        mean_epochs = float(replays["trial_epochs"].mean())
        lines += ["", f"The replayed search spends {mean_epochs:.0f} trial-epochs ({mean_epochs / epochs:.1f} full "
                  "runs) per teacher; auto-beta one pass of the teacher over the training set."]  # fmt: skip
    lines += ["", "## Which feature", ""]
    lines += _feature_lines(analysis)
    for kind, comparison in analysis.comparisons.items():
        lines += [
            "",
            f"## Per teacher: {FOLD_KINDS[kind]}",
            "",
            markdown_table(_teacher_table(grid, comparison)),
        ]
    lines += ["", "## Mean test top-1 per grid beta", "", markdown_table(_curve_table(grid))]
    if rungs is not None and not rungs.empty:
        lines += [
            "",
            "## Where ASHA's rungs can rank betas",
            "",
            f"Spearman correlation across the {betas} betas between validation top-1 at an epoch and at the end "
            f"({epochs}), per teacher and seed; the warm-up ends at epoch {recipe.warmup_epochs}.",
            "",
            markdown_table(rungs),
        ]
    lines += ["", *_noise_lines(grid, test_size, val_size)]
    if context.interventions:
        lines += ["", *_intervention_lines(grid, context.interventions)]
    lines += [
        "",
        "## The calibration fitted on every teacher",
        "",
        "```",
        analysis.calibration.report(),
        "```",
    ]
    lines += [f"Written to `{CALIBRATION_FILE}` for `dkd-tune suggest-beta --calibration` and `beta: auto`."]
    checked = _checked_calibration_table(grid, context)
    if checked is not None:
        lines += [
            "",
            f"## Calibration held out: `{context.checked_calibration_path}`",
            "",
            "Its suggestions for this grid's teachers (nothing of this grid was used to fit it):",
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


def _precondition_lines(grid: BetaGrid) -> list[str]:
    """The protocol's precondition: every teacher beats the student alone by more than 2 seed sds."""
    alone, sd = grid.student_alone.get("test"), grid.student_alone.get("test_sd", math.nan)
    if alone is None:
        return [
            "The student alone did not run: the precondition (every teacher better than it) is unchecked.",
            "",
        ]
    source = "its seeds"
    if not math.isfinite(sd):  # one run of the student alone: the grid's cells give the seed noise
        sd, source = float(np.sqrt(grid.test.var(axis=2, ddof=1).mean())), "the grid's cells"
    margin = 2 * sd
    weak = [t for t in grid.teachers if not grid.teacher_test_acc.get(t, math.inf) > alone + margin]
    text = (
        f"Precondition: the student alone reaches {alone:.2f}% test top-1 (seed sd {sd:.2f}, from {source}); "
        + (
            f"every teacher beats it by more than 2 seed sds ({margin:.2f} points)."
            if not weak
            else f"NOT every teacher beats it by 2 seed sds ({margin:.2f} points): {', '.join(weak)}."
        )
    )
    return [text, ""]


def _feature_lines(analysis: ValidationAnalysis) -> list[str]:
    lines = [
        "Mean held-out log score of each candidate feature (higher is better; log density of the held-out "
        "teacher's fitted peak under the predictive distribution):",
        "",
        "| feature | " + " | ".join(analysis.scores) + " |",
        "|---|" + "---|" * len(analysis.scores),
    ]
    candidates = list(next(iter(analysis.scores.values())))
    for feature in candidates:
        name = FEATURES[feature] if feature else "none (architecture and teacher effects only)"
        lines.append(
            f"| {name} | "
            + " | ".join(f"{scores.get(feature, math.nan):.3f}" for scores in analysis.scores.values())
            + " |"
        )
    chosen = FEATURES[analysis.feature] if analysis.feature else "none"
    lines += ["", f"The family's feature (best held-out-architecture score): **{chosen}**. Inside each outer fold "
              "the feature is chosen again from the fold's training teachers (the table's 'feature' column)."]  # fmt: skip
    return lines


def _teacher_table(grid: BetaGrid, comparison: MethodComparison) -> pd.DataFrame:
    table = comparison.table.copy()
    columns = {
        "teacher": "teacher",
        "architecture": "architecture",
        "gap": "gap",
        "teacher_test_acc": "teacher top-1",
        "oracle_beta": "oracle beta (val)",
        "oracle_test_acc": "top-1 at oracle",
        "peak_beta": "fitted peak",
        "feature": "feature",
        "predicted_beta": "predicted",
        "interval": "80% interval",
        "covers_oracle": "covers",
        "autobeta_beta": "auto-beta",
        "autobeta_regret": "regret",
        "constant_beta": "constant",
        "constant_regret": "regret ",
        "beta8_regret": "beta 8 regret",
        "search_beta": "search (per seed)",
        "search_regret": "regret  ",
        "search_epochs": "search trial-epochs",
    }
    present = [c for c in columns if c in table]
    return table[present].rename(columns=columns)


def _curve_table(grid: BetaGrid) -> pd.DataFrame:
    means = grid.test.mean(axis=2)
    rows = []
    for i, teacher in enumerate(grid.teachers):
        row = {"teacher": teacher, "gap": grid.gaps[i]}
        row.update({f"{b:g}": means[i, j] for j, b in enumerate(grid.betas)})
        rows.append(row)
    return pd.DataFrame(rows)


def _noise_lines(grid: BetaGrid, test_size: int, val_size: int) -> list[str]:
    def seed_sd(values: np.ndarray) -> float:
        return float(np.sqrt(values.var(axis=2, ddof=1).mean())) if len(grid.seeds) > 1 else float("nan")

    def binomial(accuracy: float, size: int) -> float:
        p = accuracy / 100
        return 100 * math.sqrt(p * (1 - p) / max(size, 1))

    test_mean, val_mean = float(grid.test.mean()), float(grid.val.mean())
    lines = [
        "## Noise",
        "",
        f"Seed-to-seed standard deviation of a cell: {seed_sd(grid.test):.2f} points on the test split, "
        f"{seed_sd(grid.val):.2f} on the validation split (root mean variance over cells). Binomial standard "
        f"deviation of the split alone at its mean top-1: test {binomial(test_mean, test_size):.2f} points "
        f"({test_size} images, {test_mean:.1f}%), validation {binomial(val_mean, val_size):.2f} points "
        f"({val_size} images, {val_mean:.1f}%).",
    ]
    if grid.student_alone:
        lines.append(
            f"The student trained alone (CE, mean over seeds): validation {grid.student_alone['val']:.2f}%, test "
            f"{grid.student_alone['test']:.2f}%."
        )
    return lines


def _intervention_lines(grid: BetaGrid, interventions: dict[str, dict]) -> list[str]:
    """The interventions' series (does the best beta move with the gap alone?) and the graded control."""
    lines = ["## Interventions on the gap", ""]
    for series in intervention_series(grid, interventions):
        what = "target logit shifted" if series.kind == "target_shift" else "all logits scaled"
        lines.append(
            f"- {series.base}, {what} ({', '.join(f'{v:g}' for v in series.values)}; gaps "
            f"{', '.join(f'{g:.2f}' for g in series.gaps)}; fitted peak betas "
            f"{', '.join(f'{2**p:.2g}' for p in series.peaks)}): the best beta {movement_verdict(series.movement)}."
        )
    alone = grid.student_alone.get("test")
    rows = []
    for teacher, info in interventions.items():
        if info["target_shift"] != 0 or info["scale"] != 1:
            continue
        i = grid.teachers.index(teacher)
        means = grid.test[i].mean(axis=1)
        best = int(grid.val[i].mean(axis=1).argmax())
        rows.append(
            {
                "teacher": teacher,
                "base": info["base"],
                "non-target logits": info["non_target"].replace("_", " "),
                "gap": grid.gaps[i],
                "oracle beta (val)": grid.betas[best],
                "top-1 at oracle": means[best],
                "gain over student alone": means[best] - alone if alone is not None else math.nan,
            }
        )
    if rows:
        lines += ["", "Graded control at a fixed gap (the non-target logits as they are, permuted within each "
                  "superclass, permuted across all classes):", "", markdown_table(pd.DataFrame(rows))]  # fmt: skip
    return lines


def _checked_calibration_table(grid: BetaGrid, context: ValidationContext) -> pd.DataFrame | None:
    calibration = context.checked_calibration
    if calibration is None:
        return None
    teachers = np.arange(len(grid.teachers))
    seeds = np.arange(len(grid.seeds))
    suggestions = [
        suggest_beta(calibration, _stats_of(grid, i), grid.architectures[i])
        for i in range(len(grid.teachers))
    ]
    picks = np.array([nearest_grid_index(math.log2(s.beta), grid.log2_betas) for s in suggestions])
    regret = regrets(grid, teachers, seeds, picks).mean(axis=1)
    oracle = grid.val.mean(axis=2).argmax(axis=1)
    return pd.DataFrame(
        {
            "teacher": grid.teachers,
            "gap": grid.gaps,
            "suggested beta": [s.beta for s in suggestions],
            "80% interval": [f"{s.low:.2g}-{s.high:.2g}" for s in suggestions],
            "grid beta used": grid.betas[picks],
            "oracle beta (val)": grid.betas[oracle],
            "regret (test)": regret,
        }
    )


def _stats_of(grid: BetaGrid, i: int) -> LogitGapStats:
    """A teacher's gap-pass measures as the grid recorded them (for suggesting from another calibration)."""
    features = grid.features[i]
    alone = grid.student_alone.get("val")
    margin = features.get("accuracy_margin")
    return LogitGapStats(
        mean=float(grid.gaps[i]), median=math.nan, std=math.nan, negative_fraction=math.nan, train_acc=math.nan,
        test_acc=grid.teacher_test_acc.get(grid.teachers[i], math.nan), num_samples=0,
        standardized_mean=features.get("standardized_gap", math.nan),
        non_target_entropy=features.get("non_target_entropy", math.nan),
        val_acc=margin + alone if margin is not None and alone is not None else math.nan,
    )  # fmt: skip


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
    for _, row in comparison.table.iterrows():
        i = grid.teachers.index(row["teacher"])
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
