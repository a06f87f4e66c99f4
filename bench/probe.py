"""Do the prompt encoder's features see degradation? (stage 1's evidence, recorded in docs/benchmarks.md)

Trains the prompt encoder (stage 1, `train_prompts`) on the demo's web degraded images of all three tasks mixed
(rain, haze and snow, unlabelled), then scores frozen contrastive features of crops from the held-out demo
*test* images with a leave-one-image-out nearest-neighbour probe (`synth.probe.probe`), against an untrained
encoder of the same shape and against chance (1/3). Writes a PCA plot of the features coloured by type.

    .venv/bin/python bench/probe.py --out /tmp/d4ir_probe     (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from d4ir.pipelines.demo_data import build_demo_data
from d4ir.pipelines.figures import probe_plot
from d4ir.shards.folders import list_files
from d4ir.synth.embed import load_prompt_encoder
from d4ir.synth.moco import MoCoConfig
from d4ir.synth.probe import probe
from d4ir.synth.prompt_encoder import PromptEncoder
from d4ir.synth.prompts import PromptsConfig, train_prompts
from d4ir.synth.sd import load_sd

TYPES = {"rain": "derain", "haze": "dehaze", "snow": "desnow"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/demo"), help="demo data (built if missing)")
    p.add_argument("--out", type=Path, default=Path("/tmp/d4ir_probe"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sd", default="weather",
                   help="the SD whose empty-text prompt and width the encoder is built around (weather: shipped)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    build_demo_data(args.data, progress=False)
    mixed = args.out / "web_degraded"
    for name, task in TYPES.items():  # copies, not links: the folder scan does not follow links
        dst = mixed / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in list_files(args.data / task / "web_degraded"):
            shutil.copy2(f, dst / f.name)
    config = PromptsConfig(steps=args.steps, batch_size=32, crop=args.crop, moco=MoCoConfig(queue_size=64),
                           prompt_tokens=8, embed_side=64, seed=args.seed)
    train_prompts(mixed, load_sd(args.sd), args.out / "prompts", config, resume=True, progress=False)
    held_out = {name: list_files(args.data / task / "test" / "degraded") for name, task in TYPES.items()}
    trained = load_prompt_encoder(args.out / "prompts")
    torch.manual_seed(args.seed)
    untrained = PromptEncoder(**trained.config)
    results = {name: probe(enc, held_out, crop=args.crop) for name, enc in (("trained", trained),
                                                                             ("untrained", untrained))}
    for name, res in results.items():
        probe_plot(res, args.out / f"probe_{name}.png")
        res.pop("points"), res.pop("labels")
    results["seconds"] = time.perf_counter() - t0
    results["settings"] = vars(args) | {"data": str(args.data), "out": str(args.out)}
    (args.out / "probe.json").write_text(json.dumps(results, indent=2, default=str))
    for k in ("trained", "untrained"):
        r = results[k]
        print(f"{k:>9}: accuracy {r['accuracy']:.3f} (chance {r['chance']:.3f}), per type "
              + ", ".join(f"{t} {a:.2f}" for t, a in r["per_type"].items()) + f"; {r['num_crops']} crops")
    print(f"plot: {args.out / 'probe_trained.png'}  ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
