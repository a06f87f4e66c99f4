"""Sections 1 and 5 of bench/gpu_bench.py: the batched sampler `ccd_sample` under several configurations, the
split of one batch's time into its parts, torch.compile, and a kernel profile of one batch.

Images/s of a variant = images timed / seconds (whole batches, after `warmup` untimed batches; the first
batch of a new shape also runs cuDNN's algorithm search, the first compiled one the compilation). One image
costs F = T' x unet_step + encode + decode FLOPs (T' = int(T x lambda) = 35 UNet calls at the paper's settings,
`synth.ccd.ccd_flops`), so achieved TFLOP/s = images/s x F / 1e12 and its share of the ceiling follows.

Phase split: CUDA events (perf_counter on the CPU) recorded by forward hooks around the VAE encoder, every
UNet call and the VAE decoder of one `ccd_sample` batch; "other" is the rest of the batch's time (DDIM updates,
noise draws, the VAE's quant convolutions, the input checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from d4ir.synth.ccd import CCDConfig, ccd_flops, ccd_sample
from d4ir.synth.sd import load_sd
from d4ir.synth.sd_parts import SDParts
from gpu_common import DTYPES, Clock, Marks, Variant, generators, peak_memory_gib, reset_peak_memory, sync


@dataclasses.dataclass
class SamplerBench:
    """The SD under test, its inputs and every variant measured so far (shared by sections 1, 2 and 5).

    Args:
        parts: the frozen SD (converted in place between variants).
        config: sampler settings (T, lambda, size; no guidance).
        clean: [N,3,S,S] float32 in [0,1] on the device (N = the largest batch).
        prompts: [N,L,D] float32 on the device.
        vae_batch: images per VAE call inside ccd_sample.
        flops: `ccd_flops` of one image ({"unet_step", "encode", "decode", "per_image"}).
        peak: the FLOP ceiling in TFLOP/s, or None.
    """

    parts: SDParts
    config: CCDConfig
    clean: torch.Tensor
    prompts: torch.Tensor
    vae_batch: int
    flops: dict
    peak: float | None
    measured: list[dict] = dataclasses.field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.parts.device

    def apply(self, v: Variant) -> None:
        """Put the UNet and the VAE (and a text encoder: the pipeline casts prompts to its dtype) in the variant's
        dtype, the UNet and the VAE in its memory format (in place; only what differs is converted)."""
        dtype = DTYPES[v.dtype]
        fmt = torch.channels_last if v.channels_last else torch.contiguous_format
        for module in (self.parts.unet, self.parts.vae, self.parts.text_encoder):
            if module is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype)
        for module in (self.parts.unet, self.parts.vae):
            module.to(memory_format=fmt)

    def run(self, v: Variant, start: int = 0, parts: SDParts | None = None) -> torch.Tensor:
        """One ccd_sample batch of v.batch images: [B,3,S,S] float32 on the device."""
        s = slice(0, v.batch)
        return ccd_sample(parts or self.parts, self.clean[s], self.prompts[s], generators(start, v.batch),
                          self.config, vae_batch=self.vae_batch)

    def best(self, compiled: bool = False) -> Variant | None:
        """The fastest eager variant measured (any variant, compiled ones included, if `compiled`)."""
        ok = [r for r in self.measured if r.get("status") == "ok" and (compiled or not r["compiled"])]
        if not ok:
            return None
        r = max(ok, key=lambda r: r["images_per_s"])
        return Variant(r["dtype"], r["channels_last"], r["batch"], r["compiled"])

    def record_of(self, v: Variant) -> dict | None:
        return next((r for r in self.measured if r.get("label") == v.label and r.get("status") == "ok"), None)

    def estimate_s(self, v: Variant, batches: int) -> float:
        """Seconds for `batches` batches of v, from the last measured seconds per image (0 if none yet)."""
        ok = [r for r in self.measured if r.get("status") == "ok"]
        return batches * v.batch / ok[-1]["images_per_s"] if ok else 0.0


def build_bench(args: argparse.Namespace, device: torch.device) -> SamplerBench:
    """Load the model (SDPA attention), draw the inputs, count the FLOPs of one image."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    parts = load_sd(args.model, device=device, dtype=DTYPES[args.dtypes[0]])
    parts.unet.set_attn_processor(AttnProcessor2_0())
    parts.vae.set_attn_processor(AttnProcessor2_0())
    config = CCDConfig(steps=args.steps, strength=args.strength, size=args.size)
    n = max(args.grid_batch, *args.batches, args.e2e_batch)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(n, 3, args.size, args.size, generator=g).to(device)
    prompts = torch.randn(n, args.prompt_tokens, parts.cross_attention_dim, generator=g).to(device)
    flops = ccd_flops(parts.unet.config, parts.vae.config, config, args.prompt_tokens)
    from gpu_common import peak_tflops

    return SamplerBench(parts, config, clean, prompts, args.vae_batch, flops, peak_tflops(device, args.peak_tflops))


def attention_processors(parts: SDParts) -> list[str]:
    names = {type(p).__name__ for m in (parts.unet, parts.vae) for p in m.attn_processors.values()}
    return sorted(names)


def time_variant(bench: SamplerBench, v: Variant, clock: Clock, *, warmup: int, timed_images: int,
                 parts: SDParts | None = None) -> dict:
    """Warm-up batches (wall time each), then whole timed batches; the record is appended to bench.measured."""
    batches = max(2, -(-timed_images // v.batch))
    rec = v.as_dict()
    if not v.compiled and not clock.fits(bench.estimate_s(v, warmup + batches)):
        rec.update(status="skipped", reason=f"budget: about {bench.estimate_s(v, warmup + batches):.0f} s needed, "
                   f"{clock.left():.0f} s left")
        bench.measured.append(rec)
        return rec
    device, marks = bench.device, Marks(bench.device)
    bench.apply(v)
    rec["warmup_s"] = []
    for w in range(warmup):
        sync(device)
        t = time.perf_counter()
        bench.run(v, 1000 * w, parts)
        sync(device)
        rec["warmup_s"].append(round(time.perf_counter() - t, 3))
    reset_peak_memory(device)
    stamps = [marks.mark()]
    for b in range(batches):
        out = bench.run(v, b * v.batch, parts)
        stamps.append(marks.mark())
    sync(device)
    batch_s = [marks.seconds(a, b) for a, b in zip(stamps, stamps[1:])]
    ips = batches * v.batch / sum(batch_s)
    achieved = ips * bench.flops["per_image"] / 1e12
    rec.update(
        status="ok", batch_s=[round(s, 4) for s in batch_s], images=batches * v.batch, images_per_s=ips,
        seconds_per_batch_median=statistics.median(batch_s), achieved_tflops=achieved,
        share_of_peak=achieved / bench.peak if bench.peak else None, peak_memory_gib=peak_memory_gib(device),
        finite_fraction=float(out.isfinite().float().mean()),
    )
    bench.measured.append(rec)
    share = f" = {100 * rec['share_of_peak']:.1f}% of peak" if bench.peak else ""
    print(f"  {v.label:<28} {ips:8.2f} img/s  {achieved:8.2f} TFLOP/s{share}  warm-up {rec['warmup_s']} s", flush=True)
    return rec


def phase_split(bench: SamplerBench, v: Variant) -> dict:
    """Time of one batch split into VAE encode / UNet calls / VAE decode / other (hooks on the modules)."""
    bench.apply(v)
    marks, spans = Marks(bench.device), {"encode": [], "unet": [], "decode": []}
    handles, open_marks = [], {}
    for name, module in (("encode", bench.parts.vae.encoder), ("unet", bench.parts.unet),
                         ("decode", bench.parts.vae.decoder)):
        def pre(mod, inputs, name=name):
            open_marks[name] = marks.mark()

        def post(mod, inputs, output, name=name):
            spans[name].append((open_marks.pop(name), marks.mark()))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        sync(bench.device)
        start = marks.mark()
        bench.run(v)
        end = marks.mark()
        sync(bench.device)
    finally:
        for h in handles:
            h.remove()
    total = marks.seconds(start, end)
    rec = {"variant": v.label, "total_s": total, "unet_calls": len(spans["unet"])}
    for name, pairs in spans.items():
        rec[f"{name}_s"] = sum(marks.seconds(a, b) for a, b in pairs)
    rec["other_s"] = total - rec["encode_s"] - rec["unet_s"] - rec["decode_s"]
    rec["share"] = {k: rec[f"{k}_s"] / total for k in ("encode", "unet", "decode", "other")}
    return rec


def sampler_section(bench: SamplerBench, rec: dict, clock: Clock, args: argparse.Namespace) -> None:
    """The dtype x channels-last grid at the grid batch, the best of it at the other batches, the phase split."""
    rec.update(flops=bench.flops, peak_tflops=bench.peak, denoise_steps=bench.config.denoise_steps,
               attention=attention_processors(bench.parts), variants=[])
    for dtype in args.dtypes:
        for cl in (False, True):
            rec["variants"].append(time_variant(bench, Variant(dtype, cl, args.grid_batch), clock,
                                                warmup=args.warmup, timed_images=args.timed_images))
    best = bench.best()
    if best is None:
        raise RuntimeError("no sampler variant could be timed")
    for b in args.batches:
        if b != best.batch:
            rec["variants"].append(time_variant(bench, dataclasses.replace(best, batch=b), clock,
                                                warmup=args.warmup, timed_images=args.timed_images))
    best = bench.best()
    rec["best"] = bench.record_of(best)
    rec["phases"] = phase_split(bench, best)
    p = rec["phases"]["share"]
    print(f"  phases of one {best.label} batch: encode {100 * p['encode']:.1f}%  unet {100 * p['unet']:.1f}%  "
          f"decode {100 * p['decode']:.1f}%  other {100 * p['other']:.1f}%", flush=True)


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far (torch._dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_section(bench: SamplerBench, rec: dict, clock: Clock, args: argparse.Namespace) -> None:
    """torch.compile (static shapes) on the best eager variant: the UNet first, then the VAE decoder too.

    Two stages, each timed like an eager variant with 2 warm-up batches: the first warm-up batch of a stage
    compiles what it added, so compile_s = that batch - a steady batch; a stage that runs out of time still
    leaves the one before it recorded."""
    eager = bench.best() or Variant(args.dtypes[0], False, args.grid_batch)
    kwargs = {"backend": args.compile_backend, "dynamic": False}
    if args.compile_backend == "inductor":
        kwargs["mode"] = args.compile_mode
    rec.update(eager=eager.label, compile=kwargs, stages=[])
    bench.apply(eager)
    parts, decoder = bench.parts, bench.parts.vae.decoder
    base = bench.record_of(eager)
    try:
        compiled = dataclasses.replace(parts, unet=torch.compile(parts.unet, **kwargs))
        for stage in ("unet", "unet+decoder"):
            if stage == "unet+decoder":
                parts.vae.decoder = torch.compile(decoder, **kwargs)
            graphs = _graphs()
            r = time_variant(bench, dataclasses.replace(eager, compiled=stage), clock, warmup=2,
                             timed_images=args.timed_images, parts=compiled)
            r["graphs_compiled"] = _graphs() - graphs  # 1 per module compiled; more means recompiles
            r["compile_s"] = r["warmup_s"][0] - r["seconds_per_batch_median"]  # first call minus a steady batch
            r["speedup_vs_eager"] = r["images_per_s"] / base["images_per_s"] if base else None
            rec["stages"].append(r)
            rec["result"] = max(rec["stages"], key=lambda x: x["images_per_s"])
            print(f"  compiled {stage}: first batch {r['warmup_s'][0]:.1f} s (compile about {r['compile_s']:.1f} s), "
                  f"speed-up over eager {r['speedup_vs_eager'] or float('nan'):.2f}x", flush=True)
    finally:
        parts.vae.decoder = decoder
        torch._dynamo.reset()


_CATEGORIES = (("attention", ("flash", "fmha", "attention", "sdpa")),
               ("convolution", ("conv", "implicit", "fprop", "cudnn", "dgrad", "wgrad")),
               ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")),
               ("normalization", ("norm",)))


def _category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in _CATEGORIES if any(k in low for k in keys)), "elementwise/other")


def _rows(prof, cuda: bool) -> list[dict]:
    """[{name, calls, ms}] summed by name: device kernels on a GPU, operators' self CPU time on the CPU."""
    totals: dict[str, list[float]] = {}
    if cuda:
        from torch.autograd import DeviceType

        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                t = totals.setdefault(e.name, [0, 0.0])
                t[0] += 1
                t[1] += e.time_range.elapsed_us() / 1000.0
    else:
        for e in prof.key_averages():
            totals[e.key] = [e.count, e.self_cpu_time_total / 1000.0]
    rows = [{"name": n, "calls": int(c), "ms": ms, "category": _category(n)} for n, (c, ms) in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def profile_section(bench: SamplerBench, rec: dict, out_dir: Path, args: argparse.Namespace) -> None:
    """torch.profiler over one batch of the best eager variant: the top kernels, written as text."""
    from torch.profiler import ProfilerActivity, profile

    v = bench.best() or Variant(args.dtypes[0], False, args.grid_batch)
    cuda = bench.device.type == "cuda"
    bench.apply(v)
    bench.run(v)  # warm: cuDNN's search for these shapes stays out of the profile
    sync(bench.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        bench.run(v)
        sync(bench.device)
    rows = _rows(prof, cuda)
    total = sum(r["ms"] for r in rows)
    by_cat: dict[str, float] = {}
    for r in rows:
        by_cat[r["category"]] = by_cat.get(r["category"], 0.0) + r["ms"] / total
    what = "CUDA kernels (device time)" if cuda else "CPU operators (self CPU time)"
    lines = [f"Top {args.profile_top} {what} of one ccd_sample batch, {v.label}, {bench.config.size}px, "
             f"{bench.config.denoise_steps} UNet calls; total {total:.1f} ms over {len(rows)} names",
             f"{'ms':>10} {'share':>7} {'calls':>7}  {'category':<18} name"]
    for r in rows[: args.profile_top]:
        lines.append(f"{r['ms']:10.2f} {100 * r['ms'] / total:6.1f}% {r['calls']:7d}  {r['category']:<18} "
                     f"{r['name'][:160]}")
    lines.append("by category: " + ", ".join(f"{k} {100 * s:.1f}%" for k, s in sorted(by_cat.items(),
                                                                                      key=lambda kv: -kv[1])))
    (out_dir / "profile_kernels.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    rec.update(variant=v.label, what=what, file="profile_kernels.txt", total_ms=total, names=len(rows),
               top=[r | {"share": r["ms"] / total, "name": r["name"][:300]} for r in rows[: args.profile_top]],
               by_category=by_cat)
