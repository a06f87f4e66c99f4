"""Paired degraded/clean sets in the layouts the benchmarks ship in.

Recognised layouts under a root folder (folder names are matched case-insensitively):

- two sub-folders, one degraded and one clean, from `DEGRADED_DIRS` x `CLEAN_DIRS`: `degraded/`+`clean/`
  (this project), `rainy/`+`gt/` (AirNet), `input/`+`target/` (MPRNet, Restormer), `hazy/`+`gt/` or
  `clear/` (RESIDE SOTS), `synthetic/`+`gt/` (Snow100K), `Snow/`+`Gt/` (CSD), `rain/`+`norain/` (VRGNet);
- one flat folder of `rain-N.*` and `norain-N.*` files (PReNet's Rain100L training set);
- `rainy/rain-N.*` with `norain-N.*` beside the `rainy/` folder (PReNet's Rain100L test set).

A degraded file finds its clean partner by, in order: the same stem; `rain-N` -> `norain-N`; the stem
before the first `_` (RESIDE `0001_0.8_0.2` -> `0001`, DDN `901_3` -> `901`); the stem plus `gt`
(SPA `000` -> `000gt`). Several degraded files may share one clean file.

A bad pair is skipped and counted with its reason, never silently dropped and never fatal to the set: a file
without a partner ("no clean partner", "no degraded partner"), and a pair with a file that is a dangling
symlink, a symlink loop, a FIFO or another non-regular file (`shards.folders.entry_problem`, the rules of a
folder scan). `find_pairs` returns the usable pairs with the skipped ones in `.skipped`; a set with no usable
pair left is an `UnpairedError` naming the folder and the reasons. Images are decoded later
(`distill.data.load_pairs`), which skips and counts the undecodable ones the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .folders import entry_problem
from .images import IMAGE_EXTENSIONS

DEGRADED_DIRS = ("degraded", "rainy", "rain", "input", "hazy", "haze", "synthetic", "snow")
CLEAN_DIRS = ("clean", "gt", "target", "norain", "clear", "groundtruth", "ground_truth")


class UnpairedError(ValueError):
    """A paired set with no usable pair, or a folder in no known layout."""


@dataclass(frozen=True)
class Pair:
    name: str  # the degraded file's stem, unique within a set
    degraded: Path
    clean: Path


class PairList(list):
    """`find_pairs`' result: the usable pairs (a list, sorted by name), the pairs skipped as (name, reason) in
    `skipped`, and the set's folder in `root`."""

    def __init__(self, pairs=(), skipped=(), root: Path | None = None):
        super().__init__(pairs)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.root = root


def describe_skipped(where: object, usable: int, skipped: list[tuple[str, str]]) -> str:
    """One line for the user: how many pairs of `where` are usable, and each skipped one with its reason."""
    shown = "; ".join(f"{name}: {why}" for name, why in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    return f"{where}: {usable} usable pair(s), {len(skipped)} skipped ({shown}{more})"


def no_usable_pair(where: object, skipped: list[tuple[str, str]], empty: str) -> UnpairedError:
    """The error of a paired set with nothing left to use: its folder, how many were skipped and the first
    reasons (`empty` when nothing was skipped at all)."""
    why = "; ".join(f"{name}: {reason}" for name, reason in skipped[:5]) or empty
    return UnpairedError(f"{where}: no usable pair ({len(skipped)} skipped: {why})")


def _images(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """The image-named entries of `folder`, and the reason of each that is no usable file: a dangling link, a
    loop or a FIFO is not dropped but makes its pair a counted skip."""
    entries = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return entries, {p: why for p in entries if (why := entry_problem(p))}


def _candidates(stem: str) -> list[str]:
    out = [stem]
    if stem.startswith("rain-"):
        out.append("no" + stem)
    if "_" in stem:
        out.append(stem.split("_", 1)[0])
    out.append(stem + "gt")
    return out


def _match(degraded: list[Path], clean: list[Path], bad: dict[Path, str], root: Path) -> PairList:
    by_stem = {p.stem: p for p in clean}
    pairs, skipped, used = [], [], set()

    def rel(p: Path) -> str:  # degraded and clean files often share a name: say which side
        return p.relative_to(root).as_posix()

    for d in degraded:
        partner = next((by_stem[c] for c in _candidates(d.stem) if c in by_stem), None)
        if partner is not None:
            used.add(partner)  # a clean file whose degraded file is bad is not also "without a partner"
        if d in bad:
            skipped.append((d.stem, f"{rel(d)}: {bad[d]}"))
        elif partner is None:
            skipped.append((d.stem, f"{rel(d)}: no clean partner"))
        elif partner in bad:
            skipped.append((d.stem, f"{rel(partner)}: {bad[partner]}"))
        else:
            pairs.append(Pair(d.stem, d, partner))
    skipped += [(c.stem, f"{rel(c)}: {bad.get(c, 'no degraded partner')}") for c in clean if c not in used]
    stems = [p.name for p in pairs]
    if len(set(stems)) != len(stems):
        raise UnpairedError(f"two degraded files share a stem in {root}; stems must be unique")
    return PairList(pairs, skipped, root)


def find_pairs(root: str | Path) -> PairList:
    """Every usable (degraded, clean) pair under `root`, sorted by name, with the skipped ones in `.skipped`;
    see the module docstring for layouts and skips."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"paired set not found: {root}")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    deg = [subdirs[n] for n in DEGRADED_DIRS if n in subdirs]
    cln = [subdirs[n] for n in CLEAN_DIRS if n in subdirs]
    flat, bad = _images(root)
    if deg and cln:
        if len(deg) > 1 or len(cln) > 1:
            found = ", ".join(p.name for p in deg + cln)
            raise UnpairedError(f"ambiguous layout in {root}: several candidate folders ({found})")
        (degraded, bad_d), (clean, bad_c) = _images(deg[0]), _images(cln[0])
        pairs = _match(degraded, clean, bad_d | bad_c, root)
    elif deg and any(p.stem.startswith("norain-") for p in flat):
        degraded, bad_d = _images(deg[0])
        pairs = _match(degraded, [p for p in flat if p.stem.startswith("norain-")], bad_d | bad, root)
    elif any(p.stem.startswith("rain-") for p in flat):
        rain = [p for p in flat if p.stem.startswith("rain-")]
        pairs = _match(rain, [p for p in flat if not p.stem.startswith("rain-")], bad, root)
    else:
        raise UnpairedError(
            f"no paired layout recognised in {root}: expected a degraded folder ({', '.join(DEGRADED_DIRS)}) "
            f"beside a clean folder ({', '.join(CLEAN_DIRS)}), or rain-N/norain-N files"
        )
    if not pairs:
        raise no_usable_pair(root, pairs.skipped, "its folders hold no images")
    return PairList(sorted(pairs, key=lambda p: _natural_key(p.name)), pairs.skipped, root)


def _natural_key(name: str) -> tuple:
    """Sort '2' before '10' (benchmarks number their files without zero padding)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
