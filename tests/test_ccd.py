"""synth/ccd.py: the CCD sampler against diffusers' img2img pipeline, batching, seeds, the feedback
surrogate's gradients, the clean-image resize policy and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from d4ir.synth.ccd import CCDConfig, ccd_flops, ccd_sample, feedback_surrogate, prepare_clean
from d4ir.synth.reference import diffusers_img2img, diffusers_x0
from d4ir.synth.sd import build_tiny_sd
from d4ir.synth.sd_configs import SD15_UNET_CONFIG, SD15_VAE_CONFIG

CFG = CCDConfig(steps=10, strength=0.5, size=64)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd(0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(123)
    clean = torch.rand(3, 3, 64, 64, generator=g)
    prompts = torch.randn(3, 6, 32, generator=g)
    return clean, prompts


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def reference(tiny, clean, prompts, seeds, config=CFG, **kw):
    pipe = diffusers_img2img(tiny)
    out = pipe(
        image=clean,
        prompt_embeds=prompts,
        strength=config.strength,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        eta=0.0,
        generator=gens(*seeds),
        output_type="pt",
        **kw,
    )
    return out.images


def test_matches_diffusers_img2img(tiny, inputs):
    clean, prompts = inputs
    ours = ccd_sample(tiny, clean[:2], prompts[:2], gens(7, 8), CFG)
    ref = reference(tiny, clean[:2], prompts[:2], (7, 8))
    assert ours.shape == (2, 3, 64, 64) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    # Not a vacuous match: the images are not saturated and not the clean input.
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.5
    assert (ours - clean[:2]).abs().mean() > 0.05


def test_guidance_matches_diffusers(tiny, inputs):
    clean, prompts = inputs
    cfg = CCDConfig(steps=6, strength=0.5, size=64, guidance_scale=3.0)
    negative = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))
    ours = ccd_sample(tiny, clean[:1], prompts[:1], gens(3), cfg, negative_prompt_embeds=negative)
    ref = reference(tiny, clean[:1], prompts[:1], (3,), cfg, negative_prompt_embeds=negative)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    unguided = ccd_sample(tiny, clean[:1], prompts[:1], gens(3), CCDConfig(steps=6, strength=0.5, size=64))
    assert (ours - unguided).abs().max() > 1e-3


def test_batch_equals_single_calls(tiny, inputs):
    clean, prompts = inputs
    batched = ccd_sample(tiny, clean, prompts, gens(10, 11, 12), CFG)
    singles = torch.cat([ccd_sample(tiny, clean[i : i + 1], prompts[i : i + 1], gens(10 + i), CFG) for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-4)
    # vae_batch only chunks the VAE calls.
    chunked = ccd_sample(tiny, clean, prompts, gens(10, 11, 12), CFG, vae_batch=1)
    torch.testing.assert_close(batched, chunked, rtol=0, atol=1e-4)


def test_seeds_decide_the_output(tiny, inputs):
    clean, prompts = inputs
    state = torch.get_rng_state()
    a = ccd_sample(tiny, clean[:2], prompts[:2], gens(1, 2), CFG)
    assert torch.equal(torch.get_rng_state(), state)  # only the per-image generators are consumed
    b = ccd_sample(tiny, clean[:2], prompts[:2], gens(1, 2), CFG)
    c = ccd_sample(tiny, clean[:2], prompts[:2], gens(1, 99), CFG)
    assert torch.equal(a, b)
    assert torch.equal(a[0], c[0]) or (a[0] - c[0]).abs().max() < 1e-5
    assert (a[1] - c[1]).abs().max() > 1e-3


def _count_unet_calls(tiny):
    calls = []
    handle = tiny.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_step_counts_and_noise_mode(tiny, inputs):
    clean, prompts = inputs
    calls, handle = _count_unet_calls(tiny)
    try:
        ccd_sample(tiny, clean[:1], prompts[:1], gens(0), CFG)
        assert len(calls) == 5  # int(10 * 0.5)
        calls.clear()
        noise_cfg = CCDConfig(steps=6, strength=0.5, size=64, z0="noise")
        a = ccd_sample(tiny, clean[:1], prompts[:1], gens(4), noise_cfg)
        assert len(calls) == 6  # pure noise runs the whole schedule
    finally:
        handle.remove()
    # z0="noise" ignores the clean image's content.
    b = ccd_sample(tiny, clean[1:2], prompts[:1], gens(4), noise_cfg)
    assert torch.equal(a, b)
    assert CCDConfig().denoise_steps == 35


def test_surrogate_gradient_reaches_prompt_only(tiny, inputs):
    clean, prompts = inputs
    prompt = prompts[:2].clone().requires_grad_(True)
    image = feedback_surrogate(tiny, clean[:2], prompt, gens(1, 2), config=CFG)
    assert image.shape == (2, 3, 64, 64) and 0 <= image.min() and image.max() <= 1
    image.mean().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for m in (tiny.unet, tiny.vae) for p in m.parameters())
    # Checkpointing recomputes activations: same gradient, and it is switched off again afterwards.
    prompt2 = prompts[:2].clone().requires_grad_(True)
    feedback_surrogate(tiny, clean[:2], prompt2, gens(1, 2), config=CFG, checkpointing=True).mean().backward()
    torch.testing.assert_close(prompt2.grad, prompt.grad, rtol=1e-4, atol=1e-7)
    assert not tiny.unet.is_gradient_checkpointing and not tiny.vae.is_gradient_checkpointing


def test_surrogate_is_the_ddim_x0_prediction(tiny, inputs):
    """Reference built from diffusers' own pieces: posterior sample, add_noise at the CCD start timestep,
    one UNet call, DDIMScheduler.step's pred_original_sample, decode."""
    clean, prompts = inputs
    t_index = 2
    ours = feedback_surrogate(tiny, clean[:1], prompts[:1], gens(9), t_index=t_index, config=CFG)
    ref = diffusers_x0(tiny, clean[:1], prompts[:1], torch.Generator().manual_seed(9), CFG, t_index)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="t_index"):
        feedback_surrogate(tiny, clean[:1], prompts[:1], gens(9), t_index=5, config=CFG)


def test_bad_inputs_are_rejected(tiny, inputs):
    clean, prompts = inputs
    with pytest.raises(ValueError, match=r"\[B,L,32\]"):
        ccd_sample(tiny, clean[:1], torch.zeros(1, 6, 768), gens(0), CFG)
    with pytest.raises(ValueError, match="prepare_clean"):
        ccd_sample(tiny, clean[:1, :, :32, :32], prompts[:1], gens(0), CFG)
    with pytest.raises(ValueError, match="one torch.Generator per image"):
        ccd_sample(tiny, clean[:2], prompts[:2], gens(0), CFG)
    with pytest.raises(ValueError, match=r"in \[0,1\]"):
        ccd_sample(tiny, clean[:1] * 2 - 1, prompts[:1], gens(0), CFG)
    with pytest.raises(ValueError, match="does not match"):
        ccd_sample(tiny, clean[:3], prompts[:2], gens(0, 1, 2), CFG)
    with pytest.raises(ValueError, match="strength"):
        CCDConfig(strength=0.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        CCDConfig(size=100)
    with pytest.raises(ValueError, match="no denoising step"):
        CCDConfig(steps=1, strength=0.5)


def test_prepare_clean_resizes_shorter_side_and_center_crops():
    # 64 x 128 with each column's value its index: no resize, the central columns 32..95 remain.
    cols = np.tile(np.arange(128, dtype=np.uint8), (64, 1))
    out = prepare_clean(np.stack([cols] * 3, axis=-1), 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.equal(out[0, 0], torch.arange(32, 96, dtype=torch.float32) / 255)
    # 200 x 100 (portrait): width -> 64, height -> 128, the central rows survive.
    rows = np.repeat(np.linspace(0, 255, 200).astype(np.uint8)[:, None], 100, axis=1)
    tall = prepare_clean(np.stack([rows] * 3, axis=-1), 64)
    assert tall.shape == (3, 64, 64)
    assert abs(float(tall[0, :, 32].mean()) - 0.5) < 0.02  # centred: mean of the middle half of a ramp
    assert float(tall.min()) > 0.2 and float(tall.max()) < 0.8
    # A small image is upscaled.
    assert prepare_clean(np.zeros((10, 20, 3), np.uint8), 64).shape == (3, 64, 64)
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(ValueError, match=r"\[H,W,3\] uint8"):
            prepare_clean(bad, 64)


def test_flop_count_matches_the_cost_model():
    # docs/design.md ("Numbers"): SD1.5 at 256x256, 35 steps: 35 x 0.180 + 0.273 + 0.622 TFLOP.
    flops = ccd_flops(SD15_UNET_CONFIG, SD15_VAE_CONFIG, CCDConfig())
    assert abs(flops["unet_step"] / 1e12 - 0.180) < 0.002
    assert abs(flops["encode"] / 1e12 - 0.273) < 0.002
    assert abs(flops["decode"] / 1e12 - 0.622) < 0.002
    assert abs(flops["per_image"] / 1e12 - (35 * 0.180 + 0.273 + 0.622)) < 0.05
    guided = ccd_flops(SD15_UNET_CONFIG, SD15_VAE_CONFIG, CCDConfig(guidance_scale=2.0))
    assert guided["per_image"] == pytest.approx(flops["per_image"] + 35 * flops["unet_step"])
