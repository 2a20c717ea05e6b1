"""Errors that mean "the input or the settings are wrong", not "lmforge has a bug".

They subclass ValueError (bad settings, bad arguments) or OSError (a file that cannot
be read or written), which the `lmforge` command prints as one line instead of a
traceback.
"""

from __future__ import annotations


class DataInputError(ValueError):
    """An input path or format that cannot be used (missing, unsupported, empty)."""


class RunStateError(ValueError):
    """An output folder that holds a different run, so resuming into it would mix two runs."""


class UnreadablePayload(ValueError):
    """A single record's bytes cannot become text; `reason` is the short name the report counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ExecutorError(ValueError):
    """An executor that cannot run: Ray not installed, no cluster at the address, bad worker count."""
