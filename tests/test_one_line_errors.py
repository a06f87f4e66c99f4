"""Errors that stay one line: a command whose optional extra is missing names the extra and its pip line (exit 2,
no ImportError traceback), and a library's long message is summarized (shards.errors.brief)."""

from __future__ import annotations

import sys

import torch
from cli_helpers import cli, one_line_error
from d4ir.distill.registry import build, save_model


def test_export_without_the_export_extra_names_it(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "student", build("restormer", dim=8, num_blocks=(1, 1, 1, 1),
                                                  num_refinement_blocks=1, heads=(1, 1, 1, 1)))
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed: `import onnx` fails
    result = cli("export", "--model", ckpt, "--out", tmp_path / "s.onnx")
    one_line_error(result, "ONNX export needs the 'export' extra", "pip install 'd4ir[export]'")
    assert not (tmp_path / "s.onnx").exists()


def test_a_long_state_dict_error_becomes_a_short_line():
    from d4ir.pipelines.errors import ONE_LINE_LIMIT, one_line

    lines = [f"\tsize mismatch for block.{i}.weight: copying a param with shape torch.Size([8, {i}]) from checkpoint, "
             f"the shape in current model is torch.Size([16, {i}])." for i in range(500)]
    err = RuntimeError("Error(s) in loading state_dict for Net:\n" + "\n".join(lines))
    text = one_line(err)
    assert text == ("Error(s) in loading state_dict for Net: 500 size mismatches: block.0.weight [8, 0] in the "
                    "checkpoint vs [16, 0] in the model; block.1.weight [8, 1] in the checkpoint vs [16, 1] in the "
                    "model; block.2.weight [8, 2] in the checkpoint vs [16, 2] in the model; and 497 more")
    long = one_line(ValueError("x" * 5000))
    assert len(long) < ONE_LINE_LIMIT + 100 and long.endswith("(4000 more characters; --debug shows the whole error)")
