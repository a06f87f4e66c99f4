"""Every stage's input check keeps one contract (docs/architecture.md, "Input checks"): the config first and the
inputs by keyword; a bad input is one ValueError of one line; back comes None or one typed value."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from d4ir.distill import trainer
from d4ir.distill.config import DistillConfig
from d4ir.shards.records import Provenance
from d4ir.synth import ccd, inputs, prompts
from d4ir.synth.ccd import CCDConfig
from d4ir.synth.plan import SynthConfig
from d4ir.synth.prompts import PromptsConfig
from d4ir.synth.sd import SDSource, load_sd_cached

CHECKS = [prompts.check_inputs, inputs.check_inputs, ccd._check_inputs, trainer.check_inputs]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__module__)
def test_config_first_then_inputs_by_keyword(check):
    params = list(inspect.signature(check).parameters.values())
    assert params[0].name == "config" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params[1:] and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])


def _one_line(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_each_check_refuses_a_bad_input_in_one_line():
    sd = load_sd_cached("tiny", "cpu", "float32")
    no_text = SimpleNamespace(cross_attention_dim=8, model_id="fake", fingerprint="f" * 64,
                              empty_prompt=lambda num_tokens=None: torch.zeros(1, 3, 8))
    assert "expected [1, 4, 8]" in _one_line(lambda: prompts.check_inputs(PromptsConfig(prompt_tokens=4), sd=no_text))
    assert "needs the prompts folder" in _one_line(lambda: inputs.check_inputs(
        SynthConfig(prompt_mode="encoder"), sd=sd, source=SDSource.of("tiny"), prompts_dir=None))
    assert "CCDConfig.size" in _one_line(lambda: ccd._check_inputs(
        CCDConfig(size=32), parts=sd, clean=torch.rand(1, 3, 16, 16), prompt_embeds=torch.zeros(1, 4, 32)))
    assert "--degraded" in _one_line(lambda: trainer.check_inputs(
        DistillConfig(data="web"), degraded_dir=None, clean_dir=None, original_dir=None))


def test_each_check_returns_none_or_one_typed_value():
    sd = load_sd_cached("tiny", "cpu", "float32")
    checked = inputs.check_inputs(SynthConfig(prompt_mode="text"), sd=sd, source=SDSource.of("tiny"), prompts_dir=None)
    assert isinstance(checked, inputs.SynthInputs) and checked.num_prompts == 1
    assert checked.provenance == Provenance("tiny", None, sd.fingerprint)
    cond = ccd._check_inputs(CCDConfig(size=32), parts=sd, clean=torch.rand(2, 3, 32, 32),
                             prompt_embeds=torch.zeros(1, 4, sd.cross_attention_dim))
    assert cond.shape == (2, 4, sd.cross_attention_dim)
    base = prompts.check_inputs(PromptsConfig(), sd=sd)
    assert base.shape == (1, PromptsConfig().prompt_tokens, sd.cross_attention_dim) and base.dtype == torch.float32
    assert trainer.check_inputs(DistillConfig(), degraded_dir=Path("web/rainy"), clean_dir=Path("web/clean"),
                                original_dir=None) is None
