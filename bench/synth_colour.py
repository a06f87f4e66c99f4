"""Where the synthesized images lose their colour: the generator or the pipeline?

On the demo's web clean photos (or --clean DIR), the colour statistics of pipelines/rounds.colour_stats
(saturation = mean max-min over RGB, channel means) at each step a synthesized image goes through:

  source        the photos as stored (96x96)
  prepared      synth.ccd.prepare_clean at the LDM's 64x64 (what the pipeline hands the generator)
  vae           the VAE's round trip of the prepared image (posterior mean, decoded)
  ccd "a photo" CCD at the demo's settings (T = 10, lambda = 0.5) with the caption "a photo"
  ccd rain      the same with the rain caption (synth.plan.WEATHER_TEXT["derain"])
  ccd learned   the same with stage 1's learned prompts (--prompts RUN/prompts: image i takes row i mod rows),
                as round 0 of a run synthesizes

A run's round 0 (learned prompts, the report's colour table) set against these rows tells whether the
pipeline's prompts wash colour beyond what the generator does with its own captions.

    python bench/synth_colour.py --out /tmp/synth-colour      (about a minute on one CPU thread)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from d4ir.pipelines.demo_data import build_demo_data
from d4ir.pipelines.rounds import colour_stats
from d4ir.shards.embeddings import load_embeddings
from d4ir.shards.folders import scan_images
from d4ir.shards.images import read_rgb
from d4ir.synth.ccd import CCDConfig, ccd_sample, prepare_clean
from d4ir.synth.plan import WEATHER_TEXT
from d4ir.synth.sd import load_sd


def _uint8(x: torch.Tensor) -> list[np.ndarray]:
    """[B,3,H,W] in [0,1] -> B uint8 [H,W,3]."""
    return list((x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clean", type=Path, help="clean photos (default: the demo's web_clean, built under OUT)")
    ap.add_argument("--sd", default="weather")
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--prompts", type=Path, help="a run's stage-1 prompts folder (embeddings.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    clean_dir = args.clean or build_demo_data(args.out / "data", tasks=("derain",), progress=False) / "derain" / \
        "web_clean"
    images = [read_rgb(p, min_side=1) for p in scan_images(clean_dir).paths[: args.limit]]
    parts = load_sd(args.sd)
    cfg = CCDConfig(steps=10, strength=0.5, size=64)
    x = torch.stack([prepare_clean(img, cfg.size) for img in images])  # [N,3,64,64]
    z = parts.vae.encode(x * 2 - 1).latent_dist.mean
    vae = (parts.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
    rows = {"source": colour_stats(images), "prepared": colour_stats(_uint8(x)), "vae": colour_stats(_uint8(vae))}
    for label, caption in (("ccd 'a photo'", "a photo"), ("ccd rain", WEATHER_TEXT["derain"])):
        gens = [torch.Generator().manual_seed(args.seed * 100_003 + i) for i in range(len(x))]
        rows[label] = colour_stats(_uint8(ccd_sample(parts, x, parts.encode_text([caption]), gens, cfg)))
    if args.prompts:
        embeds = load_embeddings(args.prompts).prompt_embeds.float()
        learned = embeds[torch.arange(len(x)) % len(embeds)].to(parts.dtype)  # [N,L,D]
        gens = [torch.Generator().manual_seed(args.seed * 100_003 + i) for i in range(len(x))]
        rows["ccd learned"] = colour_stats(_uint8(ccd_sample(parts, x, learned, gens, cfg)))
        rows["ccd learned"]["prompt_norm"] = float(learned.norm(dim=-1).mean())
        rows["ccd rain"]["prompt_norm"] = float(parts.encode_text([WEATHER_TEXT["derain"]]).norm(dim=-1).mean())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synth_colour.json").write_text(json.dumps(rows, indent=1) + "\n")
    base = rows["prepared"]["saturation"]
    print("| step | saturation | x prepared | R | G | B |\n|---|---|---|---|---|---|")
    for label, s in rows.items():
        print(f"| {label} | {s['saturation']:.3f} | {s['saturation'] / base:.2f} | {s['r']:.3f} | {s['g']:.3f} | "
              f"{s['b']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
