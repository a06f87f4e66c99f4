"""The Procedural row's data: this project's physical weather renderer (pipelines.weather) applied to the web clean
photos, no diffusion and no prompts. It is the first thing a practitioner would try instead of D4IR and is not in
the paper: the report names it as this project's baseline.

For a like-for-like comparison with D4IR's round 0 the folder holds as many images as a synthesized round
(SynthConfig.num_samples), each from a web clean photo drawn with the seed and cut by the same rule as the
synthesis (`synth.ccd.prepare_clean`: shorter side to CCDConfig.size, central square), then rendered with the
task's weather at a random level: rain at a random strength ("light" or "heavy", each layer with its own random
angle, length and density), haze with a random scattering coefficient and airlight, snow at a random level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from d4ir.shards.folders import scan_images
from d4ir.shards.images import read_rgb, save_png
from d4ir.synth.ccd import prepare_clean

from .data_common import render
from .steps import Context, marked

LEVELS = {"derain": ("light", "heavy"), "desnow": ("light", "medium", "heavy"), "dehaze": (None,)}


def render_folder(clean_dir: Path, out: Path, *, weather: str, count: int, size: int, seed: int) -> dict:
    """Write `count` PNGs `proc-NNNNNN.png` into `out`: weather rendered on seeded draws of `clean_dir`'s photos.

    Args:
        weather: derain, dehaze or desnow (for an all-in-one task, each image draws one of them).
        size: the side the photos are cut to (the synthesis' CCDConfig.size).
    Returns:
        {"images": count, "photos": usable photos, "levels": {level: images}}.
    """
    paths = scan_images(clean_dir, min_side=32).paths
    if not paths:
        raise ValueError(f"{clean_dir}: no usable web clean photo to render the Procedural row's data from")
    out.mkdir(parents=True, exist_ok=True)
    weathers = tuple(LEVELS) if weather == "all" else (weather,)
    rng = np.random.default_rng([seed, 0x9B0C])
    photo_idx = rng.integers(0, len(paths), count)
    levels: dict[str, int] = {}
    for i, p in enumerate(photo_idx):
        w = weathers[int(rng.integers(len(weathers)))]
        level = LEVELS[w][int(rng.integers(len(LEVELS[w])))]
        clean = prepare_clean(read_rgb(paths[p], min_side=32), size)  # [3, size, size] in [0, 1]
        arr = np.round(clean.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        kwargs = {"level": level} if level is not None else {}
        save_png(out / f"proc-{i:06d}.png", render(w, arr, np.random.default_rng([seed, i, 0x9B0C]), **kwargs))
        name = f"{w}:{level or 'random'}"
        levels[name] = levels.get(name, 0) + 1
    return {"images": count, "photos": len(paths), "levels": levels}


def procedural_folder(ctx: Context, task: str) -> Path:
    """The task's Procedural images in OUT/TASK/inputs/procedural, rendered once (a marked step)."""
    out, clean = ctx.paths.inputs(task, "procedural"), ctx.folder(task, "web_clean")
    synth = ctx.stage("synth")
    settings = {"clean": str(clean), "weather": ctx.config.tasks[task].weather, "count": synth.num_samples,
                "size": synth.ccd.size, "seed": ctx.config.seed}

    def run() -> dict:
        return render_folder(clean, out, weather=settings["weather"], count=settings["count"], size=settings["size"],
                             seed=settings["seed"])

    marked(ctx.marker(task, "procedural"), settings, run, title=f"{task}: Procedural images (physical renderer)",
           log=ctx.log)
    return out
