"""Every stage-2 GPU measurement (and stage 3's distill step) in one prepared, time-boxed run.

Settings (docs/design.md, "Numbers"): SD1.5 layout with random weights, 256x256, T = 70, lambda = 0.5 (35 UNet
calls), no guidance, SDPA attention (diffusers' AttnProcessor2_0). Sections, in the order they run:

  sampler     ccd_sample: fp16/bf16 x channels-last off/on at --grid-batch, the best of those at --batches;
              images/s, share of the FLOP ceiling (ccd_flops per image / --peak-tflops or the GPU's table
              entry), peak memory, and one batch split into VAE encode / UNet calls / VAE decode (CUDA events)
  baselines   diffusers' StableDiffusionImg2ImgPipeline, image by image and batched, on the same model
  profile     torch.profiler of one batch of the best variant: the top CUDA kernels, as text
  end_to_end  synth.worker.synthesize on generated photos, timed inside (sampling vs PNG + tar), against
              ccd_sample alone at the same batch
  compile     torch.compile (static shapes) of the UNet and the VAE decoder on the best variant: compile time
              apart from steady-state images/s
  distill     bench/distill.py's KD step (256 crops, batch 8, bf16 autocast, half-airnet student, airnet
              teacher) from memory and from shards; per deformable-conv implementation if distill.deform exists

Budget: --budget seconds for the whole run; each section gets min(its limit, time left minus what the later
sections reserve) (`SECTIONS`), skips units of work that would not fit and is interrupted past its limit. A
failing section is recorded (status error/timeout, with whatever it measured) and the next one runs. Results
go to OUT/gpu_bench.json (rewritten after every section), the console to OUT/gpu_bench.log, the kernel table
to OUT/profile_kernels.txt.

GPU (bench/gpu_all.sh):  python bench/gpu_bench.py --out $OUT
CPU smoke (every code path, tiny model, 64x64, T = 10, batch 2-4; under a minute):
                         python bench/gpu_bench.py --smoke --out /tmp/gpu_bench_smoke
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from gpu_common import DTYPES, Clock, SectionTimeout, Tee, device_name, hard_limit
from results import write_json

# name -> (limit, reserve) in seconds: a section runs at most `limit`; later sections' reserves are kept back.
SECTIONS = {"sampler": (100, 60), "baselines": (60, 30), "profile": (45, 20), "end_to_end": (75, 40),
            "compile": (200, 90), "distill": (110, 60)}
GPU_DISTILL = ("--device cuda --student half-airnet --teacher airnet --crop 256 --batch-size 8 --num-workers 6 "
               "--steps 8 --blocks 2 --warmup 2 --shard-images 128")
SMOKE_DISTILL = ("--device cpu --student restormer-12 --teacher none --crop 32 --batch-size 2 --num-workers 1 "
                 "--steps 2 --blocks 1 --warmup 1 --shard-images 8 --threads 1")
# flag -> (GPU default, --smoke default)
MODES = {
    "device": ("cuda", "cpu"), "model": ("sd15-layout", "tiny"), "size": (256, 64), "steps": (70, 10),
    "dtypes": ("float16,bfloat16", "float32,bfloat16"), "grid_batch": (64, 4), "batches": ("32,128", "2"),
    "timed_images": (128, 8), "baseline_images": (8, 2), "baseline_batches": (2, 1), "e2e_images": (256, 8),
    "e2e_batch": (64, 4), "e2e_shard": (128, 4), "e2e_sampler_batches": (2, 1), "deform_steps": (4, 1),
    "compile_backend": ("inductor", "eager"), "distill": (GPU_DISTILL, SMOKE_DISTILL), "budget": (510.0, 400.0),
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/d4ir_gpu_bench"), help="folder for the JSON, log, profile")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, 64x64, T=10, batch 2-4")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from: {', '.join(SECTIONS)}")
    p.add_argument("--budget", type=float, help="seconds for the whole run (GPU 510, smoke 400)")
    p.add_argument("--device", help="cuda | cpu")
    p.add_argument("--model", help="SD spec: sd15-layout (GPU), tiny (smoke), or any load_sd spec")
    p.add_argument("--size", type=int, help="image side (256; smoke 64)")
    p.add_argument("--steps", type=int, help="T of the DDIM schedule (70; smoke 10)")
    p.add_argument("--strength", type=float, default=0.5, help="lambda: int(T*lambda) UNet calls")
    p.add_argument("--dtypes", help="weight dtypes of the grid (float16,bfloat16; smoke float32,bfloat16)")
    p.add_argument("--grid-batch", type=int, help="batch of the dtype x channels-last grid (64; smoke 4)")
    p.add_argument("--batches", help="other batches for the grid's best (32,128; smoke 2)")
    p.add_argument("--timed-images", type=int, help="images timed per variant, at least 2 batches (128; smoke 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per eager variant")
    p.add_argument("--vae-batch", type=int, default=32, help="images per VAE call inside ccd_sample")
    p.add_argument("--prompt-tokens", type=int, default=77, help="L, tokens per prompt embedding")
    p.add_argument("--peak-tflops", type=float, default=None, help="FLOP ceiling (default: by GPU name)")
    p.add_argument("--compile-backend", help="torch.compile backend (inductor; smoke eager: tracing only)")
    p.add_argument("--compile-mode", default="default", help="inductor mode (default, max-autotune, ...)")
    p.add_argument("--baseline-images", type=int, help="images through the pipeline one by one (8; smoke 2)")
    p.add_argument("--baseline-batches", type=int, help="timed batched pipeline calls (2; smoke 1)")
    p.add_argument("--e2e-images", type=int, help="images synthesize writes (256; smoke 8)")
    p.add_argument("--e2e-batch", type=int, help="synthesize's batch_size (64; smoke 4)")
    p.add_argument("--e2e-shard", type=int, help="synthesize's shard_size (128; smoke 4)")
    p.add_argument("--e2e-sampler-batches", type=int, help="timed ccd_sample batches beside synthesize (2; smoke 1)")
    p.add_argument("--e2e-dtype", choices=sorted(DTYPES), default=None, help="synthesize's dtype (worker default)")
    p.add_argument("--distill", help="arguments of bench/distill.py (paper settings on the GPU)")
    p.add_argument("--deform-steps", type=int, help="timed steps per source per deform implementation (4; smoke 1)")
    p.add_argument("--profile-top", type=int, default=15, help="kernels listed by the profile section")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args(argv)
    for name, (gpu, smoke) in MODES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else gpu)
    args.dtypes = [d.strip() for d in str(args.dtypes).split(",") if d.strip()]
    args.batches = _ints(args.batches)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.distill_args = shlex.split(args.distill)
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if [d for d in args.dtypes if d not in DTYPES] or not args.dtypes:
        p.error(f"--dtypes must be a comma list from {', '.join(DTYPES)}, got {args.dtypes}")
    counts = [args.grid_batch, *args.batches, args.timed_images, args.baseline_images, args.baseline_batches,
              args.e2e_images, args.e2e_batch, args.e2e_shard, args.e2e_sampler_batches, args.deform_steps]
    if min(counts) < 1 or args.warmup < 0:
        p.error("batches, image counts and step counts must be >= 1 (--warmup >= 0)")
    if not args.budget > 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.size < 8 or args.size % 8:
        p.error(f"--size must be a positive multiple of 8, got {args.size}")
    return args


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("diffusers", "transformers", "huggingface_hub", "webdataset", "torchvision"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # recorded; the sections that need it fail with their own error
            out[name] = "missing"
    return out


def summarize(results: dict) -> dict:
    """Best sampler (eager or compiled) against the baselines and the targets of docs/design.md."""
    eager = [r for r in results.get("sampler", {}).get("variants", []) if r.get("status") == "ok"]
    compiled = [r for r in results.get("compile", {}).get("stages", []) if r.get("status") == "ok"]
    keys = ("label", "images_per_s", "achieved_tflops", "share_of_peak", "peak_memory_gib")
    s: dict = {}
    for name, runs in (("best_eager", eager), ("best", eager + compiled)):
        top = max(runs, key=lambda r: r["images_per_s"], default=None)
        s[name] = None if top is None else {k: top.get(k) for k in keys}
    best = s["best"]
    base = results.get("baselines", {})
    for kind in ("per_image", "batched"):
        ips = base.get(kind, {}).get("images_per_s")
        s[f"vs_pipeline_{kind}"] = best["images_per_s"] / ips if best and ips else None
        s[f"eager_vs_pipeline_{kind}"] = s["best_eager"]["images_per_s"] / ips if s["best_eager"] and ips else None
    share = best.get("share_of_peak") if best else None
    s["target_share_of_peak_0.40"] = None if share is None else share >= 0.40
    s["target_vs_pipeline_per_image_3x"] = None if s["vs_pipeline_per_image"] is None \
        else s["vs_pipeline_per_image"] >= 3.0
    e2e = results.get("end_to_end", {})
    s["end_to_end_vs_sampler"] = e2e.get("ratio_vs_sampler_alone")
    s["end_to_end_gpu_idle_share"] = e2e.get("gpu_idle_share")
    ratio = results.get("distill", {}).get("default", {}).get("ratio")
    s["distill_shards_vs_memory"] = ratio
    s["target_distill_within_10pct"] = None if ratio is None else ratio <= 1.10
    comp = results.get("compile", {}).get("result")
    s["compile_speedup"] = comp.get("speedup_vs_eager") if comp else None
    s["sections"] = {k: v.get("status") for k, v in results.items() if isinstance(v, dict) and "status" in v}
    return s


def _table(results: dict) -> str:
    s = results["summary"]
    best = s.get("best") or {}

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    rows = [("sections", " ".join(f"{k}={v}" for k, v in s["sections"].items())),
            ("best sampler", f"{best.get('label', '-')}: {f(best.get('images_per_s'))} img/s, "
             f"{f(best.get('share_of_peak'), '{:.1%}')} of peak, {f(best.get('peak_memory_gib'))} GiB"),
            ("vs pipeline", f"per image {f(s['vs_pipeline_per_image'])}x, batched {f(s['vs_pipeline_batched'])}x "
             f"(best eager: {f(s['eager_vs_pipeline_per_image'])}x, {f(s['eager_vs_pipeline_batched'])}x)"),
            ("compile", f"speed-up {f(s['compile_speedup'])}x"),
            ("end to end", f"{f(s['end_to_end_vs_sampler'])} of ccd_sample alone, GPU idle "
             f"{f(s['end_to_end_gpu_idle_share'], '{:.0%}')}"),
            ("distill", f"shards/memory {f(s['distill_shards_vs_memory'], '{:.3f}')}")]
    return "\n".join(f"| {a:<13} | {b} |" for a, b in rows)


def _run_sections(args, results, out_json, device, deadline) -> None:
    import gpu_e2e
    import gpu_sampler

    bench = None
    for i, name in enumerate(args.sections):
        reserve = sum(SECTIONS[later][1] for later in args.sections[i + 1:])
        left = deadline - time.monotonic() - reserve
        limit = min(SECTIONS[name][0] if not args.smoke else args.budget, max(left, 0.0))
        rec = results[name] = {"status": "running", "limit_s": round(limit, 1)}
        print(f"=== {name} (limit {limit:.0f} s, {deadline - time.monotonic():.0f} s left in the run)", flush=True)
        t0 = time.monotonic()
        try:
            if limit <= 1:
                rec.update(status="skipped", reason="no time left in the budget")
                continue
            clock = Clock(limit, deadline)
            with hard_limit(limit + 5):
                if name in ("sampler", "baselines", "profile", "compile") and bench is None:
                    t = time.perf_counter()
                    bench = gpu_sampler.build_bench(args, device)
                    results["meta"]["model_build_s"] = time.perf_counter() - t
                if name == "sampler":
                    gpu_sampler.sampler_section(bench, rec, clock, args)
                elif name == "baselines":
                    gpu_e2e.baselines_section(bench, rec, clock, args)
                elif name == "profile":
                    gpu_sampler.profile_section(bench, rec, args.out, args)
                elif name == "compile":
                    gpu_sampler.compile_section(bench, rec, clock, args)
                elif name == "end_to_end":
                    gpu_e2e.end_to_end_section(rec, clock, args, device)
                elif name == "distill":
                    gpu_e2e.distill_section(rec, clock, args, device)
            rec["status"] = "ok"
        except SectionTimeout as err:
            rec.update(status="timeout", error=str(err))
        except Exception as err:  # noqa: BLE001 - recorded; the next section still runs
            rec.update(status="error", error=f"{type(err).__name__}: {err}",
                       traceback=traceback.format_exc(limit=8).splitlines()[-12:])
            print(f"  {name} failed: {rec['error']}", flush=True)
        finally:
            rec["seconds"] = round(time.monotonic() - t0, 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["summary"] = summarize(results)
            write_json(out_json, results)
        print(f"=== {name}: {rec['status']} after {rec['seconds']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "gpu_bench.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no GPU (use --smoke on the CPU)")
        torch.backends.cudnn.benchmark = True
    log = open(args.out / "gpu_bench.log", "w")  # noqa: SIM115 - closed in the finally below
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(stdout, log), Tee(stderr, log)
    try:
        results: dict = {"meta": {
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(device),
            "versions": _versions(), "smoke": args.smoke, "budget_s": args.budget, "sections": args.sections,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }}
        print(f"{results['meta']['device']}  {results['meta']['versions']}", flush=True)
        _run_sections(args, results, out_json, device, deadline)
        results["meta"]["wall_s"] = round(time.monotonic() - start, 1)
        results["summary"] = summarize(results)
        write_json(out_json, results)
        print(_table(results), flush=True)
        print(f"wrote {out_json} ({results['meta']['wall_s']:.0f} s)", flush=True)
        return results
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        log.close()


if __name__ == "__main__":
    main()
