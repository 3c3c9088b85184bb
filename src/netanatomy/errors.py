"""Errors that the CLI maps to exit codes.

`UsageError` is the user's bad input (exit 2, one line, no traceback); anything else that
escapes is a fault of ours (exit 1).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class NetanatomyError(Exception):
    """Base class of the errors netanatomy raises on purpose."""


class UsageError(NetanatomyError, ValueError):
    """Bad input from the user: a wrong name, a missing file, a mismatched checkpoint."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' tail naming the closest choices, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered in c.lower()][:n]
    return f" (did you mean: {', '.join(close)}?)" if close else ""
