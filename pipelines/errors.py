"""Expected failures as one line: the `d4ir` command group's error handler, and no empty folders left behind.

A user error (a missing or truncated file, a full disk, a bad option value, a state written by other settings,
a shard that keeps failing) ends the command with `d4ir: error: <message>` on stderr and exit status 2. The
expected failures are OSError (files, disks), ValueError (the project's bad-value errors, StateError and
UnpairedError among them), an unusable image, an unreadable safetensors file and the project's own
`shards.errors.ExpectedError` (an unknown name, a failed shard). Any other exception, a bare KeyError or
RuntimeError from torch or a bug included, keeps its traceback. `--debug` or D4IR_DEBUG=1 shows every one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import click
from d4ir.shards.errors import ExpectedError, brief
from d4ir.shards.images import ImageSkipped

EXIT_ERROR = 2
ONE_LINE_LIMIT = 1000  # characters of an error line; --debug shows the whole message


def _expected() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, ExpectedError, ImageSkipped, SafetensorError)


def one_line(err: BaseException) -> str:
    """The error as one readable line: whitespace folded, a long library message summarized (shards.errors.brief)."""
    return brief(str(err), limit=ONE_LINE_LIMIT) or type(err).__name__


def debugging(ctx: click.Context | None = None) -> bool:
    flag = bool(ctx and ctx.find_root().params.get("debug"))
    return flag or os.environ.get("D4IR_DEBUG", "") not in ("", "0")


class OneLineErrors(click.Group):
    """A click group whose commands end expected failures with one line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except _expected() as err:
            if debugging(ctx):
                raise
            click.echo(f"d4ir: error: {one_line(err)}", err=True)
            ctx.exit(EXIT_ERROR)


@contextlib.contextmanager
def no_empty_folders(*paths: Path | None) -> Iterator[None]:
    """Remove the folders among `paths` (and their parents) that a failing block created and left empty."""
    created = []
    for path in filter(None, paths):
        for folder in (Path(path), *Path(path).parents):
            if folder.exists():
                break
            created.append(folder)
    try:
        yield
    except BaseException:
        for folder in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty folders go; anything written stays
        raise
