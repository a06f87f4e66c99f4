"""The project's own expected failures that are neither a bad value (ValueError) nor the OS's (OSError).

The `d4ir` command prints an expected failure as one line (pipelines/errors.py) and keeps the traceback of any
other exception. A KeyError or RuntimeError raised by torch, numpy or a bug is not expected; the few that the
project raises on purpose (an unknown name, a shard that keeps failing) use these classes, which stay KeyError
and RuntimeError for the code that catches those.
"""

from __future__ import annotations

import re


class ExpectedError(Exception):
    """Base of the failures a user causes or mends (a name, a folder, a retry), shown as one line."""


class UnknownNameError(ExpectedError, KeyError):
    """A name that is not one of the known ones (an architecture, a preset, a stage)."""

    def __str__(self) -> str:  # KeyError's str() quotes its message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class StageFailedError(ExpectedError, RuntimeError):
    """A stage that could not finish for a reason outside the code (a shard that kept failing, an input that
    became unreadable during training, a folder another process holds)."""


class MissingExtraError(ExpectedError, ImportError):
    """A command needs a package of an optional extra that is not installed; the message names the extra and
    the pip line that installs it."""


def missing_extra(extra: str, packages: tuple[str, ...], what: str) -> MissingExtraError | None:
    """A MissingExtraError naming `extra` when one of `packages` does not import (None when all do)."""
    import importlib

    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError as err:
            return MissingExtraError(f"{what} needs the '{extra}' extra ({', '.join(packages)}; {name} does not "
                                     f"import: {err}): pip install 'd4ir[{extra}]'")
    return None


# torch's load_state_dict lists every mismatching tensor, one line each: hundreds for a whole UNet
_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                       r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")
BRIEF_LIMIT = 600


def brief(text: str, shown: int = 3, limit: int = BRIEF_LIMIT) -> str:
    """A library's long message as one readable line: torch's size mismatches counted, the first `shown` named
    (checkpoint shape vs model shape); any text still longer than `limit` characters cut, the rest counted."""
    found = _MISMATCH.findall(text)
    if found:
        head = " ".join(text[: text.index("size mismatch for")].split())
        first = "; ".join(f"{name} [{a}] in the checkpoint vs [{b}] in the model" for name, a, b in found[:shown])
        more = f"; and {len(found) - shown} more" if len(found) > shown else ""
        text = f"{head} {len(found)} size mismatches: {first}{more}"
    text = " ".join(text.split())
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters; --debug shows the whole error)"
    return text
