"""Do prompt-encoder prompts move the synthesized images toward the web degradation, and does the KD feedback
move them further? Measured on the demo's data of one task (default derain) with the shipped weather LDM.

Runs (or reuses, everything resumes) the demo's steps up to the D4IR student: teacher, stage 1 (prompt
encoder on the web degraded images), stage 2 round 0, stage 3 with its joint phase and regeneration rounds
(the demo preset's stage configs; a run folder of its own, not the `d4ir demo` experiments folder). It also
synthesizes two reference rounds from the same clean photos with the same per-sample seeds: prompt mode "none" (the
empty text, the model's unconditional output) and "text" (the task's weather caption). Then for every round
and every sample, with x the clean source prepared as the synthesis prepares it (`prepare_clean`, 64 px) and
y the synthesized image, it reports the mean over samples of

    delta_s = s(y) - s(x)      for s in rain streak energy, haze dark channel, snow blob density
                               (pipelines/weather_sd/stats.py)
    content = PSNR / SSIM of the low-pass of y against x

and the web target: mean s(web degraded) - mean s(web clean), both prepared the same way (the folders are
unpaired, so only the means compare). "Toward the web degradation" = delta_s of the task's statistic moves
from the "none" round toward the target; `toward` = (delta - delta_none) / (target - delta_none).

    python bench/prompt_effect.py --data /tmp/demo-data --run /tmp/demo-ldm2     (reuses a finished demo run)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from d4ir.pipelines.demo_data import build_demo_data
from d4ir.pipelines.presets import preset
from d4ir.pipelines.weather_sd.stats import content_kept, weather_stats
from d4ir.pipelines.weather_sd.vae import STAT_OF_WEATHER
from d4ir.shards.folders import list_files
from d4ir.shards.images import read_rgb
from d4ir.shards.layout import RunLayout, round_dir, rounds_in
from d4ir.shards.reader import iter_samples
from d4ir.synth.ccd import prepare_clean
from d4ir.synth.plan import WEATHER_TEXT

SD_SPEC = "weather"  # the shipped weather LDM (the demo's generator, configs/demo.json)
STATS = tuple(STAT_OF_WEATHER.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/demo-data"), help="demo data (built if missing)")
    p.add_argument("--run", type=Path, default=Path("/tmp/prompt-effect"), help="the run folder (a demo run works)")
    p.add_argument("--task", choices=sorted(STAT_OF_WEATHER), default="derain")
    p.add_argument("--sd", default=SD_SPEC)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default RUN/prompt_effect.json)")
    return p.parse_args(argv)


def run_steps(args: argparse.Namespace) -> tuple[RunLayout, Path]:
    """The demo's teacher, prompts, synth round 0 and D4IR student (each skipped when already done)."""
    from d4ir.distill.teacher import train_supervised
    from d4ir.distill.trainer import distill
    from d4ir.synth.prompts import train_prompts
    from d4ir.synth.sd import load_sd_cached
    from d4ir.synth.worker import synthesize

    build_demo_data(args.data, seed=args.seed, progress=False)
    task, layout = args.data / args.task, RunLayout(args.run)
    t_cfg = replace(preset("demo", "teacher"), arch="airnet", seed=args.seed)
    train_supervised(task / "original", layout.teacher_dir, t_cfg, val_dir=task / "test", resume=True, progress=False)
    sd = load_sd_cached(args.sd, "cpu", "float32")
    train_prompts(task / "web_degraded", sd, layout.prompts, replace(preset("demo", "prompts"), seed=args.seed),
                  resume=True, progress=False)
    s_cfg = replace(preset("demo", "synth"), seed=args.seed)
    synthesize(task / "web_clean", layout.shards, s_cfg, sd_source=args.sd, prompts_dir=layout.prompts,
               progress=False)
    d_cfg = replace(preset("demo", "distill"), student="half", seed=args.seed)
    distill(layout.root, layout.teacher_weights, d_cfg, name="d4ir", sd_source=args.sd,
            degraded_dir=task / "web_degraded", clean_dir=task / "web_clean", original_dir=task / "original",
            val_dir=task / "test", resume=True, progress=False)
    refs = args.run / "prompt_effect_refs"
    for mode in ("none", "text"):
        cfg = replace(s_cfg, prompt_mode=mode, text=WEATHER_TEXT[args.task])
        synthesize(task / "web_clean", refs / mode, cfg, sd_source=args.sd, progress=False)
    return layout, refs


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1) for i in images]).float() / 255


def prepared(path: str | Path, size: int) -> torch.Tensor:
    """[3,size,size] in [0,1]: the photo as the synthesis sees it."""
    return prepare_clean(read_rgb(path, min_side=1), size)


def measure_round(directory: Path) -> dict:
    """Mean statistic changes and content kept of one round's samples against their clean sources."""
    samples = list(iter_samples(directory))
    y = _batch([s["degraded"] for s in samples])
    x = torch.stack([prepared(s["meta"]["clean"], int(y.shape[-1])) for s in samples])
    sy, sx = weather_stats(y), weather_stats(x)
    kept = content_kept(y, x)
    return {"n": len(samples), **{f"delta_{s}": float((sy[s] - sx[s]).mean()) for s in STATS},
            "lowpass_psnr": float(kept["psnr"].mean()), "lowpass_ssim": float(kept["ssim"].mean())}


def web_target(task_dir: Path, size: int) -> dict:
    """Mean statistic of the web degraded minus that of the web clean images (both prepared to `size`)."""
    deg = torch.stack([prepared(p, size) for p in list_files(task_dir / "web_degraded")])
    cln = torch.stack([prepared(p, size) for p in list_files(task_dir / "web_clean")])
    sd, sc = weather_stats(deg), weather_stats(cln)
    return {f"delta_{s}": float(sd[s].mean() - sc[s].mean()) for s in STATS}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    layout, refs = run_steps(args)
    size = preset("demo", "synth").ccd.size
    stat = STAT_OF_WEATHER[args.task]
    rows = {"none (empty text)": measure_round(round_dir(refs / "none", 0)),
            f"text ('{WEATHER_TEXT[args.task]}')": measure_round(round_dir(refs / "text", 0)),
            "encoder, round 0 (stage 1 prompts)": measure_round(layout.round_shards(0))}
    for n in rounds_in(layout.shards_root("d4ir")):
        if n > 0:
            rows[f"encoder, round {n} (after KD feedback)"] = measure_round(layout.round_shards(n, "d4ir"))
    target = web_target(args.data / args.task, size)
    base = rows["none (empty text)"][f"delta_{stat}"]
    for r in rows.values():
        gap = target[f"delta_{stat}"] - base
        r["toward"] = (r[f"delta_{stat}"] - base) / gap if gap else float("nan")
    result = {"task": args.task, "stat": stat, "sd": args.sd, "size": size, "web_target": target, "rounds": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    out = args.out or args.run / "prompt_effect.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| {args.task} samples | n | " + " | ".join(f"d {s}" for s in STATS) + f" | toward web ({stat}) | "
          "low-pass PSNR | low-pass SSIM |")
    print("|---|---|" + "---|" * (len(STATS) + 3))
    print("| web degraded - web clean (target) | - | " + " | ".join(f"{target[f'delta_{s}']:+.4f}" for s in STATS)
          + " | 1 | - | - |")
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | " + " | ".join(f"{r[f'delta_{s}']:+.4f}" for s in STATS)
              + f" | {r['toward']:.2f} | {r['lowpass_psnr']:.2f} | {r['lowpass_ssim']:.3f} |")
    print(f"{result['seconds']:.0f} s; {out}")
    return result


if __name__ == "__main__":
    main()
