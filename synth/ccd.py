"""Content-driven conditional diffusion (CCD), paper Eq. (4)-(7): stage 2's sampler, and stage 3's
differentiable one-step surrogate of it.

CCD is SDEdit with the prompt embedding in place of the text encoder's output:

1. z0 = scaling_factor * sample of the VAE posterior of the clean image (Eq. (6)'s x_0, in latent space);
2. z_T' = sqrt(a_T') z0 + sqrt(1 - a_T') n, with T' the first of the last int(T * lambda) steps of a T-step
   DDIM schedule (Eq. (6));
3. deterministic DDIM (eta = 0) for those remaining steps, the UNet's cross-attention keys/values coming
   from the prompt embedding [B, L, D] (Eq. (4)-(5), (7));
4. decode z / scaling_factor and map [-1, 1] to [0, 1].

This is exactly diffusers' StableDiffusionImg2ImgPipeline with prompt_embeds, strength = lambda, a list of
per-sample generators and guidance_scale 1 (tests/test_ccd.py checks it to 1e-4), except that the whole
batch shares each UNet and VAE call. Every sample draws its VAE-posterior noise and then its forward-
diffusion noise from its own generator, so an image depends only on its inputs and its generator's seed,
never on the batch it was sampled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from d4ir.shards.checks import check_choice, check_positive_ints
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .sd_parts import SDParts

Z0 = Literal["ccd", "noise"]  # where denoising starts: the noised clean latent (CCD) or pure noise
Z0_CHOICES: tuple[str, ...] = get_args(Z0)


@dataclass(frozen=True)
class CCDConfig:
    """Sampler settings (paper defaults).

    Args:
        steps: T, DDIM steps of the full schedule.
        strength: lambda of Eq. (6): the last int(T * lambda) steps are run (0.5 of 70 -> 35).
        size: side of the square images, a multiple of 8.
        guidance_scale: classifier-free guidance weight; 1 disables it (the paper's setting).
        z0: ccd starts from the noised clean latent; noise ignores the clean image's content and runs all
            T steps from pure noise (text-to-image style, Table 3's M1-M3).
        eta: DDIM stochasticity; 0 is deterministic (the paper's setting).
    """

    steps: int = 70
    strength: float = 0.5
    size: int = 256
    guidance_scale: float = 1.0
    z0: Z0 = "ccd"
    eta: float = 0.0

    def __post_init__(self) -> None:
        check_positive_ints(self, ("steps",), owner="CCDConfig.")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"CCDConfig.strength (lambda) must be in (0, 1], got {self.strength}")
        check_choice("z0", self.z0, Z0_CHOICES, owner="CCDConfig.")
        if self.z0 == "ccd" and int(self.steps * self.strength) < 1:
            raise ValueError(f"steps={self.steps} x strength={self.strength} leaves no denoising step")
        if self.size < 8 or self.size % 8:
            raise ValueError(f"CCDConfig.size must be a positive multiple of 8, got {self.size}")
        if self.guidance_scale < 1.0 or self.eta < 0.0:
            raise ValueError("CCDConfig.guidance_scale must be >= 1 and eta >= 0")

    @property
    def denoise_steps(self) -> int:
        """UNet calls per image (times 2 with guidance): int(T * lambda), or T for z0='noise'."""
        return self.steps if self.z0 == "noise" else min(int(self.steps * self.strength), self.steps)


def _scheduler(parts: SDParts, config: CCDConfig, device: torch.device) -> tuple[DDIMScheduler, torch.Tensor]:
    """A private DDIM copy set to T steps, and the timesteps CCD runs ([n] int64 on `device`, descending).

    img2img convention: the schedule is set for all T steps and sampling starts at index T - int(T*lambda)."""
    sched = DDIMScheduler.from_config(parts.scheduler.config)
    sched.set_timesteps(config.steps, device=device)
    start = config.steps - config.denoise_steps
    return sched, sched.timesteps[start:]


def _check_inputs(config: CCDConfig, *, parts: SDParts, clean: torch.Tensor, prompt_embeds: torch.Tensor
                  ) -> torch.Tensor:
    """The sampler's batch checked (the input-check contract: docs/architecture.md): clean [B,3,size,size] in [0, 1]
    and prompts [1 or B, L, D]; returns the prompts as [B, L, D]."""
    if clean.ndim != 4 or clean.shape[1] != 3 or not clean.is_floating_point():
        raise ValueError(f"clean must be a float tensor [B,3,H,W], got {tuple(clean.shape)} {clean.dtype}")
    b, _, h, w = clean.shape
    if (h, w) != (config.size, config.size):
        raise ValueError(f"clean images are {h}x{w} but CCDConfig.size is {config.size}: use prepare_clean")
    lo, hi = float(clean.min()), float(clean.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"clean must be in [0,1], got values in [{lo:.3g}, {hi:.3g}]")
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != parts.cross_attention_dim:
        raise ValueError(
            f"prompt_embeds must be [B,L,{parts.cross_attention_dim}] for SD '{parts.model_id}', "
            f"got {tuple(prompt_embeds.shape)}"
        )
    if prompt_embeds.shape[0] not in (1, b):
        raise ValueError(f"prompt_embeds batch {prompt_embeds.shape[0]} does not match {b} clean images")
    return prompt_embeds.expand(b, -1, -1)


def _check_generators(generators: object, b: int) -> list[torch.Generator]:
    if isinstance(generators, torch.Generator):
        generators = [generators]
    if not isinstance(generators, (list, tuple)) or len(generators) != b:
        raise ValueError(f"need one torch.Generator per image ({b}), got {generators!r}")
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError("generators must all be torch.Generator")
    return list(generators)


def _encode(parts: SDParts, clean: torch.Tensor, generators, chunk: int | None) -> torch.Tensor:
    """Sample of the VAE posterior times scaling_factor: [B,4,H/8,W/8]. Encoded in chunks of `chunk`
    images; the posterior noise of image i comes from generators[i] (diffusers' latent_dist.sample)."""
    vae = parts.vae
    x = clean.to(device=parts.device, dtype=vae.dtype) * 2 - 1
    step = chunk or x.shape[0]
    means, stds = [], []
    for i in range(0, x.shape[0], step):
        dist = vae.encode(x[i : i + step]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    eps = randn_tensor(mean.shape, generator=generators, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * vae.config.scaling_factor


def _decode(parts: SDParts, latents: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """VAE decode of latents / scaling_factor, mapped to [0,1]: [B,3,H,W] float32."""
    vae = parts.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    step = chunk or z.shape[0]
    images = [vae.decode(z[i : i + step], return_dict=False)[0] for i in range(0, z.shape[0], step)]
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1).float()


def ccd_sample(
    parts: SDParts,
    clean: torch.Tensor,
    prompt_embeds: torch.Tensor,
    generators: list[torch.Generator],
    config: CCDConfig = CCDConfig(),
    negative_prompt_embeds: torch.Tensor | None = None,
    *,
    vae_batch: int | None = 32,
) -> torch.Tensor:
    """Synthesize degraded images from clean images and degradation prompts (Eq. (4)-(7)).

    Args:
        parts: frozen SD (fp16/bf16 weights on a GPU, fp32 on the CPU; the weights' dtype is used as is,
            no autocast). Channels-last or compiled modules work unchanged.
        clean: [B,3,size,size] float in [0,1] (see `prepare_clean`).
        prompt_embeds: [B,L,D] (or [1,L,D], shared) with D = parts.cross_attention_dim.
        generators: B torch.Generators, one per image; CPU generators make results device-independent in
            their noise (as in diffusers).
        config: sampler settings.
        negative_prompt_embeds: unconditional embedding for guidance_scale > 1 ([B or 1,L,D]); default the
            empty-text embedding when a text encoder exists, else zeros.
        vae_batch: images per VAE call (bounds memory at large batch; results are unchanged).
    Returns:
        [B,3,size,size] float32 in [0,1] on parts.device.
    """
    cond = _check_inputs(config, parts=parts, clean=clean, prompt_embeds=prompt_embeds)  # [B, L, D]
    b = len(cond)
    generators = _check_generators(generators, b)
    device, dtype = parts.device, parts.dtype
    sched, timesteps = _scheduler(parts, config, device)
    t_ints = timesteps.tolist()  # python ints for scheduler.step: no device sync inside the loop
    cond = cond.to(device=device, dtype=dtype)
    guided = config.guidance_scale > 1.0
    if guided:
        neg = negative_prompt_embeds
        if neg is None:
            neg = parts.empty_prompt(cond.shape[1])
        neg = torch.zeros_like(cond) if neg is None else neg.to(device=device, dtype=dtype).expand_as(cond)
        cond = torch.cat([neg, cond])  # [2B,L,D]: unconditional first, as in diffusers
    step_kwargs = {"eta": config.eta, "generator": generators if config.eta > 0 else None}

    with torch.inference_mode():
        if config.z0 == "ccd":
            z = _encode(parts, clean, generators, vae_batch).to(dtype)  # z0 [B,4,h,w]
            noise = randn_tensor(z.shape, generator=generators, device=device, dtype=z.dtype)
            z = sched.add_noise(z, noise, timesteps[:1].repeat(b))  # Eq. (6)
        else:
            f = parts.vae_scale_factor
            shape = (b, parts.unet.config.in_channels, config.size // f, config.size // f)
            z = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * sched.init_noise_sigma
        for t_int, t in zip(t_ints, timesteps):
            z_in = torch.cat([z, z]) if guided else z
            eps = parts.unet(sched.scale_model_input(z_in, t), t, encoder_hidden_states=cond, return_dict=False)[0]
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + config.guidance_scale * (eps_cond - eps_uncond)
            z = sched.step(eps, t_int, z, return_dict=False, **step_kwargs)[0]  # Eq. (7)
        return _decode(parts, z, vae_batch)


def feedback_surrogate(
    parts: SDParts,
    clean: torch.Tensor,
    prompt_embeds: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None,
    t_index: int | None = None,
    config: CCDConfig = CCDConfig(),
    *,
    checkpointing: bool = False,
) -> torch.Tensor:
    """Differentiable one-step surrogate of `ccd_sample`, for stage 3's feedback to the prompt encoder.

    Backpropagating through all int(T*lambda) = 35 sampling steps costs 35 UNet activations; instead:
    z0 = VAE encode of the clean image (no grad), z_t = Eq. (6) at the CCD schedule's timestep
    `t_index` (0, the default, is the start T' that the sampler starts from), ONE UNet call with the
    prompt, the predicted clean latent x0 = (z_t - sqrt(1-a_t) eps) / sqrt(a_t) (the DDIM step's own
    x0-prediction; the v-prediction form for v models), and a VAE decode. SD's weights never get
    gradients (requires_grad False); its activations carry them from the image back to `prompt_embeds`.

    Args:
        parts: frozen SD.
        clean: [B,3,H,W] float in [0,1].
        prompt_embeds: [B,L,D] (requires_grad for the feedback).
        generator: one generator, B generators, or None (global RNG) for the posterior and forward noise.
        t_index: index into the CCD timesteps (0 .. denoise_steps-1).
        config: the sampler's settings (steps, strength, size); guidance is not applied here.
        checkpointing: recompute UNet/VAE-decoder blocks in backward to save activation memory.
    Returns:
        [B,3,H,W] in [0,1] (the dtype of the SD weights), differentiable w.r.t. prompt_embeds.
    """
    cond = _check_inputs(config, parts=parts, clean=clean, prompt_embeds=prompt_embeds)  # [B, L, D]
    b = len(cond)
    if isinstance(generator, (list, tuple)):
        generator = _check_generators(generator, b)
    device, dtype = parts.device, parts.dtype
    sched, timesteps = _scheduler(parts, config, device)
    index = 0 if t_index is None else t_index
    if not 0 <= index < len(timesteps):
        raise ValueError(f"t_index must be in [0, {len(timesteps)}), got {t_index}")
    t = timesteps[index]
    with torch.no_grad():
        z0 = _encode(parts, clean, generator, None).to(dtype)
        noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=dtype)
    a = sched.alphas_cumprod.to(device=device, dtype=torch.float32)[t]
    sqrt_a, sqrt_1ma = a.sqrt().to(dtype), (1 - a).sqrt().to(dtype)
    z_t = sqrt_a * z0 + sqrt_1ma * noise
    modules = [m for m in (parts.unet, parts.vae) if checkpointing and not m.is_gradient_checkpointing]
    for m in modules:
        m.enable_gradient_checkpointing()
    try:
        out = parts.unet(z_t, t, encoder_hidden_states=cond.to(device=device, dtype=dtype), return_dict=False)[0]
        kind = sched.config.prediction_type
        if kind == "epsilon":
            x0 = (z_t - sqrt_1ma * out) / sqrt_a
        elif kind == "v_prediction":
            x0 = sqrt_a * z_t - sqrt_1ma * out
        else:
            x0 = out
        image = parts.vae.decode(x0 / parts.vae.config.scaling_factor, return_dict=False)[0]
    finally:
        for m in modules:
            m.disable_gradient_checkpointing()
    return (image / 2 + 0.5).clamp(0, 1)


def ccd_flops(unet_config: dict, vae_config: dict, config: CCDConfig, prompt_tokens: int = 77) -> dict[str, float]:
    """FLOPs of one synthesized image (2 per multiply-add), counted by torch's FlopCounterMode on meta
    tensors (shapes only, no memory, no weights): {"unet_step", "encode", "decode", "per_image"}.
    per_image = denoise_steps x unet_step (x2 with guidance) + encode (z0="ccd" only) + decode; matmuls,
    convolutions and attention are counted, element-wise work (norms, activations, DDIM update) is not.

    Args:
        unet_config: `parts.unet.config` (or any UNet2DConditionModel config).
        vae_config: `parts.vae.config`.
        config: sampler settings (size, steps, strength, guidance, z0).
        prompt_tokens: L, the prompt length (attention cost grows with it).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        vae = AutoencoderKL.from_config(dict(vae_config))
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        z = torch.zeros(1, unet.config.in_channels, config.size // f, config.size // f)
        prompt = torch.zeros(1, prompt_tokens, unet.config.cross_attention_dim)
        x = torch.zeros(1, 3, config.size, config.size)
        runs = {
            "unet_step": lambda: unet(z, torch.tensor(500), encoder_hidden_states=prompt),
            "encode": lambda: vae.encode(x),
            "decode": lambda: vae.decode(z),
        }
        counts = {}
        for name, run in runs.items():
            with FlopCounterMode(display=False) as counter:
                run()
            counts[name] = float(counter.get_total_flops())
    unet_calls = config.denoise_steps * (2 if config.guidance_scale > 1 else 1)
    encode = counts["encode"] if config.z0 == "ccd" else 0.0
    counts["per_image"] = unet_calls * counts["unet_step"] + encode + counts["decode"]
    return counts


def prepare_clean(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize policy for clean photos of any size: scale so the SHORTER side equals `size` (bicubic with
    antialiasing, PIL), then take the central size x size crop (the longer side loses equal margins, the
    extra pixel of an odd margin on the bottom/right). Never pads, never changes the aspect ratio.

    Args:
        image: [H,W,3] uint8 RGB (`shards.images.read_rgb` output).
        size: output side (a multiple of 8 for the VAE).
    Returns:
        [3,size,size] float32 in [0,1].
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"prepare_clean expects an [H,W,3] uint8 RGB array, got {desc}")
    if size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    pil = Image.fromarray(image)
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    arr = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
