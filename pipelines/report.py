"""Looking at results: shard sample grids, training curves and the run report (runs/<name>/report.md)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from shards.embeddings import load_embeddings
from shards.grid import sample_grid
from shards.images import read_rgb
from shards.reader import iter_samples
from shards.writer import read_manifest


def _thumb(path: str | Path | None, size: int) -> np.ndarray:
    """A source image center-cropped square (gray when it cannot be read), for side-by-side grids."""
    try:
        img = read_rgb(path, min_side=1)
    except (OSError, TypeError, ValueError, Exception):  # noqa: BLE001 - a grid shows a gray cell instead
        return np.full((size, size, 3), 128, np.uint8)
    s = min(img.shape[:2])
    top, left = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
    return img[top : top + s, left : left + s]


def shard_grid(directory: Path, out: Path, *, num: int = 8, cell: int = 128) -> Path:
    """Grid of `num` samples of a round: clean source | prompt source | synthesized."""
    manifest = read_manifest(directory)
    index = []
    if manifest.get("prompts_dir"):
        try:
            index = load_embeddings(manifest["prompts_dir"]).index
        except FileNotFoundError:
            index = []
    rows = []
    for sample in itertools.islice(iter_samples(directory), num):
        meta = sample["meta"]
        row = meta.get("prompt_row")
        prompt_src = index[row]["path"] if index and row is not None and row < len(index) else None
        rows.append([_thumb(meta.get("clean"), cell), _thumb(prompt_src, cell), sample["degraded"]])
    if not rows:
        raise ValueError(f"no finished shard in {directory}")
    return sample_grid(rows, out, labels=["clean source", "prompt source", "synthesized"], cell=cell)
