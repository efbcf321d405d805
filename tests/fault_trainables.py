"""Trainables for the reliability tests: dkd-tune's own training with injected faults, and a fast stand-in.

Searches run them through `SearchOptions(trainable=...)` (see `search_with_trainable.py`). Ray's
workers import this module by name, so the tests put `tests/` on the workers' PYTHONPATH. What a
trial does is decided by its config, and by environment variables the test sets for the search.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune

from dkd_tune.data.shared import SharedDataset
from dkd_tune.engine.loop import EpochReport
from dkd_tune.trial import TrialPlan, run_trial
from trainables.distill import report_to_tune, restore_from_tune

FAULT_EPOCH = 2  # faults strike after this epoch's report and checkpoint, before the next epoch's report
# By the trial's seed (trials with a huge lr get none: they diverge on their own).
FAULT_BY_SEED = {1: "raise", 2: "oom", 3: "fail_once"}
MARKERS_VARIABLE = "DKD_TEST_MARKERS"  # folder for the fail-once markers and the running-trial files
EPOCH_SECONDS_VARIABLE = "DKD_TEST_EPOCH_SECONDS"  # a pause after each epoch, to leave time to kill a worker
CONCURRENCY_VARIABLE = "DKD_TEST_CONCURRENCY"  # quick_trial: trials to wait for before the first report
TRIALS_VARIABLE = "DKD_TEST_TRIALS"  # quick_trial: trials in the search
GATE_TIMEOUT_S = 300  # a safety net only: the gate opens as soon as the trials it waits for run


def faulty_trial(config: dict[str, Any], plan: TrialPlan, data: SharedDataset) -> None:
    """`trainables.distill.distill_trial`, with the fault of the trial's seed injected after FAULT_EPOCH."""
    fault = FAULT_BY_SEED.get(int(config.get("seed", 0))) if float(config.get("lr", 0.0)) < 1.0 else None
    pause = float(os.environ.get(EPOCH_SECONDS_VARIABLE, "0"))

    def report(epoch_report: EpochReport) -> None:
        if epoch_report.epoch > FAULT_EPOCH and fault is not None:
            inject(fault)  # a retry resumes from FAULT_EPOCH's checkpoint and meets the fault again
        report_to_tune(epoch_report)
        if pause:
            time.sleep(pause)

    with tempfile.TemporaryDirectory(prefix="dkd-fault-trial-") as workdir:
        run_trial(
            plan,
            data,
            config,
            reporter=report,
            checkpoint_dir=Path(workdir),
            resume_from=restore_from_tune(Path(workdir)),
        )


def inject(fault: str) -> None:
    if fault == "raise":
        raise RuntimeError("injected fault: the training code raised")
    if fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected fault)")
    if fault == "fail_once":
        marker = Path(os.environ[MARKERS_VARIABLE]) / f"failed-once-{tune.get_context().get_trial_id()}"
        if not marker.exists():
            marker.touch()
            raise RuntimeError("injected fault: a transient failure, once")
        return
    raise ValueError(f"unknown fault {fault!r}")


def quick_trial(config: dict[str, Any], plan: TrialPlan, data: SharedDataset) -> None:
    """A stand-in trial with no training: `plan.max_epochs` reports of made-up metrics, a moment apart.

    It marks itself running in the markers folder and, before its first report, waits until
    DKD_TEST_CONCURRENCY trials are running (or all that are left of DKD_TEST_TRIALS), so the
    search really has that many at once however slowly the machine starts their processes.
    """
    markers = Path(os.environ[MARKERS_VARIABLE])
    trial_id = tune.get_context().get_trial_id()
    running = markers / f"running-{trial_id}"
    running.touch()
    started = time.time()
    target = int(os.environ.get(CONCURRENCY_VARIABLE, "1"))
    total = int(os.environ.get(TRIALS_VARIABLE, str(target)))
    while time.time() - started < GATE_TIMEOUT_S:
        left = total - len(list(markers.glob("finished-*")))
        if len(list(markers.glob("running-*"))) >= min(target, left):
            break
        time.sleep(0.05)
    lr = float(config.get("lr", 0.05))
    try:
        for epoch in range(1, plan.max_epochs + 1):
            time.sleep(0.2)
            accuracy = 50.0 + 10.0 * epoch * lr
            tune.report(
                {
                    "epoch": epoch,
                    "train_loss": 2.0 / epoch,
                    "test_acc": accuracy,
                    "best_test_acc": accuracy,
                    "started_at": started,
                    "reported_at": time.time(),
                    "status": "completed" if epoch == plan.max_epochs else "running",
                }
            )
    finally:
        running.unlink(missing_ok=True)  # first: a trial in between counts as neither, never as both
        (markers / f"finished-{trial_id}").touch()
