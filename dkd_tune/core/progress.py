"""A small progress bar for long work (teacher passes, cache building, training runs), on stderr.

On a terminal it redraws one line; in a log (Ray workers, CI) it prints a line every 10% instead,
so captured output stays short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# Where long work reports what it does: `print` by default, a search's logger, a list in tests.
Log = Callable[[str], None]


class Progress:
    """`with Progress("building cache", total=n) as bar: bar.update(k)`."""

    def __init__(
        self,
        description: str,
        total: int,
        *,
        unit: str = "it",
        stream: TextIO | None = None,
        enabled: bool = True,
    ):
        self.description = description
        self.total = max(int(total), 1)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.started = time.perf_counter()
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1
        self._last_draw = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, amount: int = 1) -> None:
        self.done = min(self.done + amount, self.total)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.interactive:
            if now - self._last_draw >= 0.2 or self.done == self.total:
                self._last_draw = now
                self.stream.write("\r" + self._line(now))
                self.stream.flush()
        else:
            decile = 10 * self.done // self.total
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\r" + self._line(time.perf_counter()) + "\n")
            self.stream.flush()
        self.enabled = False

    def _line(self, now: float) -> str:
        fraction = self.done / self.total
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(24 * fraction)
        return (
            f"{self.description}: [{bar:<24}] {self.done}/{self.total} {self.unit} "
            f"({100 * fraction:5.1f}%, {rate:.1f} {self.unit}/s, {elapsed:.0f}s elapsed, ~{remaining:.0f}s left)"
        )
