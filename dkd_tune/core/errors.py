"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import difflib


class UserInputError(Exception):
    """Input the user can fix: a file, key or value that is not what was expected.

    The message is a single line that names the offending file/key/value and what was expected.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def did_you_mean(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    if close:
        return f" {key!r}; did you mean {close[0]!r}?"
    return f" {key!r}; expected one of {', '.join(allowed)}" if allowed else f" {key!r}"
