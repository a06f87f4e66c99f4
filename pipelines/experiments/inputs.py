"""A task's input folders as the stages read them: one folder, or several mixed into one (all-in-one).

Mixing links, never copies: an image folder becomes OUT/TASK/inputs/FIELD/ holding one symlink per source
folder (`shards.folders` follows linked folders, so stage 1 and 2 see every image of every source); a paired set
becomes FIELD/{degraded,clean}/ with one symlink per file, both sides renamed `NN-<pair name>` so that they pair
by stem whatever the sources' naming (SOTS' `0001_0.8_0.2` -> `0001`, SPA's `gt` suffix). FIELD.sources.json
beside it, written last, says what a mixed folder holds; a folder of other sources is rebuilt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from d4ir.shards.io import atomic_write_json
from d4ir.shards.pairs import find_pairs

from .config import Folder

SOURCES_SUFFIX = ".sources.json"


def slug(name: str) -> str:
    """A folder name for a test set or table name ("synthetic snow" -> "synthetic-snow")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "unnamed"


def check_exists(folder: Folder | None, where: str) -> None:
    """A one-line error naming the config field when a folder it names does not exist."""
    for path in folder if isinstance(folder, tuple) else [folder]:
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{where}: not found: {path}")


def _link_images(sources: tuple[Path, ...], dest: Path) -> None:
    for i, src in enumerate(sources):
        os.symlink(src.resolve(), dest / f"{i:02d}-{src.name}", target_is_directory=True)


def _link_pairs(sources: tuple[Path, ...], dest: Path) -> None:
    for side in ("degraded", "clean"):
        (dest / side).mkdir()
    for i, src in enumerate(sources):
        for p in find_pairs(src):
            name = f"{i:02d}-{p.name}"
            os.symlink(p.degraded.resolve(), dest / "degraded" / f"{name}{p.degraded.suffix}")
            os.symlink(p.clean.resolve(), dest / "clean" / f"{name}{p.clean.suffix}")


def resolve(folder: Folder | None, dest: Path, *, paired: bool) -> Path | None:
    """The folder a stage reads: `folder` itself, or the mixed folder `dest` of several sources."""
    if folder is None or isinstance(folder, Path):
        return folder
    if len(folder) == 1:
        return folder[0]
    sources = {"paired": paired, "sources": [str(p.resolve()) for p in folder]}
    marker = dest.with_name(dest.name + SOURCES_SUFFIX)
    if marker.exists() and json.loads(marker.read_text()) == sources:
        return dest
    if dest.exists() or dest.is_symlink():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (_link_pairs if paired else _link_images)(folder, dest)
    atomic_write_json(marker, sources)
    return dest
