"""Errors that mean "the user asked for something invalid".

The CLI turns an :class:`EqbenchError` into one line on stderr and exit code 2, so every such
error must name what is wrong and what would be valid. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["EqbenchError", "UnknownNameError", "ConfigError", "DataError", "OutputError", "CellTimeout",
           "close_matches_hint"]


class EqbenchError(Exception):
    """Invalid input from the user; the message is shown as a single line."""


class ConfigError(EqbenchError, ValueError):
    """A malformed or out-of-range setting (``--set``, profile, sample count)."""


class DataError(EqbenchError):
    """Missing, corrupt or mis-shaped data that cannot be repaired automatically."""


class OutputError(EqbenchError):
    """An output location that cannot take what would be written there: a file where a results
    directory belongs, no write permission, a full disk, or (for the commands that read results)
    a results directory that does not exist. Checked before any work where it can be."""


class CellTimeout(Exception):
    """Raised inside a worker when a cell exceeds its time limit (a failed cell, not a crash).

    Here, at the bottom, so that code a cell runs (a model's builder) can let it pass unchanged
    instead of reporting it as its own failure."""


def close_matches_hint(name: str, valid: Iterable[str]) -> str:
    """``"did you mean 'x'? valid: a, b, c"`` for an unknown ``name``."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}valid: {', '.join(valid) if valid else '(none registered)'}"


class UnknownNameError(EqbenchError, KeyError):
    """A name that is not in a registry; the message lists close matches and all valid names."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name = kind, name
        super().__init__(f"unknown {kind} {name!r}; {close_matches_hint(name, valid)}")

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0])
