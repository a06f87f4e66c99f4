"""Checking shards: every problem named in one line each.

`check_shard_files` judges the files of one folder (stats vs tar: missing, unfinished, truncated, altered,
unreadable, miscounted; leftovers). `verify_shards` judges a *complete round*: its manifest (the plan) must
exist and be marked complete, every planned shard must be finished with every sample planned for it written or
counted as failed, the manifest's image total must be what the shards hold, and nothing else may be there;
given a shards root it verifies every round in it. Used by `d4ir shards verify` and before distillation starts. It
reads every tar once (hash and parse). It is the one place that reads a round's JSON files raw: a damaged file is
its subject, and it names every problem where the typed readers (`shards.records`) stop at the first.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

from d4ir.shards.io import sha256_file
from d4ir.shards.layout import (
    MANIFEST_FILE,
    SIZES_FILE,
    parse_round,
    parse_shard,
    parse_stats,
    round_name,
    shard_name,
    stats_name,
)
from d4ir.shards.records import format_problem, planned_sizes
from d4ir.shards.writer import read_stats


class Finding(str):
    """One problem verify found: its text, as printed (a str, so it compares and prints as one), and the shard
    file it is about (`shard`, e.g. "000003.tar"; None for a problem of the round itself), so that a reader
    skipping damaged shards knows which without parsing the text."""

    shard: str | None

    def __new__(cls, text: str, shard: str | None = None) -> Finding:
        obj = super().__new__(cls, text)
        obj.shard = shard
        return obj

    def prefixed(self, prefix: str) -> Finding:
        return Finding(prefix + self, self.shard)


def _shard_of(name: str) -> str | None:
    """The shard a file of a round belongs to (its tar, stats file or leftover .tmp), else None."""
    index = parse_shard(name.removesuffix(".tmp"))
    index = parse_stats(name) if index is None else index
    return None if index is None else shard_name(index)


# A folder name meant as a round's but not spelled as one (round-0001, round-1a): the number, if any.
_ROUND_LIKE = re.compile(r"^round-(\d*)")


def _load_json(path: Path, problems: list[Finding]) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(Finding(f"{path.name}: unreadable ({err})", _shard_of(path.name)))
        return None


def _count_samples(path: Path) -> int:
    """Number of distinct sample keys in a tar; raises tarfile/OS errors for an unreadable one."""
    keys = set()
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if info.isreg():
                keys.add(info.name.partition(".")[0])
    return len(keys)


def _check_shard(directory: Path, index: int, stats: dict, problems: list[Finding]) -> None:
    name = shard_name(index)
    tar_path = directory / name
    lacking = [k for k in ("bytes", "sha256", "count") if k not in stats]
    if lacking:
        problems.append(Finding(f"{stats_name(index)}: lacks {lacking} (not written by write_shard)", name))
        return
    if not tar_path.is_file():
        problems.append(Finding(f"{name}: missing (its stats file exists)", name))
        return
    size = tar_path.stat().st_size
    if size != stats["bytes"]:
        kind = "truncated" if size < stats["bytes"] else "grown"
        problems.append(Finding(f"{name}: {kind}: {size} bytes on disk, stats say {stats['bytes']}", name))
        return
    if sha256_file(tar_path) != stats["sha256"]:
        problems.append(Finding(f"{name}: altered: sha256 differs from the one in its stats file", name))
        return
    try:
        count = _count_samples(tar_path)
    except (tarfile.TarError, OSError) as err:
        problems.append(Finding(f"{name}: unreadable tar ({err})", name))
        return
    # Failed samples are recorded in stats but have no members in the tar.
    if count != stats["count"]:
        problems.append(Finding(f"{name}: holds {count} samples, stats say {stats['count']}", name))


def _listed_shards(manifest: dict) -> set[str]:
    names: set[str] = set()
    listed = manifest.get("shards")
    if isinstance(listed, (list, dict)):
        names.update(str(n) for n in listed)
    num = manifest.get("num_shards")
    if isinstance(num, int) and num >= 0:
        names.update(shard_name(i) for i in range(num))
    return names


def verify_shards(path: str | Path) -> list[Finding]:
    """Name every problem of a round, or of every round under a shards root; [] means complete and intact.

    A round is complete when its manifest exists and says so, every one of its `num_shards` shards passes
    `check_shard_files` and sizes.json lists them. A folder that is neither a round nor holds rounds is a
    problem itself (an image folder, an empty folder); so is a subfolder of a shards root that holds shards, or is
    named like a round, but is not named round-NNN (no stage would read it).

    Args:
        path: a round folder (RUN/shards/round-000) or a shards root (RUN/shards).
    Returns:
        One `Finding` per problem (a line starting with the file or round it is about; `.shard` names the shard
        it is about, if any).
    """
    path = Path(path)
    if not path.is_dir():
        return [Finding(f"{path}: shard folder does not exist")]
    if _holds_shards(path):
        return _verify_round(path, str(path), "")
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    rounds = [p for p in folders if parse_round(p.name) is not None]
    # A folder no stage reads (a misnamed round, a copy) is reported: a shards root passes only when all it
    # holds is rounds that pass.
    strays = [(p, why) for p in folders if p not in rounds and (why := _stray(p)) is not None]
    if not rounds and not strays:
        return _verify_round(path, str(path), "")
    judged = {p: _verify_round(p, p.name, f"{p.name}/") for p in rounds}
    judged |= {p: [Finding(f"{p.name}: {why}")] for p, why in strays}
    return [problem for p in sorted(judged) for problem in judged[p]]


def _holds_shards(folder: Path) -> bool:
    """A manifest, a shard or a stats file directly in `folder`."""
    return (folder / MANIFEST_FILE).exists() or any(
        parse_shard(p.name) is not None or parse_stats(p.name) is not None for p in folder.iterdir())


def _stray(folder: Path) -> str | None:
    """Why a subfolder of a shards root that is not a round's (round-NNN) is a problem, or None if it is not."""
    if _holds_shards(folder):
        return "holds shards but is not named round-NNN: no stage reads it; rename it to its round or move it out"
    named = _ROUND_LIKE.match(folder.name)
    if named is None:
        return None
    hint = f" (round {int(named.group(1))} is {round_name(int(named.group(1)))})" if named.group(1) else ""
    return f"named like a round but not round-NNN{hint}: no stage reads it"


def _verify_round(directory: Path, label: str, prefix: str) -> list[Finding]:
    """The problems of one round, each starting with `prefix` (the round's name under a shards root, else "")
    and its file; a folder that is no round at all is one line starting with `label`, its name as given."""
    problems = _round_problems(directory)
    if problems is None:
        return [Finding(f"{label}: not a shard round (no {MANIFEST_FILE}, no NNNNNN.tar shards)")]
    return [problem.prefixed(prefix) for problem in problems]


def _round_problems(directory: Path) -> list[Finding] | None:
    """The problems of one round, each starting with its file; None when the folder is no round at all."""
    problems = check_shard_files(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        if not problems and not any(parse_shard(p.name) is not None for p in directory.iterdir()):
            return None
        return [Finding(f"{MANIFEST_FILE}: missing (the round's plan): shards without a plan cannot be trusted"),
                *problems]
    manifest = _load_json(manifest_path, problems)
    if not isinstance(manifest, dict):
        return problems
    if (why := format_problem(manifest)) is not None:
        return [Finding(f"{MANIFEST_FILE}: {directory.name} {why}")]  # its files follow other rules: one line
    if manifest.get("complete") is not True:
        problems.append(Finding(f"{MANIFEST_FILE}: the round is not complete (its synthesis was interrupted or "
                                "failed)"))
    num = manifest.get("num_shards")
    if not isinstance(num, int) or num < 1:
        problems.append(Finding(f"{MANIFEST_FILE}: no num_shards: not a round written by `d4ir synth`"))
        return problems
    extra = sorted(p.name for p in directory.iterdir() if (i := parse_shard(p.name)) is not None and i >= num)
    problems += [Finding(f"{name}: not in the plan ({num} shards)", name) for name in extra]
    if not (directory / SIZES_FILE).exists() and manifest.get("complete") is True:
        problems.append(Finding(f"{SIZES_FILE}: missing"))
    problems += _against_the_plan(directory, manifest, problems)
    return problems


def _against_the_plan(directory: Path, manifest: dict, problems: list[Finding]) -> list[Finding]:
    """Each finished shard accounts for every sample planned for it (a shard rewritten short, with stats to
    match, is intact as a file but not what the plan made); an intact round holds the images its manifest says."""
    found, held = [], 0
    for name, want in sorted(planned_sizes(manifest).items()):
        index = parse_shard(name)
        stats = read_stats(directory, index) if index is not None else None
        if stats is None:
            continue  # missing or unreadable: check_shard_files names it
        held += stats.count
        if stats.accounted != want:
            found.append(Finding(f"{name}: holds {stats.count} samples and {len(stats.failures)} failed ones, but "
                                 f"its plan has {want}: rerun `d4ir synth` to redo it", name))
    # totals only mean something when every shard is intact
    images = manifest.get("images")
    if not problems and not found and manifest.get("complete") is True and isinstance(images, int) and images != held:
        found.append(Finding(f"{MANIFEST_FILE}: images {images}, but the shards hold {held}"))
    return found


def check_shard_files(directory: str | Path) -> list[Finding]:
    """Name every problem with the shard files of one folder (no manifest needed); [] when they are intact.

    Checks: stats without tar (missing), tar without stats (unfinished), size mismatch (truncated), sha256
    mismatch (altered), an unreadable tar or a sample count unlike the stats, shards listed in sizes.json or
    in the manifest ("shards", "num_shards") but not finished, and leftover `.tmp` files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [Finding(f"{directory}: shard folder does not exist")]
    problems: list[Finding] = []
    names = sorted(p.name for p in directory.iterdir())

    for name in names:
        if name.endswith(".tmp"):
            problems.append(Finding(f"{name}: leftover temporary file from an interrupted write", _shard_of(name)))

    finished: dict[str, dict] = {}
    for name in names:
        index = parse_stats(name)
        if index is None:
            continue
        stats = _load_json(directory / name, problems)
        if not isinstance(stats, dict):
            if stats is not None:
                problems.append(Finding(f"{name}: not a JSON object", shard_name(index)))
            continue
        before = len(problems)
        _check_shard(directory, index, stats, problems)
        if len(problems) == before:
            finished[shard_name(index)] = stats

    for name in names:
        index = parse_shard(name)
        if index is not None and stats_name(index) not in names:
            problems.append(Finding(f"{name}: unfinished (no stats file); a rerun rewrites it", name))

    # Shards with a tar or a stats file were judged above; the lists below only add vanished ones.
    present = {n for n in names if parse_shard(n) is not None}
    present |= {shard_name(i) for n in names if (i := parse_stats(n)) is not None}

    sizes_path = directory / SIZES_FILE
    if sizes_path.exists():
        sizes = _load_json(sizes_path, problems)
        if isinstance(sizes, dict):
            for shard, count in sorted(sizes.items()):
                if shard not in present:
                    problems.append(Finding(f"{SIZES_FILE}: lists {shard}, which does not exist", shard))
                elif shard in finished and finished[shard]["count"] != count:
                    have = finished[shard]["count"]
                    problems.append(Finding(f"{SIZES_FILE}: gives {shard} {count} samples, its stats say {have}",
                                            shard))

    manifest_path = directory / MANIFEST_FILE
    if manifest_path.exists():
        manifest = _load_json(manifest_path, problems)
        if isinstance(manifest, dict):
            for shard in sorted(_listed_shards(manifest) - present):
                problems.append(Finding(f"{MANIFEST_FILE}: lists {shard}, which does not exist", shard))
    return problems
