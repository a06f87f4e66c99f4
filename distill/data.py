"""Training samples for the supervised (teacher, Student baseline) and KD trainers: random crops and flips.

Images are held as uint8 arrays [H, W, 3]; a crop is taken with a seeded numpy Generator so CPU runs repeat.
Images smaller than the crop are reflect-padded up to it (demo photos are small; real ones rarely are).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shards.images import random_windows, read_rgb
from shards.pairs import Pair


def load_pairs(pairs: Sequence[Pair]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Read every pair into memory as (name, degraded, clean) uint8; sizes must agree (clear error)."""
    out = []
    for p in pairs:
        deg, cln = read_rgb(p.degraded, min_side=1), read_rgb(p.clean, min_side=1)
        deg, cln = match_sizes(deg, cln, p.name)
        out.append((p.name, deg, cln))
    return out


def match_sizes(degraded: np.ndarray, clean: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Center-crop the larger image of a pair to the smaller one's size (SOTS-indoor's 640x480 ground truth
    for a 620x460 hazy image is exactly this crop); a difference above 64 pixels is an error."""
    if degraded.shape == clean.shape:
        return degraded, clean
    h, w = min(degraded.shape[0], clean.shape[0]), min(degraded.shape[1], clean.shape[1])
    if max(degraded.shape[0], clean.shape[0]) - h > 64 or max(degraded.shape[1], clean.shape[1]) - w > 64:
        raise ValueError(f"pair {name}: degraded {degraded.shape[:2]} and clean {clean.shape[:2]} sizes differ")

    def crop(a):
        top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
        return a[top : top + h, left : left + w]

    return crop(degraded), crop(clean)


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    ph, pw = max(size - a.shape[0], 0), max(size - a.shape[1], 0)
    return np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else a


def random_crop(rng: np.random.Generator, size: int, *images: np.ndarray) -> list[np.ndarray]:
    """The same random size x size window (and flip) from each image (all [H, W, 3], equal sizes)."""
    images = [_pad_to(a, size) for a in images]
    (top, left), = random_windows(rng, images[0].shape[0], images[0].shape[1], size)
    flip_h, flip_v = rng.random() < 0.5, rng.random() < 0.5
    out = []
    for a in images:
        a = a[top : top + size, left : left + size]
        a = a[:, ::-1] if flip_h else a
        a = a[::-1] if flip_v else a
        out.append(a)
    return out


def to_batch(arrays: Sequence[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> [B, 3, H, W] float in [0, 1]."""
    stacked = torch.from_numpy(np.stack([np.ascontiguousarray(a) for a in arrays]))  # [B, H, W, 3] uint8
    # contiguous: a permuted (channels-last) batch crashes oneDNN's backward of AirNet's 1x1 stride-2
    # shortcut conv at widths below 16 on the CPU (torch 2.14)
    return stacked.to(device).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
