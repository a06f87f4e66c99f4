"""Scales: the config each stage starts from when an option is not given on the command line.

- "paper": the library's defaults, which are the paper's settings (T = 70, lambda = 0.5, 256x256, 200 epochs
  of which 50 joint, Adam, lr 1e-3 / 1e-5 halved every 15 epochs, gamma = 0.5) for a GPU and a real SD.
- "demo": the same pipeline shrunk to run on a 2-core CPU in minutes (small images, few steps and epochs, a
  small AirNet teacher), derived from the paper configs with `dataclasses.replace`, so the two never
  disagree on anything the demo does not change.
Explicit command-line options always win over a preset.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from d4ir.distill.teacher import SupervisedConfig
from d4ir.distill.trainer import DistillConfig
from d4ir.shards.errors import UnknownNameError
from d4ir.synth.ccd import CCDConfig
from d4ir.synth.moco import MoCoConfig
from d4ir.synth.plan import SynthConfig
from d4ir.synth.prompts import PromptsConfig

STAGES = ("teacher", "prompts", "synth", "distill")

# The demo teacher: AirNet's architecture at a width and depth a CPU trains in a minute or two (E_pre's width
# follows n_feats; experiments markers written with the encoder_first of older configs still match, steps.current).
DEMO_TEACHER_KWARGS = {"n_feats": 16, "n_groups": 2, "n_blocks": 2, "queue_size": 256}

PAPER: dict[str, Any] = {
    "teacher": SupervisedConfig(),
    "prompts": PromptsConfig(),
    "synth": SynthConfig(),
    "distill": DistillConfig(),
}

DEMO: dict[str, Any] = {
    "teacher": replace(PAPER["teacher"], epochs=6, crop=48, batch_size=4, lr=1e-3, lr_halve_every=0,
                       arch_kwargs=DEMO_TEACHER_KWARGS),
    "prompts": replace(PAPER["prompts"], steps=60, batch_size=16, crop=32, moco=MoCoConfig(queue_size=64),
                       embed_side=64, checkpoint_every=20),
    "synth": replace(PAPER["synth"], num_samples=48, shard_size=16, batch_size=16,
                     ccd=replace(CCDConfig(), steps=10, size=64)),
    "distill": replace(PAPER["distill"], epochs=6, joint_epochs=2, round_every=1, crop=48, batch_size=4,
                       feedback_batch=1),
}

PRESETS = {"paper": PAPER, "demo": DEMO}


def preset(scale: str, stage: str) -> Any:
    """The config of `stage` at `scale` ("paper" or "demo")."""
    if scale not in PRESETS:
        raise UnknownNameError(f"unknown preset {scale!r}; choose from {', '.join(PRESETS)}")
    if stage not in STAGES:
        raise UnknownNameError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    return PRESETS[scale][stage]
