"""`dkd-tune suggest-beta`: measure a teacher's logit gap on a dataset and turn it into a distribution over beta,
how far to trust it, and a YAML snippet that starts a search from it."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from dkd_tune.config.tracking_uri import check_tracking_uri
from dkd_tune.core.errors import UserInputError
from dkd_tune.teacher.auto_beta import BetaSuggestion, beta_prior, load_calibration
from dkd_tune.teacher.gap import LogitGapStats

EXPERIMENT = "suggest-beta"


@dataclass(frozen=True)
class BetaReport:
    """One teacher's gap statistics and the beta, window and search-space snippet they give."""

    teacher_model: str
    teacher_checkpoint: str
    data: dict[str, Any]
    gap: LogitGapStats
    suggestion: BetaSuggestion
    mlflow_run_id: str | None = None
    calibration_provenance: str = ""
    beta_range: tuple[float, float] = (0.25, 16.0)  # what `beta: auto` would search with this calibration

    def to_dict(self) -> dict[str, Any]:
        low, high = self.suggestion.search_window()
        return {
            "teacher": {"model": self.teacher_model, "checkpoint": self.teacher_checkpoint},
            "data": self.data,
            "gap": self.gap.to_dict(),
            "beta": self.suggestion.beta,
            "spread_octaves": self.suggestion.spread,
            "spread_source": self.suggestion.spread_source,
            "interval_80": [low, high],
            "interval_80_unrounded": [self.suggestion.low, self.suggestion.high],
            "trust": self.suggestion.trust,
            "extrapolated": self.suggestion.extrapolated,
            "clamped": self.suggestion.clamped,
            "warnings": list(self.suggestion.warnings),
            "calibration": {
                "name": self.suggestion.calibration,
                "family": self.suggestion.family,
                "provenance": self.calibration_provenance,
            },
            "search_space_yaml": self.suggestion.search_space_yaml(self.beta_range),
            "mlflow_run_id": self.mlflow_run_id,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def text(self) -> str:
        """What a person reads: gap statistics, accuracies, beta and window, warnings, the YAML snippet."""
        gap, suggestion = self.gap, self.suggestion
        test = f"{gap.test_acc:.2f}%" if gap.test_acc == gap.test_acc else "not measured"
        lines = [
            f"teacher {self.teacher_model} ({self.teacher_checkpoint}) on {self.data['name']} "
            f"({self.data['train_images']} training images)",
            f"  top-1: train {gap.train_acc:.2f}%, test {test}",
            "logit gap z_t - max_{i != t} z_i over the training set (eval mode, no augmentation):",
            f"  mean {gap.mean:.3f}, median {gap.median:.3f}, std {gap.std:.3f}, "
            f"negative (teacher wrong) {100 * gap.negative_fraction:.2f}% of samples",
            f"auto-beta (calibration {suggestion.calibration!r}, family {suggestion.family}): {suggestion.describe()}",
            f"  spread: {suggestion.spread_source}",
            f"  trust: {suggestion.trust}",
        ]
        if self.calibration_provenance:
            lines.append(f"  calibration provenance: {self.calibration_provenance}")
        lines += [f"warning: {warning}" for warning in suggestion.warnings]
        lines += [
            "",
            "search-space snippet (a teacher's `space:` entry; the prior-guided sampler starts from it):",
            suggestion.search_space_yaml(self.beta_range).rstrip(),
        ]
        if self.mlflow_run_id:
            lines += ["", f"logged to MLflow run {self.mlflow_run_id} (experiment {EXPERIMENT!r})"]
        return "\n".join(lines)


def suggest_beta(
    teacher_model: str,
    teacher_checkpoint: str,
    data: str,
    *,
    calibration: str | None = None,
    validation: int = 0,
    device: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
) -> BetaReport:
    """Load the teacher, measure its gap on the data spec's train/test sets, predict beta; log to MLflow if asked.

    The calibration (the family's default, or `calibration`) is read first, so a family without
    one fails in a second with one line, before any data or weights are loaded.
    """

    from dkd_tune.data import load_splits, parse_data_spec
    from dkd_tune.engine.devices import chosen_device
    from dkd_tune.models import load_teacher, model_info
    from dkd_tune.teacher.gap import measure_logit_gap

    check_tracking_uri(tracking_uri, "--tracking-uri")
    check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    spec = parse_data_spec(data, source="--data")
    if validation and spec.kind.storage != "cifar-pickle":
        raise UserInputError(
            f"--validation: suggest-beta holds a validation split out of cifar100 and synthetic data, not {spec.name}"
        )
    spec = dataclasses.replace(spec, validation=validation)
    fitted = load_calibration(calibration, spec.family)
    model_info(teacher_model)
    target = chosen_device(device)
    train_set, val_set, test_set = load_splits(spec)
    teacher = load_teacher(
        teacher_model, teacher_checkpoint, num_classes=train_set.num_classes, device=target
    )
    gap = measure_logit_gap(
        teacher, train_set, test_set, validation=val_set, device=target, progress=progress
    )
    prior = beta_prior(
        fitted, gap, teacher_model
    )  # what `beta: auto` gives this teacher, computed the same way
    report = BetaReport(
        teacher_model=teacher_model,
        teacher_checkpoint=str(teacher_checkpoint),
        data={
            "name": spec.name,
            "root": str(spec.root),
            "family": spec.family,
            "train_images": len(train_set),
            "test_images": len(test_set),
            "num_classes": train_set.num_classes,
        },
        gap=gap,
        suggestion=prior.suggestion,
        calibration_provenance=fitted.provenance,
        beta_range=prior.beta_range,
    )
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        report = _log_to_mlflow(report, uri)
    return report


def _log_to_mlflow(report: BetaReport, uri: str) -> BetaReport:
    import dataclasses

    from dkd_tune.tracking.runs import command_run, now_ms, numeric_metrics

    suggestion, gap = report.suggestion, report.gap
    with command_run("suggest-beta", EXPERIMENT, uri, run_name=f"suggest-beta-{report.teacher_model}") as (
        store,
        run_id,
    ):
        store.log_params(
            run_id,
            {
                "teacher_model": report.teacher_model,
                "teacher_checkpoint": report.teacher_checkpoint,
                "dataset": report.data["name"],
                "data_root": report.data["root"],
                "family": suggestion.family,
                "calibration": suggestion.calibration,
            },
        )
        low, high = suggestion.search_window()
        metrics = {
            "gap_mean": gap.mean,
            "gap_median": gap.median,
            "gap_std": gap.std,
            "gap_negative_fraction": gap.negative_fraction,
            "teacher_train_acc": gap.train_acc,
            "teacher_test_acc": gap.test_acc,
            "beta": suggestion.beta,
            "beta_low": low,
            "beta_high": high,
            "beta_spread_octaves": suggestion.spread,
        }
        store.log_metrics(run_id, numeric_metrics(metrics), 0, now_ms())
        store.set_tags(
            run_id,
            {
                "teacher": report.teacher_model,
                "teacher_gap": f"{gap.mean:.4f}",
                "predicted_beta": f"{suggestion.beta:.3f}",
                "auto_beta.extrapolated": str(suggestion.extrapolated).lower(),
                "auto_beta.warnings": " | ".join(suggestion.warnings) or None,
            },
        )
        report = dataclasses.replace(report, mlflow_run_id=run_id)
        store.log_text(run_id, suggestion.search_space_yaml(report.beta_range), "search_space_beta.yaml")
        store.log_text(run_id, report.to_json() + "\n", "suggest_beta.json")
    return report
