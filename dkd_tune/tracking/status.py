"""How a trial ended, in one word, from what Ray recorded: completed, stopped, diverged, errored or oom."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STATUSES = ("completed", "stopped", "diverged", "errored", "oom", "running", "pending")


def trial_status(
    last_result: Mapping[str, Any] | None,
    max_epochs: int,
    *,
    errored: bool = False,
    error_text: str = "",
    finished: bool = True,
) -> str:
    """completed (ran max_epochs), stopped (by ASHA before that), diverged (NaN/inf loss),
    errored or oom (the trial raised), running/pending (an interrupted search, not finished yet)."""
    if errored:
        return (
            "oom" if "OutOfMemoryError" in error_text or "out of memory" in error_text.lower() else "errored"
        )
    last_result = last_result or {}
    if last_result.get("status") == "diverged" or last_result.get("diverged") == 1:
        return "diverged"
    epoch = int(last_result.get("epoch", 0) or 0)
    if epoch >= max_epochs:
        return "completed"
    if not finished:
        return "running" if epoch else "pending"
    return "stopped"
