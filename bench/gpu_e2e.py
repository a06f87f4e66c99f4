"""Sections 2-4 of bench/gpu_bench.py: diffusers' img2img baselines, stage 2 end to end, stage 3's distill step.

2. Baselines: StableDiffusionImg2ImgPipeline on the same (plain: contiguous, not compiled) modules, with
   prompt_embeds, strength lambda, T steps, guidance 1, DDIM eta 0 (so it runs the same int(T x lambda) UNet
   calls as `ccd_sample`): called image by image, and called once per batch with one generator per image.
3. End to end: `synth.worker.synthesize` itself on generated clean photos and a random prompt table, with the
   worker's own names wrapped by timers (`_Timers`): time in `ccd_sample` (device synchronised, so it is
   the sampling time), in `encode_png`, in `read_rgb` + `prepare_clean`, and in `write_shard` (which
   consumes the sample generator, so write_shard = all of the above + tar writing). The GPU is busy only
   inside ccd_sample: 1 - sampling / total is the share of the run it waits on the CPU side.
4. Distill: bench/distill.py's step from memory and from shards (imported, on one pre-made round), and, when
   `distill.deform` exists, the same step under each of its deformable-convolution implementations.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from d4ir.synth.reference import diffusers_img2img
from gpu_common import DTYPES, Clock, Variant, generators, sync
from gpu_sampler import SamplerBench
from PIL import Image


def baselines_section(bench: SamplerBench, rec: dict, clock: Clock, args: argparse.Namespace) -> None:
    """diffusers' img2img pipeline image by image, then with whole batches, on the best eager dtype."""
    best = bench.best() or Variant(args.dtypes[0], False, args.grid_batch)
    plain = Variant(best.dtype, False, best.batch)
    bench.apply(plain)
    pipe = diffusers_img2img(bench.parts)
    cfg, device = bench.config, bench.device
    kw = dict(strength=cfg.strength, num_inference_steps=cfg.steps, guidance_scale=1.0, eta=0.0, output_type="pt")
    dtype = DTYPES[plain.dtype]

    def call(start: int, count: int) -> torch.Tensor:
        s = slice(start, start + count)
        out = pipe(image=bench.clean[s], prompt_embeds=bench.prompts[s].to(dtype), generator=generators(start, count),
                   **kw)
        return out.images

    rec.update(dtype=plain.dtype, channels_last=False, compiled=False)
    call(0, 1)  # warm-up
    sync(device)
    n = args.baseline_images
    t, outs = time.perf_counter(), []
    for i in range(n):
        outs.append(call(i, 1).float())
    sync(device)
    seconds = time.perf_counter() - t
    rec["per_image"] = {"images": n, "seconds": seconds, "images_per_s": n / seconds}
    ref = bench.run(Variant(plain.dtype, False, n)).float()  # ccd_sample on the same images and seeds
    diff = (torch.cat(outs) - ref).abs()
    rec["max_abs_diff_vs_ccd"] = float(diff.nan_to_num(nan=float("inf")).max())
    print(f"  pipeline image by image: {n / seconds:.2f} img/s ({plain.dtype}); max |pipeline - ccd| "
          f"{rec['max_abs_diff_vs_ccd']:.3g}", flush=True)

    b = best.batch
    if not clock.fits(bench.estimate_s(plain, 1 + args.baseline_batches)):
        rec["batched"] = {"status": "skipped", "reason": f"budget: {clock.left():.0f} s left"}
        return
    call(0, b)  # warm-up at this batch shape
    sync(device)
    times = []
    for k in range(args.baseline_batches):
        t = time.perf_counter()
        call(k * b, b)
        sync(device)
        times.append(time.perf_counter() - t)
    rec["batched"] = {"batch": b, "calls": len(times), "seconds": times,
                      "images_per_s": b * len(times) / sum(times)}
    print(f"  pipeline batch {b}: {rec['batched']['images_per_s']:.2f} img/s", flush=True)


def _photos(folder: Path, count: int, width: int, height: int) -> None:
    """Smooth random colour fields with fine texture, saved as JPEG (web photos, larger than the crop)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                         Image.BICUBIC)
        grain = rng.normal(0, 12, (height, width, 3))
        img = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"clean_{i:04d}.jpg", quality=90)


class _Timers:
    """Wrap functions that synth.worker imported by name and add up the seconds spent in each."""

    def __init__(self, module, names: dict[str, str], device: torch.device) -> None:
        self.module, self.names, self.device = module, names, device
        self.seconds = {label: 0.0 for label in names.values()}
        self.calls = {label: 0 for label in names.values()}

    def _wrap(self, fn, label: str):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                out = fn(*a, **kw)
                if label == "sampling":
                    sync(self.device)
                return out
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1

        return timed

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(self.module, name) for name in self.names}
        for name, label in self.names.items():
            setattr(self.module, name, self._wrap(originals[name], label))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(self.module, name, fn)


def end_to_end_section(rec: dict, clock: Clock, args: argparse.Namespace, device: torch.device) -> None:
    """synthesize() on generated photos against ccd_sample alone at the same batch, same model and dtype."""
    import d4ir.synth.worker as worker
    from d4ir.shards.embeddings import save_embeddings
    from d4ir.synth.ccd import CCDConfig, ccd_sample
    from d4ir.synth.plan import SynthConfig
    from d4ir.synth.sd import default_dtype, load_sd_cached

    dtype = args.e2e_dtype or default_dtype(device)
    ccd = CCDConfig(steps=args.steps, strength=args.strength, size=args.size)
    config = SynthConfig(num_samples=args.e2e_images, shard_size=args.e2e_shard, batch_size=args.e2e_batch, ccd=ccd,
                         prompt_mode="encoder", seed=0)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-e2e-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        _photos(tmp / "clean", args.e2e_images, args.size + args.size // 4, args.size + args.size // 8)
        parts = load_sd_cached(args.model, str(device), dtype)  # the object synthesize will find in the cache
        g = torch.Generator().manual_seed(1)
        table = torch.randn(min(64, args.e2e_images), args.prompt_tokens, parts.cross_attention_dim, generator=g)
        save_embeddings(tmp / "prompts", table, [{"path": f"web/{i}.jpg", "sha256": "0" * 64}
                                                 for i in range(len(table))], {"sd_model_id": args.model})
        rec["setup_s"] = time.perf_counter() - t

        # ccd_sample alone as the worker calls it (device generators, the table's rows, default vae_batch)
        b = args.e2e_batch
        clean = torch.rand(b, 3, args.size, args.size, generator=g).to(device, DTYPES[dtype])
        prompts = table[torch.arange(b) % len(table)].to(device, DTYPES[dtype])
        times = []
        for k in range(1 + args.e2e_sampler_batches):  # the first is the warm-up (cuDNN search)
            sync(device)
            t = time.perf_counter()
            ccd_sample(parts, clean, prompts, generators(k * b, b, device), ccd)
            sync(device)
            times.append(time.perf_counter() - t)
        alone = b * (len(times) - 1) / sum(times[1:])
        rec["sampler_alone"] = {"batch": b, "dtype": dtype, "warmup_s": times[0], "seconds": times[1:],
                                "images_per_s": alone}

        timers = _Timers(worker, {"ccd_sample": "sampling", "encode_png": "png", "read_rgb": "read",
                                  "prepare_clean": "resize", "write_shard": "write_shard"}, device)
        with timers.installed():
            t = time.perf_counter()
            result = worker.synthesize(tmp / "clean", tmp / "shards", config, sd_source=args.model,
                                       prompts_dir=tmp / "prompts", device=str(device), dtype=dtype, progress=False)
            total = time.perf_counter() - t
        s = timers.seconds
        tar_bytes = sum(p.stat().st_size for p in result.round_dir.glob("*.tar"))
    inside = s["sampling"] + s["png"] + s["read"] + s["resize"]
    rec.update(
        images=result.images, failures=result.failures, shards=result.shards, batch=b, dtype=dtype,
        seconds=total, images_per_s=result.images / total, ratio_vs_sampler_alone=result.images / total / alone,
        profile={"sampling_s": s["sampling"], "png_s": s["png"], "read_s": s["read"], "resize_s": s["resize"],
                 "tar_and_rest_s": s["write_shard"] - inside, "outside_shards_s": total - s["write_shard"],
                 "calls": timers.calls},
        gpu_idle_share=1 - s["sampling"] / total, png_bytes_per_image=tar_bytes / max(result.images, 1),
    )
    print(f"  synthesize: {result.images} images in {total:.1f} s = {rec['images_per_s']:.2f} img/s; ccd_sample "
          f"alone {alone:.2f} img/s (ratio {rec['ratio_vs_sampler_alone']:.2f}); sampling {s['sampling']:.1f} s, "
          f"PNG {s['png']:.1f} s, read+resize {s['read'] + s['resize']:.1f} s, tar+rest "
          f"{rec['profile']['tar_and_rest_s']:.1f} s", flush=True)


def _short(result: dict) -> dict:
    keep = ("student", "teacher", "crop", "batch_size", "amp", "steps_per_source", "step_s", "load_only_s", "ratio")
    return {k: result[k] for k in keep if k in result}


def distill_section(rec: dict, clock: Clock, args: argparse.Namespace, device: torch.device) -> None:
    """bench/distill.py on one pre-made round; then per deformable-conv implementation, if distill.deform exists."""
    bench_distill = importlib.import_module("distill")  # bench/distill.py, beside this file
    base = bench_distill.parse_args(args.distill_args)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-distill-") as tmp:
        t = time.perf_counter()
        shard_size = max(1, base.shard_images // max(2 * base.num_workers, 2))
        round_dir = bench_distill.make_round(Path(tmp), size=-(-base.crop // 8) * 8, images=base.shard_images,
                                             shard_size=shard_size, device=str(device))
        rec["round_s"] = time.perf_counter() - t
        argv = [*args.distill_args, "--shards", str(round_dir)]
        t = time.perf_counter()
        rec["default"] = _short(bench_distill.main(argv))
        run_s = time.perf_counter() - t
        rec["deform"] = deform = {"available": False}
        try:
            module = importlib.import_module("d4ir.distill.deform")
        except ModuleNotFoundError:
            deform["note"] = "distill.deform is absent on this branch: implementation comparison skipped"
            print(f"  {deform['note']}", flush=True)
            return
        impls = [i for i in getattr(module, "IMPLS", ()) if i != "auto"]
        using = getattr(module, "using", None)
        if not impls or using is None:
            deform["note"] = "distill.deform has no IMPLS and using(impl=...): comparison skipped"
            return
        deform.update(available=True, impls={}, default_impl=getattr(module.get_config(), "impl", None)
                      if hasattr(module, "get_config") else None)
        short = ["--steps", str(args.deform_steps), "--blocks", "1", "--warmup", "1"]
        full_steps = 2 * (base.warmup + base.steps)
        estimate = run_s * (2 * (1 + args.deform_steps)) / full_steps
        for impl in impls:
            if not clock.fits(estimate):
                deform["impls"][impl] = {"status": "skipped", "reason": f"budget: about {estimate:.0f} s needed"}
                continue
            with using(impl=impl):
                r = _short(bench_distill.main([*argv, *short]))
            deform["impls"][impl] = {"status": "ok"} | r
        if hasattr(module, "auto_choices"):
            deform["auto_choices"] = module.auto_choices()
        ok = {k: v["step_s"]["memory"] for k, v in deform["impls"].items() if v.get("status") == "ok"}
        if ok:
            deform["fastest"] = min(ok, key=ok.get)
            deform["memory_step_s_median"] = statistics.median(ok.values())
