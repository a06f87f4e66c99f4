"""Does the trained LDM put weather on a clean photo? CCD (synth.ccd.ccd_sample) with each weather's caption.

For held-out clean crops x, each caption c (CAPTIONS: "a photo" and the three weather captions) and each
statistic s of `pipelines/weather_sd/stats.py` (rain streak energy, haze dark channel, snow blob density), the
probe runs the pipeline's own sampler (VAE encode, noise to lambda, DDIM with encoder_hidden_states = T(c),
decode; the same per-image generators for every caption, so captions differ only in the text) and reports,
averaged over crops,

    made_c[s] = s(CCD(x, c)) - s(CCD(x, "a photo"))     what caption c adds to statistic s (a 3 x 3 table)
    physical  = s(render_w(x)) - s(x)                    the weather of the training renders, for scale
    raised    = share of crops with made_c[s_c] > 0       (s_c: the caption's own statistic)
    content   = PSNR / SSIM of the low-pass of CCD(x, c) against x (`stats.content_kept`)

made_c[s_c] > 0 with the off-diagonal entries near 0 means the text adds its own weather and not another's;
made / physical says how much of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from d4ir.pipelines.weather_sd.data import CAPTIONS, WeatherSet
from d4ir.pipelines.weather_sd.stats import content_kept, weather_stats
from d4ir.pipelines.weather_sd.vae import STAT_OF_WEATHER
from d4ir.synth.ccd import CCDConfig, ccd_sample
from d4ir.synth.sd import SDParts


def clean_crops(held_out: WeatherSet, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n_images` clean crops [N,3,S,S] in [0,1] and their item indices [N]."""
    idx = held_out.where("clean")[:n_images]
    return held_out.floats(idx), idx


def sample_caption(
    parts: SDParts, x: torch.Tensor, caption: str, config: CCDConfig, seed: int = 0,
    encode: Callable[[list[str]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """CCD of clean images x [N,3,S,S] with one caption; image i uses generator seed * 100003 + i."""
    emb = (encode or parts.encode_text)([caption]).to(parts.dtype)  # [1,L,D], shared by the batch
    gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(x))]
    return ccd_sample(parts, x, emb, gens, config)


@torch.no_grad()
def caption_effects(
    parts: SDParts,
    held_out: WeatherSet,
    *,
    n_images: int = 16,
    steps: int = 20,
    strength: float = 0.5,
    seed: int = 0,
    encode: Callable[[list[str]], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The measurements above on the first `n_images` clean crops of `held_out` (with their renders).

    Args:
        parts: the loaded LDM.
        held_out: a WeatherSet with all four weathers.
        n_images: clean crops used.
        steps, strength: CCD's T and lambda.
        seed: seed of the per-image generators.
        encode: captions -> [B,L,D] (default: the model's own text encoder, `parts.encode_text`).
    Returns:
        {"steps", "strength", "n_images", "photo": content kept by "a photo",
         w: {"stat", "made", "cross": {stat: made}, "raised", "physical", "lowpass_psnr", "lowpass_ssim",
             "per_image": [N] own-statistic deltas}} for w in derain, dehaze, desnow.
    """
    x, clean_idx = clean_crops(held_out, n_images)
    config = CCDConfig(steps=steps, strength=strength, size=int(x.shape[-1]))
    photo = sample_caption(parts, x, CAPTIONS["clean"], config, seed, encode)
    base, stats_clean = weather_stats(photo), weather_stats(x)
    kept = content_kept(photo, x)
    out: dict[str, Any] = {"steps": steps, "strength": strength, "n_images": len(x),
                           "photo": {"lowpass_psnr": float(kept["psnr"].mean()),
                                     "lowpass_ssim": float(kept["ssim"].mean())}}
    for w, name in STAT_OF_WEATHER.items():
        made = sample_caption(parts, x, CAPTIONS[w], config, seed, encode)
        stats_made = weather_stats(made)
        deltas = {s: stats_made[s] - base[s] for s in STAT_OF_WEATHER.values()}
        render_of = {int(held_out.clean_index[i]): int(i) for i in held_out.where(w)}  # clean item -> its render
        rendered = held_out.floats(torch.tensor([render_of[int(c)] for c in clean_idx]))
        kept = content_kept(made, x)
        out[w] = {
            "stat": name,
            "made": float(deltas[name].mean()),
            "cross": {s: float(d.mean()) for s, d in deltas.items()},
            "raised": float((deltas[name] > 0).float().mean()),
            "physical": float((weather_stats(rendered)[name] - stats_clean[name]).mean()),
            "lowpass_psnr": float(kept["psnr"].mean()),
            "lowpass_ssim": float(kept["ssim"].mean()),
            "per_image": [round(float(v), 5) for v in deltas[name]],
        }
    return out


def ccd_probe(parts: SDParts, text_encoder: Any, held_out: WeatherSet, **kwargs: Any) -> dict[str, Any]:
    """`caption_effects` with the captions encoded by `text_encoder.encode` (a training-time encoder)."""
    if isinstance(text_encoder, torch.nn.Module):
        text_encoder.eval()
    return caption_effects(parts, held_out, encode=text_encoder.encode, **kwargs)
