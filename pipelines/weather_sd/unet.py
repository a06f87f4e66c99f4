"""The weather LDM's denoiser: a small SD-shaped `diffusers.UNet2DConditionModel`, trained on VAE latents.

Layout as SD's: CrossAttnDownBlock2D on the upper levels and a plain DownBlock2D at the bottom (and mirrored
up blocks), cross-attention keys/values from `encoder_hidden_states` [B, L, D] given by a text encoder
passed in as an argument (any object with `encode(list[str]) -> [B, L, D]`; the shipped one is frozen,
`pipelines/weather_sd/text.py`, but parameters it exposes would train jointly).

Training (DDPM, epsilon prediction, SD1.5's noise schedule: 1000 steps, scaled-linear betas 0.00085-0.012,
so `synth.sd`'s DDIMScheduler samples it unchanged): for latent moments (mu, sigma) of a training image,

    z0  = s (mu + sigma e1),   s = the VAE's scaling_factor (1 / std of the latents, as SD)
    z_t = sqrt(a_t) z0 + sqrt(1 - a_t) e,   t ~ U{0 .. 999} (or, w.p. focus_prob, U{0 .. t_focus-1}), e1, e ~ N(0, I)
    L   = | eps_theta(z_t, t, T(c)) - e |^2,   c = the caption, replaced by "" with probability p_drop

so T("") is the unconditional model (classifier-free guidance needs it). `evaluate_unet` measures whether
the text matters: the held-out denoising error with the right caption, the empty caption and another
weather's caption at fixed timesteps and noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from d4ir.pipelines.weather_sd.data import CAPTIONS, WEATHERS
from d4ir.synth.sd_configs import SD15_SCHEDULER_CONFIG
from diffusers import DDIMScheduler, UNet2DConditionModel

EVAL_TIMESTEPS = (50, 200, 400, 600, 800)


class TextEncoder(Protocol):
    """What the UNet is conditioned on: captions -> hidden states [B, L, D] (differentiable)."""

    def encode(self, texts: list[str]) -> torch.Tensor: ...

    def parameters(self): ...


def unet_config(
    cross_attention_dim: int,
    sample_size: int,
    widths: tuple[int, ...] = (32, 64, 128),
    layers_per_block: int = 1,
    heads: int = 4,
    latent_channels: int = 4,
) -> dict[str, Any]:
    """SD-shaped UNet config: cross-attention on every level but the lowest.

    Args:
        cross_attention_dim: D of the text encoder's hidden states.
        sample_size: latent side (64 / VAE factor).
        widths: block_out_channels, one per level (at least 2, multiples of 32).
        layers_per_block: resnets per level (SD: 2).
        heads: attention heads (diffusers' legacy `attention_head_dim` argument, as SD1.5's config).
        latent_channels: the VAE's latent channels.
    """
    if len(widths) < 2 or any(w % 32 for w in widths):
        raise ValueError(f"widths must be >= 2 multiples of 32, got {widths}")
    if cross_attention_dim < 1 or sample_size < 2 ** (len(widths) - 1):
        raise ValueError(f"bad cross_attention_dim {cross_attention_dim} or sample_size {sample_size}")
    n = len(widths)
    return dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=tuple(widths),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=32,
    )


def build_unet(config: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    """UNet2DConditionModel from `config` with seeded initial weights (the caller's RNG stream is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config)


def scheduler() -> DDIMScheduler:
    """The sampler shipped with the model (SD1.5's DDIM settings; training uses its alphas_cumprod)."""
    return DDIMScheduler(**SD15_SCHEDULER_CONFIG)


@dataclass
class Latents:
    """VAE posterior moments of a captioned image set.

    Args:
        mean: [N,C,h,w] posterior means.
        std: [N,C,h,w] posterior standard deviations.
        captions: N captions.
        weathers: N weather names.
        scaling_factor: the VAE's scaling factor s.
    """

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]
    weathers: list[str]
    scaling_factor: float

    def __post_init__(self) -> None:
        n = self.mean.shape[0]
        if self.std.shape != self.mean.shape or len(self.captions) != n or len(self.weathers) != n:
            raise ValueError("Latents: mean, std, captions and weathers must have one entry per image")

    def sample(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """z0 = s (mu + sigma e1) of the items `idx`: [B,C,h,w]."""
        m, s = self.mean[idx], self.std[idx]
        return self.scaling_factor * (m + s * torch.randn(m.shape, generator=gen))


def noised(z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a_t) z0 + sqrt(1 - a_t) noise for per-sample timesteps t [B]."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(z0.dtype)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def unet_batch_loss(
    latents: Latents,
    unet: UNet2DConditionModel,
    text_encoder: TextEncoder,
    batch_size: int,
    caption_dropout: float = 0.15,
    t_focus: int | None = None,
    focus_prob: float = 0.0,
):
    """A `train_loop` loss_fn: {"loss"} (epsilon MSE) on a random batch per step.

    Timesteps: t ~ U{0 .. 999}, except that with probability `focus_prob` a sample's t is drawn from
    U{0 .. t_focus - 1} instead (CCD at lambda 0.5 only visits t <= 451, so that range gets more of the budget).
    """
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    alphas = scheduler().alphas_cumprod.float()
    steps = alphas.shape[0]
    t_focus = steps if t_focus is None else int(t_focus)
    if not 1 <= t_focus <= steps or not 0.0 <= focus_prob <= 1.0:
        raise ValueError(f"t_focus must be in [1, {steps}] and focus_prob in [0, 1], got {t_focus}, {focus_prob}")

    def loss_fn(step: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(latents.captions), (batch_size,), generator=gen)
        z0 = latents.sample(idx, gen)
        t_all = torch.randint(steps, (batch_size,), generator=gen)
        t_low = torch.randint(t_focus, (batch_size,), generator=gen)
        t = torch.where(torch.rand(batch_size, generator=gen) < focus_prob, t_low, t_all)
        noise = torch.randn(z0.shape, generator=gen)
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        captions = ["" if d else latents.captions[int(i)] for i, d in zip(idx, drop)]
        cond = text_encoder.encode(captions)  # [B,L,D]
        pred = unet(noised(z0, t, noise, alphas), t, encoder_hidden_states=cond).sample
        return {"loss": (pred - noise).pow(2).mean()}

    return loss_fn


@torch.no_grad()
def evaluate_unet(
    unet: UNet2DConditionModel, text_encoder: TextEncoder, latents: Latents, seed: int = 0, batch: int = 64
) -> dict[str, Any]:
    """Held-out epsilon MSE at EVAL_TIMESTEPS (fixed noise) with the right, the empty and another caption.

    "other" gives each weathered image the caption of the next weather in WEATHERS (clean -> rain, ...,
    snow -> clean). right < empty and right < other mean the model uses the text.
    """
    unet.eval()
    if isinstance(text_encoder, torch.nn.Module):
        text_encoder.eval()
    alphas = scheduler().alphas_cumprod.float()
    gen = torch.Generator().manual_seed(seed)
    n = len(latents.captions)
    z0 = latents.sample(torch.arange(n), gen)
    other = [CAPTIONS[WEATHERS[(WEATHERS.index(w) + 1) % len(WEATHERS)]] for w in latents.weathers]
    modes = {"right": latents.captions, "empty": [""] * n, "other": other}
    sums = {m: torch.zeros(n) for m in modes}
    for t_int in EVAL_TIMESTEPS:
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.full((n,), t_int, dtype=torch.int64)
        zt = noised(z0, t, noise, alphas)
        for mode, caps in modes.items():
            for i in range(0, n, batch):
                cond = text_encoder.encode(caps[i : i + batch])
                pred = unet(zt[i : i + batch], t[i : i + batch], encoder_hidden_states=cond).sample
                sums[mode][i : i + batch] += (pred - noise[i : i + batch]).pow(2).flatten(1).mean(dim=1)
    out: dict[str, Any] = {m: float(s.mean()) / len(EVAL_TIMESTEPS) for m, s in sums.items()}
    out["by_weather"] = {}
    for w in WEATHERS:
        idx = torch.tensor([i for i, x in enumerate(latents.weathers) if x == w], dtype=torch.int64)
        if len(idx):
            out["by_weather"][w] = {m: float(s[idx].mean()) / len(EVAL_TIMESTEPS) for m, s in sums.items()}
    return out
