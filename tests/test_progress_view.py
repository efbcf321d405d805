"""The search's per-trial line says how each trial ended: finished, stopped by ASHA, diverged or failed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dkd_tune.search.progress_view import TrialProgress


@pytest.mark.parametrize(
    ("result", "failed", "expected"),
    [
        ({"epoch": 8, "val_ap": 40.0, "status": "completed"}, False, "finished 8 epochs, val_ap 40.00"),
        ({"epoch": 4, "val_ap": 5.0, "status": "running"}, False, "stopped by ASHA at epoch 4, val_ap 5.00"),
        (
            {"epoch": 3, "val_ap": 0.0, "status": "diverged"},
            False,
            "diverged at epoch 3 (its loss was not finite",
        ),
        ({"epoch": 2}, True, "failed at epoch 2"),
    ],
)
def test_each_ending_is_named(capsys, result, failed, expected):
    view = TrialProgress(
        "teacher", metric="val_ap", mode="max", max_epochs=8, expected_trials=2, searched=["beta"]
    )
    trial = SimpleNamespace(last_result=result, config={"beta": 0.5}, status="TERMINATED")
    view._ended([trial], trial, failed=failed)
    line = capsys.readouterr().out
    assert f"trial 1/2 (beta 0.5) {expected}" in line
    assert ("best val_ap 40.00" in line) == (expected.startswith("finished"))
