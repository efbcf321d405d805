"""A search killed between Tune deleting a trial's checkpoint and saving the state that names its successor resumes."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
from pathlib import Path

import pytest

from dkd_tune.search.checkpoint_repair import restore_missing_checkpoints


@pytest.mark.slow
def test_a_trial_whose_named_checkpoint_is_gone_resumes_from_its_newest(tmp_path):
    # In a process of its own: ray.init patches builtins.print and keeps it patched after shutdown.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(kill_between_checkpoint_and_state_then_resume, tmp_path).result()  # re-raises its asserts


def kill_between_checkpoint_and_state_then_resume(tmp_path: Path) -> None:
    import ray
    from ray import tune

    crash_marker = tmp_path / "crash-once"
    crash_marker.touch()

    def counting(config):
        start = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                start = json.loads((Path(folder) / "state.json").read_text())["epoch"]
        for epoch in range(start + 1, 6):
            if epoch == 4 and Path(config["marker"]).exists():
                Path(config["marker"]).unlink()
                raise RuntimeError("killed")  # stands in for the kill: the trial ends with 3 checkpoints
            folder = Path(tune.get_context().get_trial_dir()) / f"save-{epoch}"
            folder.mkdir()
            (folder / "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report(
                {"epoch": epoch, "resumed_from": start}, checkpoint=tune.Checkpoint.from_directory(folder)
            )

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        run_config = tune.RunConfig(
            name="part", storage_path=str(tmp_path), checkpoint_config=tune.CheckpointConfig(num_to_keep=1)
        )
        tune.Tuner(counting, param_space={"marker": str(crash_marker)}, run_config=run_config).fit()
        part_dir = tmp_path / "part"
        (trial_dir,) = [
            path for path in part_dir.iterdir() if path.is_dir() and path.name.startswith("counting")
        ]
        assert [path.name for path in trial_dir.glob("checkpoint_*")] == ["checkpoint_000002"]
        # What a kill between the two writes leaves: the state names checkpoint 2, only 3 (epoch 3 here) exists.
        (trial_dir / "checkpoint_000002").rename(trial_dir / "checkpoint_000003")

        (trial_id,) = restore_missing_checkpoints(part_dir)
        assert trial_id in trial_dir.name
        assert [path.name for path in trial_dir.glob("checkpoint_*")] == ["checkpoint_000002"]
        assert restore_missing_checkpoints(part_dir) == []  # nothing left to mend

        restored = tune.Tuner.restore(str(part_dir), counting, resume_unfinished=True, resume_errored=True)
        (result,) = restored.fit()
        assert result.error is None
        assert result.metrics["epoch"] == 5 and result.metrics["resumed_from"] == 3
    finally:
        ray.shutdown()
