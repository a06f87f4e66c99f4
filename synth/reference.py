"""diffusers' own pieces over loaded SD parts: the img2img pipeline (the reference `ccd_sample` is tested against,
and the per-image and batched baselines that bench/synth.py times) and the one-step x0 prediction that
`feedback_surrogate` is tested against."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor

from .ccd import CCDConfig
from .sd import SDParts


def diffusers_img2img(parts: SDParts) -> StableDiffusionImg2ImgPipeline:
    """StableDiffusionImg2ImgPipeline over `parts` with a private DDIM copy and no safety checker."""
    pipe = StableDiffusionImg2ImgPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_x0(parts: SDParts, clean: torch.Tensor, prompts: torch.Tensor, generator: torch.Generator,
                 config: CCDConfig, t_index: int = 0) -> torch.Tensor:
    """One image [1,3,H,W] in [0,1] the way `feedback_surrogate` computes it, from diffusers' pieces alone: a
    posterior sample of the VAE, `add_noise` at the CCD's (t_index-th) denoising timestep, one UNet call,
    DDIMScheduler.step's `pred_original_sample` (epsilon or v prediction alike), decoded."""
    sched = DDIMScheduler.from_config(parts.scheduler.config)
    sched.set_timesteps(config.steps)
    t = sched.timesteps[config.steps - config.denoise_steps + t_index]
    scale = parts.vae.config.scaling_factor
    with torch.no_grad():
        z0 = parts.vae.encode(clean * 2 - 1).latent_dist.sample(generator) * scale
        z_t = sched.add_noise(z0, randn_tensor(z0.shape, generator=generator), t[None])
        out = parts.unet(z_t, t, encoder_hidden_states=prompts).sample
        x0 = sched.step(out, t, z_t).pred_original_sample
        return (parts.vae.decode(x0 / scale).sample / 2 + 0.5).clamp(0, 1)
