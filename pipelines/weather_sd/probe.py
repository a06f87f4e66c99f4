"""Does the trained LDM put weather on a clean photo? CCD (synth.ccd.ccd_sample) with each weather's caption.

For held-out clean crops x and each weather w with its statistic s (`vae.STAT_OF_WEATHER`), the probe runs
the pipeline's own sampler (VAE encode, noise to lambda, DDIM with encoder_hidden_states = T(caption_w),
decode) and reports, averaged over crops,

    made      = s(CCD(x, caption_w)) - s(CCD(x, "a photo"))     the weather the caption adds
    physical  = s(render_w(x)) - s(x)                            the weather of the training renders
    content   = PSNR / SSIM of the low-pass of CCD(x, caption_w) against x

made > 0 means the text prompt adds its weather, made / physical how much of it.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.weather_sd.data import CAPTIONS, WeatherSet
from pipelines.weather_sd.stats import content_kept, weather_stats
from pipelines.weather_sd.vae import STAT_OF_WEATHER
from synth.ccd import CCDConfig, ccd_sample
from synth.sd import SDParts


@torch.no_grad()
def ccd_probe(
    parts: SDParts,
    text_encoder: Any,
    held_out: WeatherSet,
    *,
    n_images: int = 16,
    steps: int = 20,
    strength: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """The measurements above on the first `n_images` clean crops of `held_out` (with their renders).

    Args:
        parts: the loaded LDM.
        text_encoder: `encode(list[str]) -> [B,L,D]` with D = parts.cross_attention_dim.
        held_out: a WeatherSet with all four weathers.
        n_images: clean crops used.
        steps, strength: CCD's T and lambda.
        seed: seed of the per-image generators.
    """
    if isinstance(text_encoder, torch.nn.Module):
        text_encoder.eval()
    clean_idx = held_out.where("clean")[:n_images]
    x = held_out.floats(clean_idx)
    config = CCDConfig(steps=steps, strength=strength, size=int(x.shape[-1]))

    def sample(caption: str) -> torch.Tensor:
        emb = text_encoder.encode([caption]).to(parts.dtype)  # [1,L,D], shared by the batch
        gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(x))]
        return ccd_sample(parts, x, emb, gens, config)

    base = weather_stats(sample(CAPTIONS["clean"]))
    stats_clean = weather_stats(x)
    out: dict[str, Any] = {"steps": steps, "strength": strength, "n_images": len(x)}
    for w, name in STAT_OF_WEATHER.items():
        made = sample(CAPTIONS[w])
        render_of = {int(held_out.clean_index[i]): int(i) for i in held_out.where(w)}  # clean item -> its render
        rendered = held_out.floats(torch.tensor([render_of[int(c)] for c in clean_idx]))
        kept = content_kept(made, x)
        out[w] = {
            "stat": name,
            "made": float((weather_stats(made)[name] - base[name]).mean()),
            "physical": float((weather_stats(rendered)[name] - stats_clean[name]).mean()),
            "lowpass_psnr": float(kept["psnr"].mean()),
            "lowpass_ssim": float(kept["ssim"].mean()),
        }
    return out
