"""A search that runs one trial at a time repeats itself: the same trials, decisions and accuracies.

With several trials at once, what TPE proposes and what ASHA stops depends on the order in which
trials report (the machine's load); with `max_concurrent_trials: 1` that order is fixed, which is
what the demo uses and the README claims.
"""

from __future__ import annotations

import pandas as pd
import pytest

from tests.test_search_e2e import cli, tiny_space

pytestmark = pytest.mark.slow


def run_once(tmp_path, folder: str) -> list[tuple]:
    space = tiny_space(
        tmp_path,
        storage=str(tmp_path / folder),
        tracking_uri=f"sqlite:///{tmp_path / folder / 'mlflow.db'}",
        baselines=[],
        search={"algorithm": "optuna", "seed": 0, "num_samples": 6, "max_concurrent_trials": 1},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    result = cli("run", str(space), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / folder / "e2e" / "results.parquet")
    return sorted(
        (round(row.beta, 9), row.temperature, row.status, row.stop_epoch, row.final_test_acc)
        for row in frame.itertuples()
    )


def test_a_one_at_a_time_search_gives_the_same_trials_twice(tmp_path):
    first, second = run_once(tmp_path, "first"), run_once(tmp_path, "second")
    assert len(first) == 6
    assert "stopped" in {status for _, _, status, _, _ in first}  # ASHA made decisions to repeat
    assert first == second
