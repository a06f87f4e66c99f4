"""Scanning an image folder: every entry below it is used, or counted with the reason it is not.

`list_files` walks the folder recursively in sorted order, following symlinked folders once each (a folder
reached twice, e.g. through a link back to an ancestor, is not walked again). Hidden files and folders (names
starting with ".") are ignored. Entries that are no usable file are reported, not dropped: a dangling symlink,
a symlink loop, or a FIFO, socket or device ("not a regular file"). `scan_images` then decodes every file once
(`shards.images.read_rgb`) and sorts it into usable or skipped, counting the conversion rules applied.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .images import CONVERSIONS, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, SKIP_REASONS, ImageSkipped, read_rgb
from .io import sha256_file


@dataclass
class ImageScan:
    """Result of scanning a folder: usable paths (sorted), skipped entries with reasons, conversions applied."""

    root: Path
    paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    converted: list[tuple[Path, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """{"usable": n, <skip reason>: n, ..., "converted: <rule>": n, ...} (only the non-zero ones)."""
        skipped = Counter(reason for _, reason in self.skipped)
        converted = Counter(rule for _, rule in self.converted)
        return {"usable": len(self.paths), **{r: skipped[r] for r in SKIP_REASONS if skipped[r]},
                **{f"converted: {r}": converted[r] for r in CONVERSIONS if converted[r]}}

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in self.counts().items() if r != "usable" and ":" not in r)
        return f"{len(self.paths)} usable" + (f", skipped: {skipped}" if skipped else "")


def entry_problem(path: Path) -> str | None:
    """None for a regular file (or a link to one), else the reason the entry is not one (a SKIP_REASONS entry):
    the one rule for folder scans and paired sets (shards.pairs)."""
    try:
        mode = os.stat(path).st_mode  # follows links
    except FileNotFoundError:
        return "dangling symlink" if path.is_symlink() else "not a regular file"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop"
        if err.errno == errno.EACCES:
            return "permission denied"
        raise
    return None if stat.S_ISREG(mode) else "not a regular file"


def list_entries(root: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(every regular file below `root`, sorted; the entries that are not usable files, with their reason)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files, odd, seen = [], [], set()

    def walk(folder: Path) -> None:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            return
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except PermissionError:
            odd.append((folder, "permission denied"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                walk(path)
                continue
            reason = entry_problem(path)
            (odd.append((path, reason)) if reason else files.append(path))

    walk(root)
    return files, odd


def list_files(root: str | Path) -> list[Path]:
    """Every regular file below `root` (see `list_entries`)."""
    return list_entries(root)[0]


def scan_images(
    root: str | Path, *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageScan:
    """Decode every file below `root` once and sort it into usable or skipped (with reason)."""
    files, odd = list_entries(root)
    scan = ImageScan(Path(root), skipped=list(odd))
    for p in files:
        notes: list[str] = []
        try:
            read_rgb(p, min_side=min_side, max_pixels=max_pixels, notes=notes)
            scan.paths.append(p)
            scan.converted += [(p, n) for n in dict.fromkeys(notes)]
        except ImageSkipped as skip:
            scan.skipped.append((p, skip.reason))
    scan.skipped.sort()
    return scan


def file_records(root: str | Path, paths: list[Path]) -> list[list]:
    """[name relative to `root`, bytes, sha256] per path, in order: what a round's manifest records of the photos
    its plan was drawn from, so that a later round can be drawn from exactly them."""
    root = Path(root)
    return [[Path(p).relative_to(root).as_posix(), Path(p).stat().st_size, sha256_file(p)] for p in paths]


def check_files(root: str | Path, records: object, what: str, hint: str) -> list[Path]:
    """The paths of `records` (as `file_records` wrote them) under `root`, each checked to be there with its
    recorded size and sha256.

    Raises:
        FileNotFoundError (some are missing) or ValueError (some changed, or the records are malformed): one line
        `{what} in {root} changed (n of N): a.png missing, b.png changed: {hint}`.
    """
    root = Path(root)
    ok = isinstance(records, list) and all(
        isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], int)
        and isinstance(r[2], str) and not Path(r[0]).is_absolute() and ".." not in Path(r[0]).parts for r in records)
    if not ok:  # a hand-edited manifest: names outside the folder would be read too
        raise ValueError(f"{what}: the manifest's list of them is malformed (want [relative name, bytes, sha256] "
                         f"each): {hint}")
    paths, bad, missing = [], [], False
    for name, size, digest in records:
        path = root / name
        paths.append(path)
        if not path.is_file():
            bad.append(f"{name} missing")
            missing = True
        elif path.stat().st_size != size or sha256_file(path) != digest:
            bad.append(f"{name} changed")
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        error = FileNotFoundError if missing else ValueError
        raise error(f"{what} in {root} changed ({len(bad)} of {len(records)}): {shown}: {hint}")
    return paths
