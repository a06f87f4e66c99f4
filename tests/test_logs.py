"""What a stage prints (shards/progress.py, the CLI's summaries): TQDM_DISABLE and --quiet silence progress,
a log file gets plain lines instead of carriage-return frames, and a summary has no stray '; ;'."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from cli_helpers import cli
from conftest import make_brightened_pairs
from d4ir.distill.teacher import SupervisedConfig, train_supervised

TINY = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=8)
FLAGS = ["--epochs", "2", "--iters-per-epoch", "2", "--batch-size", "2", "--crop", "16", "--device", "cpu",
         "--arch-kwargs", ",".join(f"{k}={v}" for k, v in TINY.items()), "--preset", "demo"]


class _Stream(io.StringIO):
    """A stderr that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_brightened_pairs(tmp_path_factory.mktemp("pairs"), 4, (24, 24))


def _train(pairs: Path, out: Path) -> None:
    config = SupervisedConfig(arch="airnet", arch_kwargs=TINY, epochs=1, iters_per_epoch=3, batch_size=2, crop=16,
                              lr=1e-3, seed=0)
    train_supervised(pairs, out, config, progress=True)


def test_tqdm_disable_is_honoured_on_a_terminal(pairs, tmp_path, monkeypatch):
    monkeypatch.delenv("D4IR_QUIET", raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    err = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    _train(pairs, tmp_path / "a")
    assert err.getvalue() == ""
    monkeypatch.delenv("TQDM_DISABLE")
    err = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    _train(pairs, tmp_path / "b")
    assert "\r" in err.getvalue() and "teacher epoch 1/1" in err.getvalue()  # the bar, on a terminal


def test_a_log_file_gets_plain_lines_not_frames(pairs, tmp_path, monkeypatch):
    for var in ("TQDM_DISABLE", "D4IR_QUIET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("D4IR_PROGRESS_INTERVAL", "0")  # a line per step (default: every 30 s)
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    _train(pairs, tmp_path / "a")
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and "\x1b" not in err.getvalue()
    assert [line.split(" it")[0] for line in lines] == [f"teacher epoch 1/1: {i}/3" for i in (1, 2, 3, 3)]
    assert "loss=" in lines[0] and lines[-1].endswith(" s") and "done in" in lines[-1]
    monkeypatch.setenv("D4IR_PROGRESS_INTERVAL", "3600")
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    _train(pairs, tmp_path / "b")
    assert len(err.getvalue().splitlines()) == 1  # only the closing line within the interval


@pytest.mark.parametrize("where", ["after", "before"])
def test_quiet_keeps_only_the_summary_without_a_stray_separator(pairs, tmp_path, monkeypatch, where):
    for var in ("TQDM_DISABLE", "D4IR_QUIET"):
        monkeypatch.delenv(var, raising=False)
    args = ["teacher", "--pairs", pairs, "--out", tmp_path / "t", *FLAGS]
    loud = cli(*args)
    assert loud.exit_code == 0, loud.output
    assert "teacher epoch 2: loss" in loud.output  # the per-epoch lines, without --quiet
    args[-1:] = ["demo", "--resume", "--epochs", "3"]
    quiet = cli(*(["-q", *args] if where == "before" else [*args, "--quiet"]))
    assert quiet.exit_code == 0, quiet.output
    lines = quiet.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("teacher: ") and "3 epochs" in lines[0], quiet.output
    assert "; ;" not in lines[0] and lines[0].endswith(f"wrote {tmp_path / 't' / 'teacher.safetensors'}")
    again = cli(*args[:-2], "--epochs", "4")  # the next invocation is not quiet any more (process state reset)
    assert again.exit_code == 0 and "teacher epoch 4: loss" in again.output and "; ;" not in again.output
