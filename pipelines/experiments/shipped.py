"""The named experiment configs that ship inside the package (the repository's configs/*.json, package data of
`d4ir`), so that `d4ir experiments NAME` works from an installed package as well as from a clone.

A config given as a file resolves its relative paths against the file's folder. A shipped config given by its
name resolves them against the current folder instead (its own folder is inside site-packages), and its
`prepare` sources (the shared images the dataset builders read) are usually given on the command line:
`--data DIR` (every source) or `--data NAME=DIR` (one). From a clone, `d4ir experiments cpu-matrix --data
../shared/data` reads what `d4ir experiments configs/cpu-matrix.json` reads.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from d4ir.shards.errors import UnknownNameError

CONFIGS = "configs"  # the folder of the shipped configs, in the repository root = the package's root


def shipped_configs() -> dict[str, Path]:
    """{name: path} of every shipped config (file stem -> file), sorted by name."""
    folder = Path(str(resources.files("d4ir") / CONFIGS))
    return {p.stem: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def describe(path: Path) -> str:
    """The config's `description`, or its first sentence, for `d4ir experiments --list`."""
    try:
        text = str(json.loads(path.read_text()).get("description", ""))
    except (OSError, ValueError):
        return "(unreadable)"
    return text.split(". ")[0].rstrip(".")


def find_config(spec: str) -> tuple[Path, bool]:
    """(config file, shipped?) for a path to a config file or the name of a shipped one."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path, False
    shipped = shipped_configs()
    if spec in shipped:
        return shipped[spec], True
    raise UnknownNameError(f"no config file {spec!r} and no shipped config of that name; shipped: "
                           f"{', '.join(shipped) or 'none'} (d4ir experiments --list)")


def data_roots(values: tuple[str, ...], prepare: list[str]) -> dict[str, Path]:
    """--data values (DIR, or NAME=DIR) as {prepare name: absolute folder}; DIR alone sets every source."""
    roots: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            roots.update({n: Path(value).expanduser().resolve() for n in prepare})
            continue
        if name not in prepare:
            raise ValueError(f"--data {value}: the config prepares no {name!r} (it prepares: "
                             f"{', '.join(prepare) or 'nothing'})")
        roots[name] = Path(folder).expanduser().resolve()
    return roots
