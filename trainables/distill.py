"""Ray Tune function trainable: one trial is one `run_trial`; each epoch's metrics and checkpoint go to Ray."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from dkd_tune.data.shared import SharedDataset
from dkd_tune.engine.checkpoints import BEST_CHECKPOINT
from dkd_tune.engine.loop import EpochReport
from dkd_tune.trial import TrialPlan, run_trial
from trainables.checkpoint_files import link_or_copy, restore_checkpoint_files


def distillation_trainable(
    workers: int = 1,
    *,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
    storage_dir: str = "",
) -> Callable[..., None]:
    """The trainable for trials of `workers` processes: this function, or DDP through Ray Train.

    `storage_dir` is the part's folder in the search's storage (DDP trials keep checkpoints there).
    """
    if workers > 1:
        from trainables.distill_ddp import make_ddp_trial

        return make_ddp_trial(
            workers,
            use_gpu=use_gpu,
            cpus_per_worker=cpus_per_worker,
            storage_dir=storage_dir,
            max_failures=max_failures,
        )
    return distill_trial


def distill_trial(config: dict[str, Any], plan: TrialPlan, data: SharedDataset) -> None:
    """Train one trial; Ray restarts it from its last reported checkpoint after a failure or a resume."""
    with tempfile.TemporaryDirectory(prefix="dkd-trial-") as workdir:
        workdir_path = Path(workdir)
        run_trial(
            plan,
            data,
            config,
            reporter=report_to_tune,
            checkpoint_dir=workdir_path,
            resume_from=restore_from_tune(workdir_path),
        )


def restore_from_tune(workdir: Path) -> Path | None:
    """Copy the trial's last Ray checkpoint (if any) into `workdir`; returns the training checkpoint."""
    return restore_checkpoint_files(tune.get_checkpoint(), workdir)


def report_to_tune(report: EpochReport) -> None:
    """Forward an epoch to Ray: metrics, the status word, and the checkpoint files (hard-linked, not copied)."""
    metrics = {**report.metrics, "status": report.status}
    if report.checkpoint is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="dkd-report-") as staging:
        for source in (report.checkpoint, report.checkpoint.parent / BEST_CHECKPOINT):
            if source.exists():
                link_or_copy(source, Path(staging) / source.name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(staging))
