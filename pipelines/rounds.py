"""What the synthesis made, shown and measured: a round's sample grid, the rounds grid of a student (clean source
| round 0 | later rounds) and the colour statistics of the synthesized images against their clean sources.

Used by `d4ir shards show`, `d4ir report RUN` and the experiments report (pipelines/experiments/report_rows.py).

Colour statistics (`colour_stats`, per image set; per image pipelines/weather_sd/stats.colour_stats): saturation =
the mean over pixels of max - min over R, G, B (0 for grey, in [0, 1]), and the mean of each channel. A generator
that washes colour toward grey shows as a synthesized set whose saturation is well below its clean sources'; a cast
shows as channel means that drift apart from the sources'.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from d4ir.shards.embeddings import load_embeddings
from d4ir.shards.images import read_rgb
from d4ir.shards.layout import RunLayout, rounds_in
from d4ir.shards.reader import iter_samples
from d4ir.shards.writer import read_manifest

from .grid import sample_grid


def thumb(path: str | Path | None, size: int) -> np.ndarray:
    """A source image center-cropped square (gray when it cannot be read), for side-by-side grids."""
    try:
        img = read_rgb(path, min_side=1)
    except Exception:  # noqa: BLE001 - a grid shows a gray cell instead
        return np.full((size, size, 3), 128, np.uint8)
    s = min(img.shape[:2])
    top, left = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
    return img[top : top + s, left : left + s]


def shard_grid(directory: Path, out: Path, *, num: int = 8, cell: int = 128) -> Path:
    """Grid of `num` samples of a round: clean source | prompt source | synthesized."""
    manifest = read_manifest(directory)
    index = []
    if manifest.prompts_dir:
        try:
            index = load_embeddings(manifest.prompts_dir).index
        except FileNotFoundError:
            index = []
    rows = []
    for sample in itertools.islice(iter_samples(directory), num):
        meta = sample["meta"]
        row = meta.get("prompt_row")
        prompt_src = index[row]["path"] if index and row is not None and row < len(index) else None
        rows.append([thumb(meta.get("clean"), cell), thumb(prompt_src, cell), sample["degraded"]])
    if not rows:
        raise ValueError(f"no finished shard in {directory}")
    return sample_grid(rows, out, labels=["clean source", "prompt source", "synthesized"], cell=cell)


def student_rounds(run: Path, student: str) -> list[tuple[int, Path]]:
    """(round number, shard folder) of the rounds a student trained on: the run's round 0, then its own."""
    layout = RunLayout(run)
    rounds = [(0, layout.round_shards(0))] if 0 in rounds_in(layout.shards) else []
    return rounds + [(n, layout.round_shards(n, student)) for n in rounds_in(layout.shards_root(student)) if n > 0]


def rounds_grid(run: Path, out: Path, *, student: str = "d4ir", num: int = 4, cell: int = 96) -> Path | None:
    """clean source | round 0 | each later regeneration round of a student, one row per clean photo (rows are
    matched by the sample's clean source, so every row shows one photo: what the synthesis kept of it and the
    weather it added, and how the feedback rounds changed that)."""
    rounds = [path for _, path in student_rounds(run, student)]
    first = list(itertools.islice(iter_samples(rounds[0]), num)) if rounds else []
    if not first:
        return None
    wanted = {s["meta"].get("clean") for s in first}
    later = []
    for r in rounds[1:]:
        by_clean: dict = {}
        for sample in iter_samples(r):
            key = sample["meta"].get("clean")
            if key in wanted and key not in by_clean:
                by_clean[key] = sample["degraded"]
            if len(by_clean) == len(wanted):
                break
        later.append(by_clean)
    empty = np.full((cell, cell, 3), 200, np.uint8)  # a round without this photo
    rows = [[thumb(s["meta"].get("clean"), cell), s["degraded"]] + [c.get(s["meta"].get("clean"), empty)
                                                                     for c in later] for s in first]
    labels = ["clean source"] + [f"round {n}" for n, _ in student_rounds(run, student)]
    return sample_grid(rows, out, labels=labels, cell=cell)


def colour_stats(images: Iterable[np.ndarray]) -> dict:
    """{"count", "saturation", "r", "g", "b"} of a set of uint8 images [H, W, 3] (any sizes, each >= 16x16): the
    per-image statistics of pipelines/weather_sd/stats.colour_stats (mean max-min over RGB, channel means, in
    [0, 1]) averaged over the set, each image counting once."""
    import torch

    from .weather_sd.stats import colour_stats as image_colour_stats

    rows = []
    for img in images:
        x = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float() / 255.0
        rows.append({k: float(v[0]) for k, v in image_colour_stats(x).items()})
    if not rows:
        return {"count": 0}
    return {"count": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in ("saturation", "r", "g", "b")}}


def round_colours(shards: Path) -> tuple[dict, dict]:
    """colour_stats of a round's synthesized images and of their clean sources (meta "clean"), pixel sizes as
    stored (the sources are read at their own size)."""
    synth, sources = [], []
    for sample in iter_samples(shards):
        synth.append(sample["degraded"])
        clean = sample["meta"].get("clean")
        if clean:
            sources.append(read_rgb(clean, min_side=1))
    return colour_stats(synth), colour_stats(sources)
