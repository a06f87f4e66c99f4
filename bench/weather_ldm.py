"""Measure a weather LDM (default: the shipped "weather" model) on held-out photos it never saw in training.

1. VAE reconstruction: PSNR of D(E(x)) on the held-out crops (clean and in each weather), how much of each
   weather's statistic survives the round trip, low-pass PSNR (`pipelines.weather_sd.vae.evaluate_vae`).
2. Text to weather: CCD (synth.ccd.ccd_sample, SDEdit) at lambda = --strength with each weather caption
   against "a photo" on the held-out clean crops, the three weather statistics of each output (a 3 x 3 table:
   row = caption, column = statistic, entry = mean change over "a photo"), and content kept (PSNR/SSIM of a
   low-pass of the output against the clean source) (`pipelines.weather_sd.probe.caption_effects`).

Writes OUT/weather_ldm.json and prints markdown tables; with --grid also OUT/weather_ldm.png (clean | a photo
| rain | haze | snow captions, one row per crop).

    python bench/weather_ldm.py --out /tmp/weather_ldm            (the shipped model; about 2 minutes on 1 CPU)
    python bench/weather_ldm.py --sd /tmp/wsd/model --out /tmp/x  (a freshly trained folder)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from d4ir.pipelines.weather_sd.data import CAPTIONS, WeatherSetConfig, build_weather_set
from d4ir.pipelines.weather_sd.probe import caption_effects, clean_crops, sample_caption
from d4ir.pipelines.weather_sd.vae import STAT_OF_WEATHER, evaluate_vae
from d4ir.synth.ccd import CCDConfig
from d4ir.synth.sd import load_sd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd", default="weather", help="a load_sd spec (default: the shipped weather model)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--crops", type=int, default=16, help="held-out crops per held-out photo (x3 photos)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20], help="CCD's T (one table per value)")
    p.add_argument("--strength", type=float, default=0.5, help="CCD's lambda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", type=int, default=6, help="crops in the sample grid (0: none)")
    p.add_argument("--ship", action="store_true",
                   help="copy the measured --sd folder into the package (synth/weights/weather-ldm) with its card")
    p.add_argument("--train-dir", type=Path, default=None,
                   help="with --ship: the training folder (its command.txt and wall time go into the card)")
    p.add_argument("--notes", type=Path, default=None,
                   help="with --ship: JSON {\"can\": [...], \"cannot\": [...]} for the card, written after looking")
    args = p.parse_args(argv)
    if args.ship and (args.sd in ("weather", "tiny", "sd15-layout") or not Path(args.sd).is_dir()):
        p.error("--ship needs --sd naming a trained diffusers folder")
    return args


def ship_model(args: argparse.Namespace, result: dict) -> Path:
    """Copy the measured folder into the package with its model card and files.json."""
    from d4ir.pipelines.weather_sd.ship import ship
    from d4ir.synth.sd import WEATHER_DIR

    info = json.loads((Path(args.sd) / "training.json").read_text())
    if args.train_dir is not None:
        command = args.train_dir / "command.txt"
        trained = Path(args.sd) / "training.json"
        if command.is_file():
            minutes = (trained.stat().st_mtime - command.stat().st_mtime) / 60 if trained.is_file() else None
            wall = f"\n# wall time {minutes:.0f} min (command.txt to training.json)" if minutes else ""
            info["command"] = command.read_text().strip() + wall
    measure = (f"python bench/weather_ldm.py --sd <trained folder> --out <dir> --crops {args.crops} --steps "
               + " ".join(map(str, args.steps)) + f" --strength {args.strength} --seed {args.seed}")
    info["quality"] = (f"Held-out photos only (chelsea, camera, brick; never trained on), measured with\n`{measure}`"
                       f" ({result['seconds']:.0f} s):\n\n" + tables(result))
    info["use"] = ('`synth.sd.load_sd("weather")` (offline; the demo\'s and the CPU benchmarks\' default), 64x64 '
                   "images, CCD/SDEdit (`synth.ccd.ccd_sample`) at lambda about 0.5 with T = 10 or 20, or the "
                   "captions below through `parts.encode_text`.")
    if args.notes is not None:
        info.update(json.loads(args.notes.read_text()))
    info["measurements"] = {k: v for k, v in result.items() if k != "sd"}
    return ship(args.sd, WEATHER_DIR, info)


def tables(result: dict) -> str:
    """Markdown tables of a result."""
    v = result["vae"]
    by = v["psnr_by_weather"]
    lines = ["| VAE round trip | PSNR | clean | rain | haze | snow | low-pass PSNR | rain kept | haze kept "
             "| snow kept |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| {result['sd']} | {v['psnr']:.2f} | {by['clean']:.2f} | {by['derain']:.2f} | {by['dehaze']:.2f} | "
             f"{by['desnow']:.2f} | {v['lowpass_psnr']:.2f} | "
             + " | ".join(f"{v['survival'][w]['survival']:.2f}" for w in STAT_OF_WEATHER) + " |", ""]
    for probe in result["ccd"]:
        lines += [f"CCD T = {probe['steps']}, lambda = {probe['strength']}, {probe['n_images']} held-out crops; "
                  "entries: mean change of each statistic over the \"a photo\" output (physical: the training "
                  "renders' own change over the clean crop):", "",
                  "| caption | rain streak | haze dark ch. | snow blobs/1000px | own stat raised | physical | "
                  "low-pass PSNR | low-pass SSIM |", "|---|---|---|---|---|---|---|---|",
                  f"| a photo | 0 | 0 | 0 | - | - | {probe['photo']['lowpass_psnr']:.2f} | "
                  f"{probe['photo']['lowpass_ssim']:.3f} |"]
        for w in STAT_OF_WEATHER:
            r = probe[w]
            cross = " | ".join(f"{r['cross'][s]:+.4f}" for s in STAT_OF_WEATHER.values())
            lines.append(f"| {w} | {cross} | {100 * r['raised']:.0f}% | {r['physical']:+.4f} | "
                         f"{r['lowpass_psnr']:.2f} | {r['lowpass_ssim']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def save_grid(parts, held, n: int, steps: int, strength: float, seed: int, path: Path) -> None:
    from d4ir.pipelines.grid import sample_grid

    x, _ = clean_crops(held, n)
    config = CCDConfig(steps=steps, strength=strength, size=int(x.shape[-1]))
    with torch.no_grad():
        outs = [sample_caption(parts, x, CAPTIONS[w], config, seed) for w in CAPTIONS]
    to8 = lambda t: (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    rows = [[to8(x[i])] + [to8(o[i]) for o in outs] for i in range(len(x))]
    sample_grid(rows, path, labels=["clean", *(f"'{CAPTIONS[w]}'" for w in CAPTIONS)], cell=96)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = load_sd(args.sd)
    held = build_weather_set(WeatherSetConfig("held_out", args.crops, 64, args.seed))
    result = {"sd": args.sd, "fingerprint": parts.fingerprint, "held_out_items": len(held),
              "vae": evaluate_vae(parts.vae, held)}
    result["ccd"] = [caption_effects(parts, held, n_images=len(held.where("clean")), steps=t,
                                     strength=args.strength, seed=args.seed) for t in args.steps]
    if args.grid:
        save_grid(parts, held, args.grid, args.steps[0], args.strength, args.seed, args.out / "weather_ldm.png")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "weather_ldm.json").write_text(json.dumps(result, indent=1) + "\n")
    print(tables(result))
    print(f"{result['seconds']:.0f} s; {args.out / 'weather_ldm.json'}")
    if args.ship:
        print(f"shipped: {ship_model(args, result)}")
    return result


if __name__ == "__main__":
    main()
