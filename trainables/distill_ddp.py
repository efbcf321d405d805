"""Ray Tune trainable for trials of several processes: each trial runs a Ray Train TorchTrainer (DDP).

The Tune trial only coordinates; its workers ask Ray for their own CPUs/GPUs, set up the process
group (gloo on CPUs, NCCL on GPUs) and run the same `run_trial` as a one-process trial, with the
data sharded by rank. Metrics reach Tune through Ray Train's TuneReportCallback, and a retried
trial's workers resume from the last checkpoint Ray Train kept under the trial's folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from dkd_tune.data.shared import SharedDataset
from dkd_tune.engine.loop import EpochReport
from dkd_tune.trial import TrialPlan, run_trial
from trainables.checkpoint_files import link_or_copy, restore_checkpoint_files


def make_ddp_trial(
    workers: int, *, use_gpu: bool, cpus_per_worker: float, storage_dir: str, max_failures: int = 0
) -> Callable[..., None]:
    """A function trainable whose trials train on `workers` DDP processes; checkpoints under `storage_dir`."""

    def distill_ddp_trial(config: dict[str, Any], plan: TrialPlan, data: SharedDataset) -> None:
        # Ray Train keeps this trial's checkpoints in the trial's folder of the search's storage,
        # where a retried or resumed trial finds them again.
        trial_dir = Path(storage_dir) / tune.get_context().get_trial_name()
        trainer = ray.train.torch.TorchTrainer(
            ddp_worker_loop,
            train_loop_config={"hyperparameters": dict(config), "plan": plan, "data_ref": ray.put(data)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name="ddp",
                storage_path=str(trial_dir),
                callbacks=[TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            ),
        )
        trainer.fit()

    return distill_ddp_trial


def ddp_worker_loop(loop_config: dict[str, Any]) -> None:
    """One DDP rank: the process group is already up (Ray Train), so `fit` wraps the student in DDP."""
    context = ray.train.get_context()
    data = ray.get(loop_config["data_ref"])
    with tempfile.TemporaryDirectory(prefix="dkd-ddp-") as workdir:
        workdir_path = Path(workdir)
        resume_from = restore_checkpoint_files(ray.train.get_checkpoint(), workdir_path)
        run_trial(
            loop_config["plan"],
            data,
            loop_config["hyperparameters"],
            reporter=report_to_train,
            checkpoint_dir=workdir_path,
            resume_from=resume_from,
            device=ray.train.torch.get_device(),
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
        )


def report_to_train(report: EpochReport) -> None:
    """Every rank reports each epoch (Ray Train waits for all); rank 0 attaches the checkpoint."""
    metrics = {**report.metrics, "status": report.status}
    if report.checkpoint is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="dkd-report-") as staging:
        for source in (report.checkpoint, report.checkpoint.parent / "best.pt"):
            if source.exists():
                link_or_copy(source, Path(staging) / source.name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))
