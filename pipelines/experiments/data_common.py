"""What the dataset builders share: leakage keys, copying pairs, web photos, synthetic weather renders, reuse.

Leakage rule: an image is identified by its pixels (shape and SHA-256 of the uint8 array), so a PNG re-encode of
a test image is still caught; a web image is also compared through its top-left 480x320 and 320x480 crops,
because Rain100L's test images are such crops of 481x321 originals that other sets hold uncropped. A protected
image (any side of a test or private training pair) never reaches a web folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from d4ir.pipelines.weather import degrade
from d4ir.shards.images import read_rgb, save_png
from d4ir.shards.io import atomic_write_json, sha256_bytes, sha256_file
from d4ir.shards.pairs import Pair, find_pairs

DATA_FILE = "data.json"  # written last: a builder's folder without it is half-built and rebuilt
_CROPS = ((320, 480), (480, 320))  # the Rain100L test crops (H, W) of 481x321 originals


def pixels_key(arr: np.ndarray) -> str:
    """Identity of an image by its pixels: shape and SHA-256 of the uint8 array [H, W, 3]."""
    return f"{arr.shape}:{sha256_bytes(np.ascontiguousarray(arr).tobytes())}"


class Protected:
    """Pixel keys of every image that must stay out of the web folders."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def add(self, path: Path) -> None:
        self.keys.add(pixels_key(read_rgb(path, min_side=1)))

    def add_pairs(self, pairs: list[Pair]) -> None:
        for p in pairs:
            self.add(p.degraded)
            self.add(p.clean)

    def hit(self, arr: np.ndarray) -> bool:
        """True when `arr` or one of its top-left test crops is a protected image."""
        views = [arr] + [arr[:h, :w] for h, w in _CROPS]
        return any(pixels_key(v) in self.keys for v in views)


def reuse(out: Path, params: dict) -> dict | None:
    """data.json of a finished folder built with `params` (None when there is none yet: a half-built folder is
    removed); a folder built with other params is an error, never mixed with this build."""
    marker = out / DATA_FILE
    if marker.exists():
        info = json.loads(marker.read_text())
        old = {k: info.get(k) for k in params}
        if old != json.loads(json.dumps(params)):
            changed = ", ".join(f"{k} {old[k]!r}" for k in params if old[k] != params[k])
            raise ValueError(f"{out} was built with other settings ({changed}); use another experiments folder")
        return info
    if out.exists():
        shutil.rmtree(out)  # a half-built folder from a killed run
    return None


def finish(out: Path, info: dict) -> dict:
    atomic_write_json(out / DATA_FILE, info)
    return info


def copy_pairs(pairs: list[Pair], dest: Path, prefix: str = "") -> int:
    """Copy pairs byte for byte into dest/{degraded,clean}/, both sides named PREFIX + the pair's name (so they
    pair by stem whatever their original naming)."""
    for side in ("degraded", "clean"):
        (dest / side).mkdir(parents=True, exist_ok=True)
    for p in pairs:
        shutil.copy2(p.degraded, dest / "degraded" / f"{prefix}{p.name}{p.degraded.suffix}")
        shutil.copy2(p.clean, dest / "clean" / f"{prefix}{p.name}{p.clean.suffix}")
    return len(pairs)


def numbered_pairs(folder: Path, expected: range) -> dict[int, Pair]:
    """The pairs of a set numbered 1..N (Rain100L), checked to be exactly `expected`."""
    pairs = {int(p.name): p for p in find_pairs(folder)}
    if sorted(pairs) != list(expected):
        raise ValueError(f"{folder} must hold pairs {expected.start}..{expected.stop - 1}, found {len(pairs)}")
    return pairs


def web_images(data_root: Path, sources: list[tuple[str, str]], protected: Protected, seen: set[str],
               excluded: list[dict], counts: dict) -> Iterator[tuple[int, int, str, Path, np.ndarray]]:
    """(set index, file index, name, source path, pixels [H, W, 3] uint8) of every usable image of the (set, side)
    `sources`: byte-identical duplicates are dropped (counted), protected images are listed in `excluded`."""
    for set_index, (set_name, side) in enumerate(sources):
        for i, src in enumerate(sorted((data_root / set_name / side).iterdir())):
            digest = sha256_file(src)
            if digest in seen:  # hazerd and sots_indoor store one ground truth under several names
                counts["duplicates"] = counts.get("duplicates", 0) + 1
                continue
            seen.add(digest)
            arr = read_rgb(src, min_side=1)
            if protected.hit(arr):
                excluded.append({"path": str(src), "reason": "pixel-identical to a protected test/training image"})
                continue
            yield set_index, i, f"{set_name}-{src.stem}", src, arr


def render(weather: str, arr: np.ndarray, rng: np.random.Generator, **kwargs) -> np.ndarray:
    """The project's physical weather model (pipelines.weather) on a uint8 image; uint8 [H, W, 3] back."""
    out = degrade(weather, arr.astype(np.float32) / 255.0, rng, **kwargs)
    return np.round(out * 255).astype(np.uint8)


def save_render(path: Path, weather: str, arr: np.ndarray, rng: np.random.Generator, **kwargs) -> None:
    save_png(path, render(weather, arr, rng, **kwargs))
