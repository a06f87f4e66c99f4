"""Is stage 3's input pipeline ever the bottleneck? The student's KD step (teacher forward, student forward and
backward, Adam) timed with batches from shards (`distill.sources.ShardBatches`: webdataset + DataLoader
workers decoding PNGs, random crops in the main process, uint8 to the device) against the same step on
batches already in device memory, in one run. Target (docs/design.md): shards within 10% of memory on the GPU.

The two sources are timed in alternating blocks of steps, so drift (clock boost, other load) hits both;
each block's time ends with a device synchronize. Per-step medians over the blocks give the ratio.

CPU smoke run (under a minute):  python bench/distill.py --device cpu --threads 1
GPU (the paper's setting):       python bench/distill.py --device cuda --crop 256 --batch-size 8 --num-workers 6 \\
                                     --teacher airnet --steps 120 --shard-images 256
Measured (one H200, bf16 autocast, crop 256, batch 8, 6 workers, tiny-SD shards of 256 images, 48 steps per
source): half-airnet with an airnet teacher 0.8607 s/step from memory, 0.8618 from shards (1.001); without the
teacher 0.6198 vs 0.6218 (1.003); the shard pipeline alone delivers a batch in 22 ms. The step itself is slow
(9-13 images/s): the bottleneck is AirNet's deformable convolutions, not the input.

With no --shards, it synthesizes its own round with the tiny SD (prompt mode "none", random smooth clean
photos) at the crop size into a temporary folder: the pixels are noise-like but the files, their sizes and
the decoding work are those of a real round at that size.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

# bench/ is not a package: put the repository root first so `import distill` finds the package.
import numpy as np
import torch
from d4ir.distill.losses import kd_loss
from d4ir.distill.registry import ARCHITECTURES, build, load_model
from d4ir.distill.sources import ShardBatches
from d4ir.distill.trainer import DistillConfig
from d4ir.synth.sd import default_device
from results import write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--student", default="auto",
                   help=f"registry name ({', '.join(ARCHITECTURES)}); auto: half-airnet on CUDA, restormer-12 on "
                   "the CPU (torchvision's CPU backward of AirNet's deformable convolutions takes ~35 s per "
                   "half-airnet step at 64x64)")
    p.add_argument("--teacher", default="none",
                   help="registry name (random weights), a checkpoint path, or none (student step only)")
    p.add_argument("--crop", type=int, default=32, help="training crop side (paper: 256)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="timed steps per source (split into blocks)")
    p.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per source")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per source first")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding the shards")
    p.add_argument("--shards", type=Path, default=None, help="an existing round folder (RUN/shards/round-NNN)")
    p.add_argument("--shard-images", type=int, default=32, help="images to synthesize when --shards is not given")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json-out", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def make_round(out: Path, *, size: int, images: int, shard_size: int, device: str) -> Path:
    """Synthesize a round with the tiny SD from random smooth photos (no stage 1: prompt mode "none")."""
    from d4ir.synth.ccd import CCDConfig
    from d4ir.synth.plan import SynthConfig
    from d4ir.synth.worker import synthesize
    from PIL import Image

    clean = out / "clean"
    clean.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(min(images, 16)):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(clean / f"c{i:02d}.png")
    config = SynthConfig(num_samples=images, shard_size=shard_size, batch_size=min(16, shard_size),
                         ccd=CCDConfig(steps=4, strength=0.5, size=size), prompt_mode="none")
    return synthesize(clean, out / "shards", config, sd_source="tiny", device=device, progress=False).round_dir


def _model(spec: str, device: str) -> torch.nn.Module:
    model = load_model(spec)[0] if Path(spec).suffix or Path(spec).exists() else build(spec)
    return model.to(device)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cuda = device.startswith("cuda")
    if args.student == "auto":
        args.student = "half-airnet" if cuda else "restormer-12"
    amp = cuda if args.amp == "auto" else args.amp == "on"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        t0 = time.perf_counter()
        shard_size = max(1, args.shard_images // max(2 * args.num_workers, 2))
        directory = args.shards or make_round(Path(tmp), size=-(-args.crop // 8) * 8, images=args.shard_images,
                                              shard_size=shard_size, device=device)
        synth_s = time.perf_counter() - t0
        config = DistillConfig(batch_size=args.batch_size, crop=args.crop, num_workers=args.num_workers, seed=0)
        batches = ShardBatches(directory, config)
        batches.set_epoch(0)

        torch.manual_seed(0)
        student = build(args.student).to(device).train()
        teacher = None if args.teacher == "none" else _model(args.teacher, device).eval().requires_grad_(False)
        opt = torch.optim.Adam(student.parameters(), lr=1e-4)
        rng = np.random.default_rng(0)
        # in memory: a handful of batches already on the device, cycled (no decode, no copy per step)
        memory = [batches.next(rng, device) for _ in range(4)]

        def step(x: torch.Tensor) -> None:
            """The trainer's plain KD step (DistillConfig.loss default: l2)."""
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    target = teacher(x) if teacher is not None else x
                loss = kd_loss(student(x), target, {"l2": 1.0})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sources = {"memory": lambda i: memory[i % len(memory)], "shards": lambda i: batches.next(rng, device)}
        for get in sources.values():
            for i in range(args.warmup):
                step(get(i))
        sync()
        per_block = max(1, args.steps // args.blocks)
        times: dict[str, list[float]] = {name: [] for name in sources}
        for _ in range(args.blocks):
            for name, get in sources.items():
                sync()
                t = time.perf_counter()
                for i in range(per_block):
                    step(get(i))
                sync()
                times[name].append((time.perf_counter() - t) / per_block)
        # the input pipeline alone: seconds per batch from the shards with no training step
        t = time.perf_counter()
        for _ in range(per_block):
            batches.next(rng, device)
        sync()
        load_only = (time.perf_counter() - t) / per_block

    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "student": args.student,
        "teacher": args.teacher,
        "crop": args.crop,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "amp": amp,
        "steps_per_source": per_block * args.blocks,
        "shards": str(args.shards) if args.shards else f"tiny SD, {args.shard_images} images ({synth_s:.1f} s)",
        "step_s": med,
        "step_s_blocks": times,
        "load_only_s": load_only,
        "ratio": med["shards"] / med["memory"],
    }
    rows = [("source", "s/step", "img/s"), *((n, f"{v:.4f}", f"{args.batch_size / v:.1f}") for n, v in med.items()),
            ("load only", f"{load_only:.4f}", f"{args.batch_size / load_only:.1f}")]
    print(f"{result['device']}: {args.student} (teacher {args.teacher}), crop {args.crop}, batch {args.batch_size}, "
          f"{args.num_workers} workers, amp {amp}")
    for row in rows:
        print(f"  {row[0]:<10} {row[1]:>10} {row[2]:>10}")
    verdict = "within" if result["ratio"] <= 1.10 else "NOT within"
    print(f"  shards / memory = {result['ratio']:.3f} ({verdict} the 10% target)")
    write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
