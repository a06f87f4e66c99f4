"""The `d4ir` command run in-process, and the one-line-error check the reliability tests share."""

from __future__ import annotations

from click.testing import CliRunner, Result
from d4ir.pipelines.cli import main


def cli(*args) -> Result:
    """`d4ir ARGS...` through click's runner (paths and numbers may be given as they are)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: Result, *needles: str) -> None:
    """Exit status 2 and exactly one output line, `d4ir: error: ...`, holding every needle."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("d4ir: error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
