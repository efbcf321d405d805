"""Where a training epoch's time goes (data, teacher, student), measured without a GPU sync per step."""

from __future__ import annotations

import time
from typing import Any

import torch


class PhaseClock:
    """Per-epoch time spent in each phase of the batch loop.

    `start()` before the loop, then `lap(phase)` at the end of each phase: the time since the
    previous lap goes to `phase`. On CUDA the laps are events read once, in `seconds()`, at the
    end of the epoch; on the CPU, wall-clock times.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = {"data": 0.0, "teacher": 0.0, "student": 0.0}
        self.pending: list[tuple[str, Any, Any]] = []
        self.last: Any = None

    def start(self) -> None:
        self.last = self._now()

    def lap(self, phase: str) -> None:
        now = self._now()
        if self.cuda:
            self.pending.append((phase, self.last, now))
        else:
            self.totals[phase] += now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        if self.pending:
            torch.cuda.synchronize()
            for phase, start, end in self.pending:
                self.totals[phase] += start.elapsed_time(end) / 1000.0
            self.pending.clear()
        return dict(self.totals)

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
