"""Ray Tune callback that hands a SIGINT/SIGTERM received during an experiment to Tune's graceful stop."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from dkd_tune.search.interruption import forward_pending_signal_to_tune


class StopOnSignal(Callback):
    """Checked at every step of Tune's loop, where Tune's own stop handler is installed."""

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        forward_pending_signal_to_tune()
