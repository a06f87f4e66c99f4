"""The report's per-row measurements beyond the scores, and its fixed texts (pipelines/experiments/report.py).

- `latency_ms`: a model's CPU latency, milliseconds per LATENCY_SIDE x LATENCY_SIDE image (batch 1, one thread,
  PyTorch, median of LATENCY_REPS after one warm-up), measured once per architecture (its registry name and
  kwargs, or a foreign teacher's file) and kept in OUT/latency.json, so rows that share a student cost one run.
- `synth_section`: for every row that synthesizes (D4IR, M1-M5), the grid of its rounds (clean source | round 0 |
  later rounds) and the colour statistics of each round's images against their clean sources, the web degraded
  images and the test images (pipelines/rounds.py): where a colour cast or a grey wash comes from.
- `d4ir_sentence` and `DEMO_SCOPE`: the report's first paragraph (the README quotes DEMO_SCOPE word for word).
- `sd_caveat`: what the synthesized rows can say, for the SD that made them.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from d4ir.shards.folders import scan_images
from d4ir.shards.images import read_rgb
from d4ir.shards.io import atomic_write_json
from d4ir.shards.pairs import find_pairs

from ..rounds import colour_stats, round_colours, rounds_grid, student_rounds
from .inputs import slug

LATENCY_SIDE, LATENCY_REPS = 128, 3
SYNTH_ROWS = ("D4IR", "M1", "M2", "M3", "M4", "M5")

TINY_SD_NOTE = (
    "The SD here is `tiny`: randomly initialised (no weights are downloaded), so every synthesized image (D4IR, "
    "M1-M5) is structured noise, not weather. Those rows test the plumbing, the file contracts and the timings; "
    "they say nothing about the quality the method reaches with a real Stable Diffusion.")

WEATHER_SD_NOTE = (
    "The SD here is the project's embedded weather LDM (`weather`, synth/weights/weather-ldm; its model card "
    "states what it can do): a 64x64 latent diffusion model trained for 48 minutes on one CPU thread. It keeps "
    "the clean photo's layout and its rain caption adds rain streaks, but it adds almost no haze or snow, and its "
    "VAE pulls colour toward the palette it was trained on (photos with a tint it never saw lose most of their "
    "saturation: the colour statistics above measure it), so the D4IR and M1-M5 rows measure "
    "the method with a weak synthesis model; they neither confirm nor refute the paper's ranking, which was "
    "measured with Stable Diffusion at 256x256.")

# The demo's scope, quoted word for word by README.md (tests/test_readme.py checks it).
DEMO_SCOPE = (
    "The demo can show that every stage runs end to end on a CPU, offline, and how the rows compare when a teacher "
    "that restores (a small PRN shipped with d4ir, trained by bench/train_demo_teacher.py) is distilled into a "
    "student of a quarter of its parameters through a weak generator (the 64x64 weather LDM, which keeps a photo's "
    "layout and most of its colour but adds only faint rain). It cannot show the paper's ranking: one seed, 16 test "
    "images of 96x96 and students trained for a minute or two, so differences of a few tenths of a dB between rows "
    "are within noise.")


def sd_caveat(sd: str) -> str:
    """What the synthesized rows can say, for the SD the config (or a run's round 0) names."""
    if sd == "tiny":
        return TINY_SD_NOTE
    if sd == "weather":
        return WEATHER_SD_NOTE
    return (f"The SD here is `{sd}`; the D4IR and M1-M5 rows carry as far as that model, this data and this "
            "training budget do.")


def d4ir_sentence(scores: dict[str, dict]) -> str | None:
    """One sentence placing the D4IR row against M0 and Data (RGB PSNR against ground truth, and against the
    teacher when recorded), from the rows' eval.json contents keyed by row name; None when one is missing."""
    if not all(scores.get(k) for k in ("D4IR", "M0", "Data")):
        return None
    rows = {k: scores[k] for k in ("D4IR", "M0", "Data")}
    d, m, o = (rows[k]["mean"]["psnr"] for k in rows)
    ref = ""
    if all("ref_psnr" in r["mean"] for r in rows.values()):
        ref = (f"; against the teacher's outputs {rows['D4IR']['mean']['ref_psnr']:.2f} vs "
               f"{rows['M0']['mean']['ref_psnr']:.2f} and {rows['Data']['mean']['ref_psnr']:.2f} dB")
    than_web = "at least as well as" if d >= m else "less well than"
    return (f"D4IR scores {d:.2f} dB against ground truth, {d - m:+.2f} dB from M0 ({m:.2f} dB) and {d - o:+.2f} dB "
            f"from Data ({o:.2f} dB){ref}: in this run the synthesized images trained the student {than_web} the "
            f"web degraded photos themselves ({rows['D4IR'].get('count', '?')} test images).")


def latency_ms(out: Path, model: str | Path) -> float | None:
    """CPU milliseconds per LATENCY_SIDE^2 image of `model` (a checkpoint or teacher spec), measured once per
    architecture and cached in OUT/latency.json; None for the identity (the Input row)."""
    import torch
    from d4ir.distill.evaluate import IDENTITY
    from d4ir.distill.teachers import load_teacher

    if str(model) == IDENTITY:
        return None
    net, info = load_teacher(model, probe=False)
    key = json.dumps([info.registry["arch"], info.registry["kwargs"]], sort_keys=True) if info.registry else \
        json.dumps(info.record(), sort_keys=True, default=str)
    cache_file = out / "latency.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if key not in cache:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        x = torch.rand(1, 3, LATENCY_SIDE, LATENCY_SIDE)
        times = []
        try:
            with torch.no_grad():
                net.eval()(x)  # warm-up
                for _ in range(LATENCY_REPS):
                    t0 = time.perf_counter()
                    net(x)
                    times.append((time.perf_counter() - t0) * 1000)
        finally:
            torch.set_num_threads(threads)
        cache[key] = round(statistics.median(times), 2)
        atomic_write_json(cache_file, cache)
    return cache[key]


def _stats_row(label: str, s: dict) -> str:
    if not s.get("count"):
        return f"| {label} | 0 | - | - | - | - |"
    return f"| {label} | {s['count']} | {s['saturation']:.3f} | {s['r']:.3f} | {s['g']:.3f} | {s['b']:.3f} |"


def colour_table(rounds: list[tuple[int, Path]], web_degraded: Path | None, test: Path | None) -> list[str]:
    """The colour statistics table: each round's synthesized images and clean sources, then the references."""
    lines = ["| images | count | saturation (mean max-min over RGB) | R | G | B |", "|---|---|---|---|---|---|"]
    for n, shards in rounds:
        synth, sources = round_colours(shards)
        ratio = f"{synth['saturation'] / sources['saturation']:.2f}x" if sources.get("saturation") else "-"
        lines += [_stats_row(f"round {n}: clean sources", sources),
                  _stats_row(f"round {n}: synthesized ({ratio} the sources' saturation)", synth)]
    if web_degraded is not None:
        lines.append(_stats_row("web degraded", colour_stats(read_rgb(p, min_side=1)
                                                             for p in scan_images(web_degraded).paths)))
    if test is not None:
        lines.append(_stats_row("test degraded", colour_stats(read_rgb(p.degraded, min_side=1)
                                                              for p in find_pairs(test))))
    return lines


def synth_section(ctx, table, key: str, run: Path, student: str) -> list[str]:
    """The rounds grid and colour statistics of one synthesizing row (empty when it has no round yet)."""
    rounds = student_rounds(run, student)
    if not rounds:
        return []
    grid = rounds_grid(run, ctx.paths.samples / f"rounds-{slug(table.task)}-{key.lower()}.png", student=student)
    parts = [f"### {key}: synthesized images of each round", ""]
    if grid:
        parts += [f"![rounds of {key}]({grid.relative_to(ctx.config.out)})", "",
                  "(clean source, then the image synthesized from it in round 0 and each later round)", ""]
    test = ctx.test_dir(table.task, table.tests[0]) if table.tests else None
    parts += colour_table(rounds, ctx.folder(table.task, "web_degraded"), test) + [""]
    return parts
