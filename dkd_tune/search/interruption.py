"""Ctrl-C (SIGINT) and SIGTERM during a search: stop at a resumable point, never report it as finished.

While a search runs, `interruption_guard()` owns both signals. The first one is remembered; during
a Ray Tune experiment it is handed to Tune's own graceful stop (Tune saves the experiment state
with the running trials still unfinished), and the search raises `SearchInterrupted` as soon as
Tune returns. In any other phase (teacher preparation, cache building, probes, writing results)
`SearchInterrupted` is raised at once: every file the search writes is written atomically, so
what is on disk is always a state `dkd-tune resume` continues from. A second signal stops at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Ray Tune installs its own SIGINT handler in every `Tuner.fit` unless told not to; ours must see
# the signal first. Tune's SIGUSR1 handler (always installed) is its graceful stop, which we call.
TUNE_SIGINT_VARIABLE = "TUNE_DISABLE_SIGINT_HANDLER"


class SearchInterrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    """A search (or a validation) stopped by a signal; `resume_command` continues it."""

    def __init__(self, signum: int, resume_command: str = ""):
        super().__init__(signum, resume_command)
        self.signum = signum
        self.resume_command = resume_command

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _Guard:
    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.signum: int | None = None
        self.in_tune = False
        self.forwarded_to_tune = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.log(f"dkd-tune: second {signal.Signals(signum).name}: stopping now")
            raise SearchInterrupted(self.signum)
        self.signum = signum
        if not self.in_tune:
            raise SearchInterrupted(signum)
        self.log(
            f"dkd-tune: {signal.Signals(signum).name} received: stopping the running trials at their last "
            "checkpoint (press Ctrl-C again to stop at once)"
        )

    def forward_to_tune(self) -> None:
        """Called from inside Tune's loop, where Tune's graceful-stop handler is installed."""
        if self.signum is None or self.forwarded_to_tune:
            return
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):
            self.forwarded_to_tune = True
            handler(signal.SIGUSR1, None)


_active: _Guard | None = None


@contextmanager
def interruption_guard(log: Callable[[str], None] = print) -> Iterator[_Guard | None]:
    """Own SIGINT and SIGTERM for the duration of the block (re-entrant; a no-op off the main thread)."""
    global _active
    if _active is not None or threading.current_thread() is not threading.main_thread():
        yield _active
        return
    guard = _Guard(log)
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    previous_tune_setting = os.environ.get(TUNE_SIGINT_VARIABLE)
    os.environ[TUNE_SIGINT_VARIABLE] = "1"
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, guard.handle)
    _active = guard
    try:
        yield guard
    except BaseException as error:
        # Raised from a handler that ran inside a library's C code (Ray's `get` calls back into
        # Python), the interruption may surface as another error: once a signal was received, any
        # failure is that interruption.
        if guard.signum is not None and not isinstance(error, SearchInterrupted):
            raise SearchInterrupted(guard.signum) from error
        raise
    finally:
        _active = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if previous_tune_setting is None:
            os.environ.pop(TUNE_SIGINT_VARIABLE, None)
        else:
            os.environ[TUNE_SIGINT_VARIABLE] = previous_tune_setting


@contextmanager
def tune_experiment() -> Iterator[None]:
    """Around `Tuner.fit`: a signal lets Tune stop gracefully, then the search stops here."""
    guard = _active
    if guard is not None:
        guard.in_tune, guard.forwarded_to_tune = True, False
    try:
        yield
    finally:
        if guard is not None:
            guard.in_tune = False
    raise_if_interrupted()


def as_interruption(error: BaseException, guard: _Guard | None = None) -> SearchInterrupted | None:
    """The interruption `error` is, or None when it is a failure of its own.

    A plain KeyboardInterrupt (Ctrl-C before the guard was installed) is a SIGINT; once `guard`
    received a signal, any error is that signal (raised from a handler inside a library's C code,
    it may surface as another exception, which the guard itself converts only when it exits).
    """
    if isinstance(error, SearchInterrupted):
        return error
    if guard is not None and guard.signum is not None:
        return SearchInterrupted(guard.signum)
    if isinstance(error, KeyboardInterrupt):
        return SearchInterrupted(signal.SIGINT)
    return None


def raise_if_interrupted() -> None:
    if _active is not None and _active.signum is not None:
        raise SearchInterrupted(_active.signum)


def forward_pending_signal_to_tune() -> None:
    """For a Tune callback: hand a signal received during the experiment to Tune's graceful stop."""
    if _active is not None:
        _active.forward_to_tune()
