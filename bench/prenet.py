"""Full-width PReNet on Rain100L test images: the straightforward forward against the fast one, side by side,
and the KD step of a half PReNet student.

Inference: the official PReNet6 weights, each image run through `distill.inference.restore` (the path of
`d4ir eval`) with `model.fast = False` (the paper's module-by-module forward: four gate convs, torch's
convs) and `model.fast = True` (fused gates, NNPACK Winograd convs, in-place ops), alternately, after one
untimed warm-up pass of each; seconds per image, the ratio, and the largest |fast - plain| of the outputs.
The issue's target: at most 1.5 s per 480x320 image with 2 threads on the 2-core CPU (a straightforward
implementation takes about 2.4 s there on a quiet machine).

KD step: teacher PReNet6 (frozen, no_grad, fast) on a batch of 16 random 64x64 crops of the rainy images, the
half-prenet student (16 channels, 6 stages) forward + L2 + backward + Adam step; median of --kd-steps steps
after one warm-up step, teacher and student parts timed separately.

Run on a quiet machine (the numbers of a loaded one are meaningless; ratios are what this script is for):
    python bench/prenet.py --images 5 --threads 2 --json-out bench_results/prenet.json
Smoke test: python bench/prenet.py --images 2 --kd-steps 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from results import write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_WEIGHTS = SHARED / "weights/PReNet/logs/Rain100L/PReNet6/net_latest.pth"
DEFAULT_PAIRS = SHARED / "data/rain100l_test"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="official PReNet6 net_latest.pth")
    p.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="Rain100L test set")
    p.add_argument("--images", type=int, default=5, help="first N test images (sorted by name)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--kd-steps", type=int, default=5, help="timed KD steps (0: skip the KD step)")
    p.add_argument("--kd-batch", type=int, default=16)
    p.add_argument("--kd-crop", type=int, default=64)
    p.add_argument("--json-out", type=Path)
    return p.parse_args(argv)


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def bench_inference(model, images: list[tuple[str, torch.Tensor]]) -> list[dict]:
    """Per image: seconds of the plain and the fast forward (alternating), and their largest difference."""
    from d4ir.distill.inference import restore

    rows = []
    for k, (name, x) in enumerate(images):
        outs, secs = {}, {}
        for fast in (False, True) if k % 2 == 0 else (True, False):  # alternate which one runs first
            model.fast = fast
            if k == 0:
                restore(model, x)  # warm-up: allocator, NNPACK's workspace, the fused-gate cache
            with torch.inference_mode():
                secs[fast], outs[fast] = _timed(restore, model, x)
        rows.append({"name": name, "size": f"{x.shape[-1]}x{x.shape[-2]}", "plain_s": secs[False],
                     "fast_s": secs[True], "ratio": secs[False] / secs[True],
                     "max_abs_diff": float((outs[True] - outs[False]).abs().max())})
    model.fast = True
    return rows


def bench_kd_step(teacher, images: list[tuple[str, torch.Tensor]], steps: int, batch: int, crop: int) -> dict:
    """Median seconds of a KD step: teacher outputs (no_grad) and the student's forward/backward/step."""
    from d4ir.distill.losses import kd_loss
    from d4ir.distill.registry import build

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    student = build("half-prenet").train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    teacher.fast = True
    t_secs, s_secs = [], []
    for step in range(steps + 1):
        crops = []
        for i in rng.integers(0, len(images), batch):
            x = images[i][1]
            top, left = rng.integers(0, x.shape[-2] - crop + 1), rng.integers(0, x.shape[-1] - crop + 1)
            crops.append(x[0, :, top : top + crop, left : left + crop])
        x = torch.stack(crops)  # [B,3,crop,crop]
        with torch.no_grad():
            t_s, target = _timed(teacher, x)

        def student_step(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss = kd_loss(student(x), target, {"l2": 1.0})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        s_s, _ = _timed(student_step, x, target)
        if step:  # the first step is the warm-up
            t_secs.append(t_s)
            s_secs.append(s_s)
    t, s = statistics.median(t_secs), statistics.median(s_secs)
    return {"batch": batch, "crop": crop, "steps": steps, "teacher_s": t, "student_s": s, "step_s": t + s}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from d4ir.distill.registry import count_parameters, load_model
    from d4ir.shards.images import read_rgb, to_tensor
    from d4ir.shards.pairs import find_pairs

    torch.set_num_threads(args.threads)
    model, info = load_model(args.weights)
    pairs = list(find_pairs(args.pairs))[: args.images]
    images = [(p.name, to_tensor(read_rgb(p.degraded))[None]) for p in pairs]
    rows = bench_inference(model, images)
    plain = statistics.mean(r["plain_s"] for r in rows)
    fast = statistics.mean(r["fast_s"] for r in rows)
    result = {"threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "nnpack": bool(getattr(torch, "_nnpack_available", lambda: False)()),
              "params": count_parameters(model), "weights": str(args.weights), "images": rows,
              "mean_plain_s": plain, "mean_fast_s": fast, "mean_ratio": plain / fast}
    print(f"PReNet6 ({info['kwargs']}), {len(rows)} Rain100L images, {args.threads} threads, torch {torch.__version__}")
    print("| image | size | straightforward (s) | fast (s) | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['size']} | {r['plain_s']:.2f} | {r['fast_s']:.2f} | {r['ratio']:.2f} | "
              f"{r['max_abs_diff']:.1e} |")
    print(f"| mean | | {plain:.2f} | {fast:.2f} | {plain / fast:.2f} | |")
    if args.kd_steps:
        kd = bench_kd_step(model, images, args.kd_steps, args.kd_batch, args.kd_crop)
        result["kd_step"] = kd
        print(f"KD step (half-prenet student, batch {kd['batch']}, {kd['crop']}x{kd['crop']}, median of "
              f"{kd['steps']}): {kd['step_s']:.3f} s = teacher {kd['teacher_s']:.3f} s + student "
              f"fwd/bwd/step {kd['student_s']:.3f} s")
    write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
