"""Every command line the README shows names options that exist: `make` lines through the commands the Makefile
would run for them (make -n, prerequisites included), `d4ir` and torchrun lines against the click commands, and
bench scripts against their own --help. What the lines do is tested elsewhere (tests/test_distill_ddp.py runs the
torchrun line); this catches a README (or a Makefile) that drifts from the code."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from d4ir.pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
D4IR = ".venv/bin/d4ir"


def readme_lines() -> list[str]:
    """The README's shell lines: bash blocks, continuation lines joined, comments and blanks dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _command(words: list[str]) -> tuple[click.Command, list[str]]:
    """The click command `words` start with (after the program), and the words after its name."""
    cmd, rest = main, list(words)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in cmd.commands, f"d4ir has no command {name!r}"
        cmd = cmd.commands[name]
    return cmd, rest


def check_d4ir(words: list[str], line: str) -> None:
    """Every --option in a d4ir command line exists on its command."""
    rest = [w for w in words if w != "--debug"]
    cmd, rest = _command(rest)
    known = {opt for p in cmd.params for opt in (*p.opts, *getattr(p, "secondary_opts", []))} | {"--help", "-h"}
    unknown = [w.split("=")[0] for w in rest if w.startswith("--") and w.split("=")[0] not in known]
    assert not unknown, f"{line}\n  d4ir {cmd.name}: no option(s) {unknown}"


def make_commands(words: list[str], seen: int = 0) -> list[list[str]]:
    """The d4ir command lines `make WORDS` would run (make -n), with the prerequisite stages it may run too."""
    assert seen < 4, f"make recursion too deep: {words}"
    done = subprocess.run(["make", "-n", "--no-print-directory", *words], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}, timeout=60)
    assert done.returncode == 0, done.stderr
    out = []
    for line in done.stdout.splitlines():
        sub = re.search(r"\|\| make --no-print-directory (\w+) ARGS=$", line)
        if sub:  # a prerequisite stage: the same variables, its own defaults
            vars_ = [w for w in words if "=" in w and not w.startswith("ARGS=")]
            out += make_commands([sub.group(1), *vars_, "ARGS="], seen + 1)
        elif line.startswith(D4IR):
            out.append(shlex.split(line)[1:])
    return out


LINES = readme_lines()


def test_the_readme_shows_the_commands_this_test_reads():
    assert any(line.startswith("make prompts") for line in LINES)
    assert any(line.startswith("make synth") for line in LINES)
    assert any(line.startswith(".venv/bin/torchrun") for line in LINES)
    assert any(line.startswith(f"{D4IR} experiments") for line in LINES)


@pytest.mark.skipif(not (ROOT / D4IR).exists(), reason="needs the project's .venv (make install)")
@pytest.mark.parametrize("line", [ln for ln in LINES if ln.startswith("make ") and ln != "make test"])
def test_make_lines_run_commands_that_exist(line):
    words = shlex.split(line)[1:]
    commands = make_commands(words)
    assert commands, f"{line}: make runs no d4ir command"
    for cmd in commands:
        check_d4ir(cmd, line)
    goal_args = next((shlex.split(w[5:]) for w in words if w.startswith("ARGS=")), [])
    if goal_args:  # ARGS reach the stage named, and only it
        assert sum(c[-len(goal_args):] == goal_args for c in commands) == 1, (line, commands)


@pytest.mark.parametrize("line", [ln for ln in LINES if ln.startswith((D4IR, ".venv/bin/torchrun"))])
def test_d4ir_lines_name_existing_options(line):
    words = shlex.split(line)
    if words[0].endswith("torchrun"):
        words = words[words.index("d4ir.pipelines.cli") + 1:]
    else:
        words = words[1:]
    check_d4ir(words, line)


@pytest.mark.parametrize("line", [ln for ln in LINES if ln.startswith("python bench/")])
def test_bench_lines_name_existing_options(line):
    words = shlex.split(line)
    done = subprocess.run([sys.executable, words[1], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    unknown = [w for w in words[2:] if w.startswith("--") and w.split("=")[0] not in done.stdout]
    assert not unknown, f"{line}: {words[1]} has no option(s) {unknown}"


def test_the_readme_states_the_demo_scope_in_the_reports_words():
    """The demo report's first paragraph says what the demo can and cannot show; the README says it in the same
    words (whitespace aside), so the two cannot drift apart."""
    from d4ir.pipelines.experiments.report_rows import DEMO_SCOPE

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert " ".join(DEMO_SCOPE.split()) in text
