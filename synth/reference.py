"""diffusers' own img2img pipeline over loaded SD parts: the reference `ccd_sample` is tested against, and
the per-image and batched baselines that bench/synth.py times."""

from __future__ import annotations

from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

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
