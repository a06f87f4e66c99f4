"""Task presets and scales: the defaults each stage takes when an option is not given on the command line.

Two scales:
- "paper": the paper's settings (T = 70, lambda = 0.5, 256x256, 200 epochs of which 50 joint, Adam,
  lr 1e-3 / 1e-5 halved every 15 epochs, gamma = 0.5) for a GPU and a real SD.
- "demo": the same pipeline shrunk to run on a 2-core CPU in minutes with the tiny SD (small images, few
  steps and epochs, a small AirNet teacher).
Explicit CLI options always win over a preset.
"""

from __future__ import annotations

# A text prompt per task, for the "text" prompt mode (Table 3's M1/M5) on an SD with a text encoder.
TASK_TEXT = {
    "derain": "a photo taken in the rain, rain streaks",
    "dehaze": "a hazy photo, thick fog",
    "desnow": "a photo taken in snowfall, snowflakes",
}

# The demo teacher: AirNet's architecture at a width and depth a CPU trains in a minute or two.
DEMO_TEACHER_KWARGS = {"n_feats": 16, "encoder_first": 16, "n_groups": 2, "n_blocks": 2, "queue_size": 256}

PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        "teacher": {"epochs": 100, "crop": 128, "batch_size": 8, "lr": 2e-4, "lr_halve_every": 30},
        "prompts": {"steps": 2000, "batch_size": 32, "crop": 64, "queue_size": 1024, "prompt_tokens": 77},
        "synth": {"num_samples": 4096, "shard_size": 256, "batch_size": 64, "steps": 70, "strength": 0.5, "size": 256},
        "distill": {
            "epochs": 200,
            "joint_epochs": 50,
            "regen_every": 10,
            "crop": 256,
            "batch_size": 8,
            "lr": 1e-3,
            "encoder_lr": 1e-5,
            "lr_halve_every": 15,
            "gamma": 0.5,
            "feedback_batch": 2,
        },
    },
    "demo": {
        "teacher": {
            "epochs": 6,
            "crop": 48,
            "batch_size": 4,
            "lr": 1e-3,
            "lr_halve_every": 0,
            "arch_kwargs": DEMO_TEACHER_KWARGS,
        },
        "prompts": {
            "steps": 60,
            "batch_size": 16,
            "crop": 32,
            "queue_size": 64,
            "prompt_tokens": 8,
            "embed_side": 64,
            "checkpoint_every": 20,
        },
        "synth": {"num_samples": 48, "shard_size": 16, "batch_size": 16, "steps": 10, "strength": 0.5, "size": 64},
        "distill": {
            "epochs": 6,
            "joint_epochs": 2,
            "regen_every": 1,
            "crop": 48,
            "batch_size": 4,
            "lr": 1e-3,
            "encoder_lr": 1e-5,
            "lr_halve_every": 15,
            "gamma": 0.5,
            "feedback_batch": 1,
        },
    },
}


def preset(scale: str, stage: str) -> dict:
    """The defaults of `stage` at `scale` ("paper" or "demo")."""
    if scale not in PRESETS:
        raise KeyError(f"unknown preset {scale!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[scale][stage])


def merge(defaults: dict, **given) -> dict:
    """The preset's defaults overridden by every option the user actually gave (not None)."""
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}
