"""Stable Diffusion layouts as diffusers configs, and random-weight builders for them.

The configs are the constructor arguments of diffusers' `UNet2DConditionModel`, `AutoencoderKL` and
`DDIMScheduler`. The SD1.5 entries are the real released layouts (an 860M-parameter UNet, an 84M-parameter
VAE); the tiny entries keep SD's shape (4 latent channels, 8x VAE downsampling, cross-attention on all but
the lowest UNet level) at a width the CPU runs in milliseconds.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

# SD1.5's DDIM settings (scheduler_config.json of stable-diffusion-v1-5, read as DDIM).
SD15_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE_CONFIG: dict[str, Any] = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)

# Tiny but SD-shaped: 4 VAE levels (8x downsampling, 4 latent channels), a 3-level UNet with cross-attention
# on the two upper levels, as in SD where the lowest level has none.
TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    SD15_VAE_CONFIG, sample_size=64, block_out_channels=(32, 64, 64, 64), layers_per_block=1
)


def place(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move and cast with torch.nn.Module.to directly: diffusers' override warns about fp32-only modules on
    every dtype cast, and SD's UNet/VAE have none."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def random_modules(
    unet_config: dict, vae_config: dict, seed: int, device: str | torch.device, dtype: torch.dtype
) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """VAE and UNet with fixed-seed random weights drawn on the CPU (device-independent weights).

    fork_rng(devices=[]) restores the global CPU RNG afterwards, so building never shifts a caller's stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    return place(vae, device, dtype), place(unet, device, dtype)


def sd15_modules(
    device: str | torch.device, dtype: torch.dtype, *, seed: int = 0
) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """Random-weight SD1.5 VAE and UNet built directly on `device` ("meta" gives shapes only).

    Weights drawn on a GPU are fast to make but device-dependent; they mean nothing either way.
    """
    dev = torch.device(device)
    # Initialising on a GPU draws from its RNG: fork that one too, so callers' streams stay untouched.
    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    return place(vae, device, dtype), place(unet, device, dtype)
