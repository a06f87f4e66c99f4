"""The command line: every command explains itself, `data check` counts and exits as documented, and
`report` builds its tables from eval.json files only."""

import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from d4ir.pipelines.cli import main
from d4ir.pipelines.report import build_report, collect_evals, results_table
from PIL import Image


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("args", [(), *_commands(main)])
def test_every_command_has_help(args):
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # a docstring, not just the option list
    assert len(result.output.split("Options:")[0].strip().splitlines()) >= 3


def test_the_main_help_names_every_command():
    """`d4ir --help`'s text (not only click's truncated command list) names every command with what it does."""
    text = CliRunner().invoke(main, ["--help"]).output.split("Options:")[0]
    missing = [name for name in main.commands if not re.search(rf"\b{name}\b", text)]
    assert not missing, f"d4ir --help does not describe: {missing}"


def _command(args):
    cmd = main
    for name in args:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("args", [a for a in _commands(main) if not hasattr(_command(a), "commands")])
def test_every_option_explains_itself(args):
    """Options derived from the config docstrings (pipelines/options.py) keep their text, including fields
    documented together ("generator_lr, betas: ...")."""
    bare = [p.opts[0] for p in _command(args).params
            if isinstance(p, click.Option) and not re.sub(r"\[paper: [^]]*\]", "", p.help or "").strip()]
    assert not bare, f"d4ir {' '.join(args)}: options without help: {bare}"


def test_args_doc_shares_a_text_between_fields_named_together():
    from d4ir.pipelines.options import args_doc

    class C:
        """Doc.

        Args:
            a, b_c: shared text
                continued.
            d: own text.
        """

    assert args_doc(C) == {"a": "shared text continued.", "b_c": "shared text continued.", "d": "own text."}


def test_data_check_counts_and_exit_codes(tmp_path: Path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path), "-v"])
    assert result.exit_code == 0
    assert "usable: 1" in result.output and "zero bytes: 1" in result.output and "empty.jpg" in result.output
    (tmp_path / "ok.png").unlink()
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path)])
    assert result.exit_code == 1
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "not found" in result.output


def _eval(folder: Path, kind: str, method: str, psnr: float, params: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    mean = {"psnr": psnr, "ssim": 0.5, "psnr_y": psnr + 1, "ssim_y": 0.6, "ref_psnr": psnr + 2, "ref_ssim": 0.7,
            "ref_psnr_y": 0.0, "ref_ssim_y": 0.0}
    (folder / "eval.json").write_text(json.dumps({"type": kind, "method": method, "mean": mean, "params": params,
                                                  "count": 3, "images": []}))


def test_report_tables_come_from_eval_files(tmp_path: Path):
    _eval(tmp_path / "students" / "d4ir", "KD", "D4IR (ours)", 25.5, 4_460_000)
    _eval(tmp_path / "teacher", "Teacher", "AirNet", 30.25, 8_930_000)
    _eval(tmp_path / "input", "Input", "Degraded input", 20.0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "eval.json").write_text(json.dumps({"mean": {}}))  # no row label: ignored
    evals = collect_evals(tmp_path)
    assert [e["type"] for e in evals] == ["Input", "Teacher", "KD"]
    table = results_table(evals)
    assert "| Teacher | AirNet | 8.93 | 30.25 | 0.500 | - | - |" in table
    assert "| KD | D4IR (ours) | 4.46 | 25.50 | 0.500 | 27.50 | 0.700 |" in table
    report = build_report(tmp_path).read_text()
    assert "| Input | Degraded input | - | 20.00 |" in report and "students/d4ir/eval.json" in report
    assert (tmp_path / "curves.png").exists()
    assert "Time per step" not in report and "onnxruntime" not in report  # nothing measured, nothing claimed
