"""What a search prints while it runs: one line per finished trial (counts, the best so far, time
left at most) instead of Ray Tune's status tables."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback

from analysis.tables import format_cell


class TrialProgress(Callback):
    """A Ray Tune callback: after each trial of a part, one line with the counts, the best trial by
    the search's metric, and an upper bound on the time left (every remaining trial run in full)."""

    def __init__(
        self,
        part: str,
        *,
        metric: str,
        mode: str,
        max_epochs: int,
        expected_trials: int,
        searched: Sequence[str],
    ):
        self.part = part
        self.metric = metric
        self.sign = 1.0 if mode == "max" else -1.0
        self.max_epochs = max_epochs
        self.expected = expected_trials
        self.searched = list(searched)
        self.started = time.monotonic()
        self.epochs_done = 0
        self.ended = 0  # trials of this process that ended
        self.best: tuple[float, str] | None = None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.epochs_done += 1

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, failed=True)

    def _ended(self, trials: list, trial: Any, *, failed: bool) -> None:
        self.ended += 1
        result = trial.last_result or {}
        epoch = int(result.get("epoch", 0) or 0)
        value = result.get(self.metric)
        params = self._params(trial)
        if failed:
            how = f"failed at epoch {epoch}"
        elif result.get("status") == "diverged":
            how = f"diverged at epoch {epoch} (its loss was not finite; recorded, the search goes on)"
        elif epoch >= self.max_epochs:
            how = f"finished {epoch} epochs, {self.metric} {value:.2f}" if _finite(value) else "finished"
        else:
            how = (
                f"stopped by ASHA at epoch {epoch}, {self.metric} {value:.2f}"
                if _finite(value)
                else "stopped"
            )
        full = not failed and epoch >= self.max_epochs and _finite(value)
        if full and (self.best is None or self.sign * value > self.sign * self.best[0]):
            self.best = (float(value), params)
        running = sum(1 for other in trials if other.status == "RUNNING" and other is not trial)
        total = max(self.expected, len(trials))
        best = f"best {self.metric} {self.best[0]:.2f} ({self.best[1]})" if self.best else "no full trial yet"
        # Printed, not handed to a logger object: Tune pickles its callbacks with the experiment state.
        print(
            f"dkd-tune: {self.part}: trial {self.ended}/{total} ({params}) {how}; {running} running; "
            f"{best}; {_duration(time.monotonic() - self.started)} elapsed{self._left(total)}",
            flush=True,
        )

    def _params(self, trial: Any) -> str:
        config = trial.config or {}
        # Formatted as the summary table formats them, so one trial's beta reads the same in both.
        shown = [f"{name} {format_cell(config.get(name))}" for name in self.searched if name in config]
        return ", ".join(shown) or "fixed settings"

    def _left(self, total: int) -> str:
        remaining = max(total - self.ended, 0) * self.max_epochs
        if self.epochs_done == 0 or remaining == 0:
            return ""
        per_epoch = (time.monotonic() - self.started) / self.epochs_done
        return f", at most ~{_duration(per_epoch * remaining)} left"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
