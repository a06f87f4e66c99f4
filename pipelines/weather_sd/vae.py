"""The weather LDM's autoencoder: a small `diffusers.AutoencoderKL`, trained here on the weather set.

Loss per batch x in [-1,1] (B x 3 x H x W), posterior q(z|x) = N(mu, sigma^2) sampled once, x' = D(z):

    L = |x' - x|_1 + w_edge (|dx x' - dx x|_1 + |dy x' - dy x|_1) + w_kl KL(q || N(0, I)) / (3 H W)

(means over pixels; dx, dy forward differences; KL summed over latent elements, so w_kl = 1e-6 is SD's
setting). The edge term weights what the mean-L1 term spends least on: thin, high-contrast rain streaks and
small flakes, a few percent of the pixels but the whole weather signal; no perceptual or adversarial term
(nothing is downloaded). `latent_scaling_factor` is SD's recipe: 1 / std of posterior samples.

Downsampling factor f = 2^(levels - 1): f = 4 gives 16x16x4 latents of a 64x64 image (compression 12x),
f = 8 gives 8x8x4 (48x, SD's factor). A light rain streak at 64 px is 0.5-0.8 px wide and 4-8 px long, a small
flake 1 px: under f = 8 one latent cell spans a whole streak and must encode its position, angle and length in
four numbers next to the content under it, so the round trip smooths streaks and flakes away; at f = 4 a cell
covers 4x4 px. Measured (`bench/train_weather_sd.py --stage compare-vae`, docs/weather_sd.md), 500 steps each:
4x 20.6 dB held-out PSNR, keeps 9% of the rain signal, 90% of the haze, 1% of the snow; 8x 20.2 dB, 0%, 78%,
0%. Neither keeps flakes at that budget, but only 4x keeps any streaks, so 4x is the default; it costs the
UNet 2.5x (16x16 latents). Training runs on random 32x32 windows (`crop`): the VAE is convolutional, and the
same held-out PSNR came 2.5x sooner in wall-clock time than with whole 64x64 images.
"""

from __future__ import annotations

from typing import Any

import torch
from d4ir.pipelines.weather_sd.data import WEATHERS, WeatherSet
from d4ir.pipelines.weather_sd.stats import content_kept, weather_stats
from diffusers import AutoencoderKL

VAE_WIDTHS: dict[int, tuple[int, ...]] = {4: (32, 64, 64), 8: (32, 64, 64, 64)}
STAT_OF_WEATHER = {"derain": "rain", "dehaze": "haze", "desnow": "snow"}


def vae_config(
    factor: int, widths: tuple[int, ...] | None = None, latent_channels: int = 4, mid_attention: bool = True
) -> dict[str, Any]:
    """An SD-shaped AutoencoderKL config with downsampling `factor` (4 or 8) at 64x64.

    Args:
        factor: 4 (three levels) or 8 (four levels).
        widths: block_out_channels (its length must match the factor); default VAE_WIDTHS[factor].
        latent_channels: channels of the latent (SD: 4).
        mid_attention: self-attention in the encoder's and decoder's mid blocks (SD has it).
    """
    if factor not in VAE_WIDTHS:
        raise ValueError(f"factor must be one of {list(VAE_WIDTHS)}, got {factor!r}")
    widths = tuple(widths or VAE_WIDTHS[factor])
    if 2 ** (len(widths) - 1) != factor or any(w % 32 for w in widths):
        raise ValueError(f"factor {factor} needs {factor.bit_length()} widths, multiples of 32, got {widths}")
    return dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        scaling_factor=1.0,
        mid_block_add_attention=bool(mid_attention),
    )


def build_vae(config: dict[str, Any], seed: int = 0, logvar_init: float | None = None) -> AutoencoderKL:
    """AutoencoderKL from `config` with seeded initial weights (the caller's RNG stream is untouched).

    Args:
        config: `vae_config(...)`.
        seed: weight seed.
        logvar_init: when given, the posterior log-variance starts at this constant (the log-variance rows of
            `quant_conv` zeroed, their bias set): diffusers' init gives log sigma^2 ~ 0, i.e. posterior noise as
            large as the latent itself, which the decoder first learns to average away (blurry outputs).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config)
    if logvar_init is not None:
        c = int(config["latent_channels"])
        with torch.no_grad():
            vae.quant_conv.weight[c:] = 0
            vae.quant_conv.bias[c:] = float(logvar_init)
    return vae


def vae_loss(
    vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator, *, edge_weight: float, kl_weight: float
) -> dict[str, torch.Tensor]:
    """The loss above for x [B,3,H,W] in [0,1]: {"loss", "l1", "edge", "kl"} scalars."""
    x = x * 2 - 1
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    rec = vae.decode(z).sample  # [B,3,H,W]
    l1 = (rec - x).abs().mean()
    edge = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    kl = posterior.kl().mean() / x[0].numel()
    return {"loss": l1 + edge_weight * edge + kl_weight * kl, "l1": l1, "edge": edge, "kl": kl}


def vae_batch_loss(
    data: WeatherSet, vae: AutoencoderKL, batch_size: int, edge_weight: float, kl_weight: float, crop: int = 0,
    whole_from: int | None = None,
):
    """A `train_loop` loss_fn: a random batch of `data` per step, optionally a random crop x crop window of it
    (one window per batch; the VAE is convolutional, so training on windows costs (crop/S)^2 per image).

    From step `whole_from` on, whole S x S images instead, batch_size (crop/S)^2 of them (the same pixels per
    step): GroupNorm normalises over the whole image, so a VAE trained only on windows reconstructs whole
    images measurably worse than windows (2.3 dB at 400 steps); the last steps on whole images adapt it."""
    side = int(data.images.shape[-1])
    if crop and (crop % 8 or not 8 <= crop <= side):
        raise ValueError(f"crop must be a multiple of 8 in [8, {side}], got {crop}")
    whole_batch = max(1, round(batch_size * (crop / side) ** 2)) if crop else batch_size

    def loss_fn(step: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        whole = whole_from is not None and step >= whole_from
        idx = torch.randint(len(data), (whole_batch if whole else batch_size,), generator=gen)
        x = data.floats(idx)
        if crop and crop < side and not whole:
            y0, x0 = (int(v) for v in torch.randint(side - crop + 1, (2,), generator=gen))
            x = x[..., y0 : y0 + crop, x0 : x0 + crop]
        return vae_loss(vae, x, gen, edge_weight=edge_weight, kl_weight=kl_weight)

    return loss_fn


@torch.no_grad()
def posterior_moments(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N,C,h,w] of images [N,3,H,W] in [0,1] (eval mode, in chunks)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        dist = vae.encode(images[i : i + batch] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> float:
    """SD's scaling factor: 1 / std of posterior samples z = mean + std * eps (unit-variance diffusion input)."""
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return float(1.0 / z.flatten().std())


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Decode of the posterior mean, [N,3,H,W] in [0,1]."""
    mean, _ = posterior_moments(vae, images, batch)
    out = [vae.decode(mean[i : i + batch]).sample for i in range(0, mean.shape[0], batch)]
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


def evaluate_vae(vae: AutoencoderKL, held_out: WeatherSet) -> dict[str, Any]:
    """Round-trip quality and weather survival on held-out crops.

    Reports PSNR (dB, RGB) of the reconstruction overall and per weather, and for each weather w with its
    statistic s (rain streak energy, haze dark channel, snow blob density) the weather signal before,
    s(x_w) - s(x_clean), after, s(D(E(x_w))) - s(D(E(x_clean))), each averaged over crops, and
    survival = after / before (1: the round trip keeps all of the weather, 0: it erases it).
    """
    vae.eval()
    x = held_out.floats()
    rec = reconstruct(vae, x)
    mse = (rec - x).pow(2).flatten(1).mean(dim=1)
    psnr = 10 * torch.log10(1 / mse.clamp_min(1e-12))
    out: dict[str, Any] = {"psnr": float(psnr.mean()), "psnr_by_weather": {}, "survival": {}}
    stats_in, stats_rec = weather_stats(x), weather_stats(rec)
    clean_idx = held_out.clean_index
    for w in WEATHERS:
        idx = held_out.where(w)
        if len(idx) == 0:
            continue
        out["psnr_by_weather"][w] = float(psnr[idx].mean())
        if w in STAT_OF_WEATHER:
            name = STAT_OF_WEATHER[w]
            before = float((stats_in[name][idx] - stats_in[name][clean_idx[idx]]).mean())
            after = float((stats_rec[name][idx] - stats_rec[name][clean_idx[idx]]).mean())
            out["survival"][w] = {
                "stat": name,
                "before": before,
                "after": after,
                "survival": after / before if before else float("nan"),
            }
    kept = content_kept(rec, x)
    out["lowpass_psnr"] = float(kept["psnr"].mean())
    return out
