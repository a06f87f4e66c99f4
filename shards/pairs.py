"""Paired degraded/clean sets in the layouts the benchmarks ship in.

Recognised layouts under a root folder (folder names are matched case-insensitively):

- two sub-folders, one degraded and one clean, from `DEGRADED_DIRS` x `CLEAN_DIRS`: `degraded/`+`clean/`
  (this project), `rainy/`+`gt/` (AirNet), `input/`+`target/` (MPRNet, Restormer), `hazy/`+`gt/` or
  `clear/` (RESIDE SOTS), `synthetic/`+`gt/` (Snow100K), `Snow/`+`Gt/` (CSD), `rain/`+`norain/` (VRGNet);
- one flat folder of `rain-N.*` and `norain-N.*` files (PReNet's Rain100L training set);
- `rainy/rain-N.*` with `norain-N.*` beside the `rainy/` folder (PReNet's Rain100L test set).

A degraded file finds its clean partner by, in order: the same stem; `rain-N` -> `norain-N`; the stem
before the first `_` (RESIDE `0001_0.8_0.2` -> `0001`, DDN `901_3` -> `901`); the stem plus `gt`
(SPA `000` -> `000gt`). Several degraded files may share one clean file. Any file left without a
partner on either side is an `UnpairedError` that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS

DEGRADED_DIRS = ("degraded", "rainy", "rain", "input", "hazy", "haze", "synthetic", "snow")
CLEAN_DIRS = ("clean", "gt", "target", "norain", "clear", "groundtruth", "ground_truth")


class UnpairedError(ValueError):
    """Files of a paired set without a partner, or a folder in no known layout."""


@dataclass(frozen=True)
class Pair:
    name: str  # the degraded file's stem, unique within a set
    degraded: Path
    clean: Path


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _candidates(stem: str) -> list[str]:
    out = [stem]
    if stem.startswith("rain-"):
        out.append("no" + stem)
    if "_" in stem:
        out.append(stem.split("_", 1)[0])
    out.append(stem + "gt")
    return out


def _match(degraded: list[Path], clean: list[Path], root: Path) -> list[Pair]:
    by_stem = {p.stem: p for p in clean}
    pairs, missing, used = [], [], set()
    for d in degraded:
        partner = next((by_stem[c] for c in _candidates(d.stem) if c in by_stem), None)
        if partner is None:
            missing.append(d)
            continue
        used.add(partner)
        pairs.append(Pair(d.stem, d, partner))
    orphans = [c for c in clean if c not in used]
    if missing or orphans:
        names = [str(p.relative_to(root)) for p in missing + orphans]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise UnpairedError(f"{len(names)} unpaired file(s) in {root}: {shown}")
    stems = [p.name for p in pairs]
    if len(set(stems)) != len(stems):
        raise UnpairedError(f"two degraded files share a stem in {root}; stems must be unique")
    return pairs


def find_pairs(root: str | Path) -> list[Pair]:
    """Every (degraded, clean) pair under `root`, sorted by name; see the module docstring for layouts."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"paired set not found: {root}")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    deg = [subdirs[n] for n in DEGRADED_DIRS if n in subdirs]
    cln = [subdirs[n] for n in CLEAN_DIRS if n in subdirs]
    flat = _images(root)
    if deg and cln:
        if len(deg) > 1 or len(cln) > 1:
            found = ", ".join(p.name for p in deg + cln)
            raise UnpairedError(f"ambiguous layout in {root}: several candidate folders ({found})")
        pairs = _match(_images(deg[0]), _images(cln[0]), root)
    elif deg and any(p.stem.startswith("norain-") for p in flat):
        pairs = _match(_images(deg[0]), [p for p in flat if p.stem.startswith("norain-")], root)
    elif any(p.stem.startswith("rain-") for p in flat):
        rain = [p for p in flat if p.stem.startswith("rain-")]
        pairs = _match(rain, [p for p in flat if not p.stem.startswith("rain-")], root)
    else:
        raise UnpairedError(
            f"no paired layout recognised in {root}: expected a degraded folder ({', '.join(DEGRADED_DIRS)}) "
            f"beside a clean folder ({', '.join(CLEAN_DIRS)}), or rain-N/norain-N files"
        )
    if not pairs:
        raise UnpairedError(f"no image pairs found in {root}")
    return sorted(pairs, key=lambda p: _natural_key(p.name))


def _natural_key(name: str) -> tuple:
    """Sort '2' before '10' (benchmarks number their files without zero padding)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
