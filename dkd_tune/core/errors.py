"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import difflib


class UserInputError(Exception):
    """Input the user can fix: a file, key or value that is not what was expected.

    The message is a single line that names the offending file/key/value and what was expected.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def closest_match(key: str, allowed: list[str] | tuple[str, ...]) -> str | None:
    """The allowed name closest to a misspelt `key`, if any is close."""
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    return close[0] if close else None


def did_you_mean(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    """` 'key'; did you mean 'x'?` (or the allowed names when none is close), to end an error line."""
    close = closest_match(key, allowed)
    if close:
        return f" {key!r}; did you mean {close!r}?"
    return f" {key!r}; expected one of {', '.join(allowed)}" if allowed else f" {key!r}"
