"""The project's own expected failures that are neither a bad value (ValueError) nor the OS's (OSError).

The `d4ir` command prints an expected failure as one line (pipelines/errors.py) and keeps the traceback of any
other exception. A KeyError or RuntimeError raised by torch, numpy or a bug is not expected; the few that the
project raises on purpose (an unknown name, a shard that keeps failing) use these classes, which stay KeyError
and RuntimeError for the code that catches those.
"""

from __future__ import annotations


class ExpectedError(Exception):
    """Base of the failures a user causes or mends (a name, a folder, a retry), shown as one line."""


class UnknownNameError(ExpectedError, KeyError):
    """A name that is not one of the known ones (an architecture, a preset, a stage)."""

    def __str__(self) -> str:  # KeyError's str() quotes its message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class StageFailedError(ExpectedError, RuntimeError):
    """A stage that could not finish for a reason outside the code (a shard that kept failing, an input that
    became unreadable during training, a folder another process holds)."""
