"""Do equal distill runs repeat? Two uninterrupted runs per thread count, each in a fresh process, compared.

Builds a tiny run once (drawn photos, stage 1 and 2 with the tiny SD, a small AirNet teacher), then runs the same
D4IR distillation (a Half-AirNet student, the joint phase with a regeneration round, 2 loader workers) `--repeats`
times at each of `--threads`, every run in its own child process. Prints the largest absolute difference of the
students' weights between the runs of one thread count (0 means bit-equal) and between the first runs of two
thread counts (not promised: CPU float sums depend on the split).

CPU (about a minute): python bench/repeat.py --threads 1,2 --json-out /tmp/bench/repeat.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results import write_json

DISTILL = dict(student="half", batch_size=4, crop=32, iters_per_epoch=3, feedback_batch=1, num_workers=2, epochs=3,
               joint_epochs=2, round_every=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="2", help="comma-separated torch thread counts (default: 2)")
    p.add_argument("--repeats", type=int, default=2, help="runs per thread count")
    p.add_argument("--json-out", type=Path, help="write the results here")
    p.add_argument("--child", nargs=3, metavar=("BASE", "OUT", "THREADS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _photos(folder: Path, n: int, rng: np.random.Generator, side: int = 48) -> Path:
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
        img = c0 * (1 - (x + y)[..., None] / 2) + c1 * ((x + y)[..., None] / 2) + rng.normal(0, 12, (side, side, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def build(base: Path) -> None:
    """The tiny run: RUN/prompts, RUN/shards/round-000 (8 images), RUN/teacher."""
    from d4ir.distill.registry import build as build_model
    from d4ir.distill.registry import save_model
    from d4ir.shards.layout import RunLayout
    from d4ir.synth.ccd import CCDConfig
    from d4ir.synth.moco import MoCoConfig
    from d4ir.synth.plan import SynthConfig
    from d4ir.synth.prompts import PromptsConfig, train_prompts
    from d4ir.synth.sd import load_sd_cached
    from d4ir.synth.worker import synthesize

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    degraded, clean = _photos(base / "degraded", 8, rng), _photos(base / "clean", 8, rng)
    run = RunLayout(base / "run")
    prompts = PromptsConfig(prompt_tokens=4, feat_dim=8, widths=(4, 8, 8), token_rank=4, steps=2, batch_size=4,
                            crop=16, moco=MoCoConfig(queue_size=4), embed_side=32)
    train_prompts(degraded, load_sd_cached("tiny", "cpu", "float32"), run.prompts, prompts, progress=False)
    synth = SynthConfig(num_samples=8, shard_size=4, batch_size=4,
                        ccd=CCDConfig(steps=4, strength=0.5, size=32))
    synthesize(clean, run.shards, synth, sd_source="tiny", prompts_dir=run.prompts, progress=False)
    torch.manual_seed(0)
    teacher = build_model("airnet", n_feats=8, n_groups=1, n_blocks=1, queue_size=16)
    save_model(run.teacher_dir / "teacher", teacher)


def child(base: Path, out: Path, threads: int) -> None:
    """One distillation into a copy of the tiny run, at `threads` torch threads."""
    import shutil

    from d4ir.distill.trainer import DistillConfig, distill

    torch.set_num_threads(threads)
    shutil.copytree(base / "run", out)
    distill(out, out / "teacher" / "teacher.safetensors", DistillConfig(**DISTILL), degraded_dir=base / "degraded",
            clean_dir=base / "clean", name="s", progress=False)


def max_diff(a: Path, b: Path) -> float:
    from d4ir.shards.io import load_weights

    wa, wb = (load_weights(p / "students" / "s" / "student")[0] for p in (a, b))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return {}
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        build(base)
        runs: dict[int, list[Path]] = {}
        for t in threads:
            for i in range(args.repeats):
                out = base / f"t{t}-{i}"
                subprocess.run([sys.executable, __file__, "--child", str(base), str(out), str(t)], check=True)
                runs.setdefault(t, []).append(out)
        result = {"distill": DISTILL, "torch": torch.__version__,
                  "same_threads": {t: [max_diff(r[0], o) for o in r[1:]] for t, r in runs.items()},
                  "across_threads": {f"{a} vs {b}": max_diff(runs[a][0], runs[b][0])
                                     for a, b in zip(threads, threads[1:])}}
    print("| threads | runs | max abs weight difference between them |")
    print("|---|---|---|")
    for t, diffs in result["same_threads"].items():
        print(f"| {t} | {args.repeats} | {max(diffs, default=0.0):.3g} |")
    for pair, d in result["across_threads"].items():
        print(f"| {pair} | 1 each | {d:.3g} |")
    if args.json_out:
        write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
