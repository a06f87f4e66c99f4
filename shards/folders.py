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
