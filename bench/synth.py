"""Throughput of stage 2: the project's batched `ccd_sample` against diffusers' StableDiffusionImg2ImgPipeline
called image by image, on the same model, steps, strength and size, in one run.

Prints (and writes with --json-out) images/s of both, their ratio, peak memory, the FLOPs of one image
(counted with torch's FlopCounterMode, `synth.ccd.ccd_flops`) and the share of the FLOP ceiling
(--peak-tflops; 989 dense fp16/bf16 on H100/H200), plus the largest difference between the two
samplers' images for the same seeds (a correctness check, loose in fp16).

CPU run (about a minute; the shipped weather LDM by default): python bench/synth.py --device cpu
GPU (bench/gpu_bench.py runs more): python bench/synth.py --model sd15-layout --device cuda --dtype float16 \
                                      --size 256 --batch 128 --n-images 512 --channels-last --compile all
The pipeline baseline always runs the plain modules (no channels-last, no compile), as a user would.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

# This file is bench/synth.py: drop bench/ from the path so `import synth` finds the package, not us.
import torch
from d4ir.synth.ccd import CCDConfig, ccd_flops, ccd_sample
from d4ir.synth.reference import diffusers_img2img
from d4ir.synth.sd import SDParts, default_device, load_sd
from gpu_common import peak_tflops
from results import write_json

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COST_MODEL_SD15_256 = 35 * 0.180 + 0.273 + 0.622  # TFLOP per image, docs/design.md ("Numbers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weather",
                   help="weather | tiny | sd15-layout | any load_sd spec (folder, file, hub id)")
    p.add_argument("--size", type=int, default=None, help="image side (default 64 for weather and tiny, else 256)")
    p.add_argument("--steps", type=int, default=70, help="T, the full DDIM schedule")
    p.add_argument("--strength", type=float, default=0.5, help="lambda: int(T*lambda) steps are run")
    p.add_argument("--batch", type=int, default=8, help="images per ccd_sample call")
    p.add_argument("--n-images", type=int, default=16, help="images timed in steady state (rounded up to batches)")
    p.add_argument("--baseline-images", type=int, default=4, help="images timed through the diffusers pipeline")
    p.add_argument("--warmup", type=int, default=1, help="untimed ccd batches first (the first one compiles)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", choices=("none", "unet", "all"), default="none", nargs="?", const="all",
                   help="torch.compile the UNet, or the UNet and the VAE encoder/decoder")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    p.add_argument("--channels-last", action="store_true", help="channels-last UNet and VAE")
    p.add_argument("--fuse-qkv", action="store_true", help="fused attention projections (diffusers)")
    p.add_argument("--vae-batch", type=int, default=32, help="images per VAE call inside ccd_sample")
    p.add_argument("--prompt-tokens", type=int, default=77, help="L, tokens per prompt embedding")
    p.add_argument("--peak-tflops", type=float, default=None, help="FLOP ceiling (default: by GPU name)")
    p.add_argument("--json-out", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 64 if args.model in ("weather", "tiny") else 256
    if min(args.batch, args.n_images, args.baseline_images + 1, args.warmup + 1) < 1:
        raise SystemExit("--batch and --n-images must be >= 1, --baseline-images and --warmup >= 0")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


def make_inputs(parts: SDParts, n: int, size: int, tokens: int, device: torch.device):
    """Random clean images [n,3,size,size] in [0,1] and prompts [n,L,D] (CLIP-like unit scale)."""
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(n, 3, size, size, generator=g).to(device)
    prompts = torch.randn(n, tokens, parts.cross_attention_dim, generator=g).to(device, parts.dtype)
    return clean, prompts


def generators(start: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(start + i) for i in range(count)]


def time_pipeline(parts, clean, prompts, config, count):
    """diffusers img2img image by image: (images/s, outputs [count,3,H,W] on the CPU)."""
    pipe = diffusers_img2img(parts)
    kw = dict(strength=config.strength, num_inference_steps=config.steps, guidance_scale=1.0, eta=0.0,
              output_type="pt")
    device = clean.device
    pipe(image=clean[:1], prompt_embeds=prompts[:1], generator=generators(0, 1), **kw)  # warm-up
    sync(device)
    outs, start = [], time.perf_counter()
    for i in range(count):
        img = pipe(image=clean[i : i + 1], prompt_embeds=prompts[i : i + 1], generator=generators(i, 1), **kw)
        outs.append(img.images.float())
    sync(device)
    seconds = time.perf_counter() - start
    return count / seconds, torch.cat(outs).cpu() if outs else None


def optimize(parts: SDParts, args: argparse.Namespace) -> None:
    """Speed settings for ccd_sample, applied after the baseline has run on the plain modules."""
    if args.channels_last:
        parts.unet.to(memory_format=torch.channels_last)
        parts.vae.to(memory_format=torch.channels_last)
    if args.fuse_qkv:
        parts.unet.fuse_qkv_projections()
        parts.vae.fuse_qkv_projections()
    if args.compile in ("unet", "all"):
        parts.unet = torch.compile(parts.unet, mode=args.compile_mode)
    if args.compile == "all":
        parts.vae.encoder = torch.compile(parts.vae.encoder, mode=args.compile_mode)
        parts.vae.decoder = torch.compile(parts.vae.decoder, mode=args.compile_mode)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config = CCDConfig(steps=args.steps, strength=args.strength, size=args.size)
    t0 = time.perf_counter()
    parts = load_sd(args.model, device=device, dtype=DTYPES[args.dtype])
    load_s = time.perf_counter() - t0
    batches = -(-args.n_images // args.batch)
    n = batches * args.batch
    clean, prompts = make_inputs(parts, max(n, args.baseline_images), args.size, args.prompt_tokens, device)
    flops = ccd_flops(parts.unet.config, parts.vae.config, config, args.prompt_tokens)

    base_ips, base_out = time_pipeline(parts, clean, prompts, config, args.baseline_images)

    optimize(parts, args)
    warm_s = []
    for w in range(args.warmup):
        sync(device)
        start = time.perf_counter()
        ccd_sample(parts, clean[: args.batch], prompts[: args.batch], generators(0, args.batch), config,
                   vae_batch=args.vae_batch)
        sync(device)
        warm_s.append(time.perf_counter() - start)
        print(f"warm-up batch {w}: {warm_s[-1]:.2f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_out, start = None, time.perf_counter()
    for b in range(batches):
        s = slice(b * args.batch, (b + 1) * args.batch)
        out = ccd_sample(parts, clean[s], prompts[s], generators(b * args.batch, args.batch), config,
                         vae_batch=args.vae_batch)
        if b == 0:
            first_out = out[: args.baseline_images].float().cpu()  # small copy, outside the hot path
    sync(device)
    seconds = time.perf_counter() - start
    ccd_ips = n / seconds

    k = min(args.baseline_images, first_out.shape[0])
    diff = float((first_out[:k] - base_out[:k]).abs().max()) if k else None
    peak = peak_tflops(device, args.peak_tflops)
    achieved = ccd_ips * flops["per_image"] / 1e12
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "fingerprint": parts.fingerprint[:16],
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
        "strength": args.strength,
        "denoise_steps": config.denoise_steps,
        "batch": args.batch,
        "n_images": n,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "channels_last": args.channels_last,
        "fuse_qkv": args.fuse_qkv,
        "load_s": round(load_s, 2),
        "warmup_s": [round(s, 2) for s in warm_s],
        "ccd_images_per_s": ccd_ips,
        "ccd_seconds": seconds,
        "pipeline_images": args.baseline_images,
        "pipeline_images_per_s": base_ips,
        "speedup_vs_pipeline": ccd_ips / base_ips if base_ips else None,
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "tflop_per_image": flops["per_image"] / 1e12,
        "tflop_per_image_cost_model": COST_MODEL_SD15_256 if args.model == "sd15-layout" and args.size == 256
        and args.steps == 70 and args.strength == 0.5 else None,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "share_of_peak": achieved / peak if peak else None,
        "max_abs_diff_vs_pipeline": diff,
    }
    print(
        f"{result['device']} {args.model} {args.size}px {config.denoise_steps} steps {args.dtype} batch {args.batch}"
        f" compile={args.compile} channels_last={args.channels_last}\n"
        f"  ccd_sample: {ccd_ips:.2f} img/s   pipeline (per image): {base_ips:.2f} img/s   "
        f"ratio {result['speedup_vs_pipeline']:.2f}x\n"
        f"  {flops['per_image'] / 1e12:.4f} TFLOP/img -> {achieved:.2f} TFLOP/s"
        + (f" = {100 * achieved / peak:.1f}% of {peak:.0f}" if peak else " (no ceiling for this device)")
        + f"   peak mem {result['peak_memory_gb']:.2f} GB   warm-up {result['warmup_s']} s"
        f"   max |ccd - pipeline| {diff}",
        flush=True,
    )
    write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
