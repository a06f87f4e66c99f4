"""Paired sets in memory and training samples for the supervised and KD trainers: random crops and flips.

A paired set is read whole before any work starts (`load_pairs`): a pair without a partner or with a file
that is no regular file (`shards.pairs.find_pairs`), or whose image is truncated, empty, too large or of a
mismatching size, is skipped and counted with its reason, and a set with no usable pair left is an error; a pair
whose sizes differ by up to 64 px is centre-cropped to the smaller (`match_sizes`), counted and named (`cropped`).
Images are held as uint8 arrays [H, W, 3]; a crop is taken with a seeded numpy Generator so CPU runs repeat.
Images smaller than the crop are reflect-padded up to it (demo photos are small; real ones rarely are).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from d4ir.shards.images import DEFAULT_MAX_PIXELS, ImageSkipped, random_windows, read_rgb
from d4ir.shards.pairs import Pair, describe_skipped, find_pairs, no_usable_pair

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    """A paired set in memory: (name, degraded [H,W,3] uint8, clean [H,W,3] uint8) items, and the pairs skipped
    with their reason."""

    items: list[tuple[str, np.ndarray, np.ndarray]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    root: Path | None = None
    cropped: list[tuple[str, str]] = field(default_factory=list)  # pairs of unequal sizes, centre-cropped (how)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
        return self.items[i]

    def summary(self) -> str | None:
        """One line naming the set, its usable count and each skipped pair with its reason; None when none was
        skipped (what the commands print, and the warning `load_pairs` logs)."""
        return describe_skipped(self.root or "the paired set", len(self.items), self.skipped) if self.skipped \
            else None

    def crop_summary(self) -> str | None:
        """One line naming the pairs whose sizes differed and were centre-cropped (`match_sizes`); None if none."""
        if not self.cropped:
            return None
        shown = "; ".join(f"{name}: {how}" for name, how in self.cropped[:10])
        more = f"; and {len(self.cropped) - 10} more" if len(self.cropped) > 10 else ""
        return f"{self.root or 'the paired set'}: {len(self.cropped)} pair(s) centre-cropped ({shown}{more})"


def load_pairs(pairs: Sequence[Pair] | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> PairSet:
    """Read every pair (a paired-set folder, or its `find_pairs`) into memory; bad pairs are skipped and
    counted, with those `find_pairs` skipped; none left is a ValueError naming the folder and the reasons."""
    root = Path(pairs) if isinstance(pairs, (str, Path)) else getattr(pairs, "root", None)
    listed = find_pairs(root) if isinstance(pairs, (str, Path)) else pairs
    items, skipped = [], list(getattr(listed, "skipped", []))  # no partner, a dangling link, a FIFO ...
    cropped = []
    for p in listed:
        try:
            deg = read_rgb(p.degraded, min_side=1, max_pixels=max_pixels)
            cln = read_rgb(p.clean, min_side=1, max_pixels=max_pixels)
            items.append((p.name, *match_sizes(deg, cln, p.name)))
            if deg.shape != cln.shape:
                h, w = items[-1][1].shape[:2]
                cropped.append((p.name, f"degraded {deg.shape[1]}x{deg.shape[0]}, clean {cln.shape[1]}x{cln.shape[0]}"
                                        f" -> {w}x{h}"))
        except ImageSkipped as err:
            skipped.append((p.name, f"{err.path.name}: {err.reason}"))
        except ValueError as err:  # sizes that cannot be matched
            skipped.append((p.name, str(err)))
    where = root or (listed[0].degraded.parent.parent if listed else "the paired set")
    if not items:
        raise no_usable_pair(where, skipped, "no pairs")
    loaded = PairSet(items, skipped, Path(where), cropped)
    if skipped:
        log.warning("%s", loaded.summary())
    if cropped:
        log.warning("%s", loaded.crop_summary())
    return loaded


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
