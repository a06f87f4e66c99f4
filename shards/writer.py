"""The WebDataset shard writer: one reproducible tar per shard, a stats file as its completion marker.

A shard is written as `NNNNNN.tar.tmp`, fsynced and renamed to `NNNNNN.tar`; only then is
`NNNNNN.stats.json` written (atomically). A shard without its stats file does not exist: a rerun redoes it
and skips finished ones (`shard_done`: stats, size, sha256 and planned count all agree). Tar members carry a
fixed mtime, owner and mode and are written in the given order, so equal inputs give byte-equal shards on any
machine and at any time.

Sample layout (what `write_shard` takes, one dict per sample):
    {"__key__": "r000-0000017", "degraded.png": <png bytes>, "json": {...}, ...}
    every field not starting with "_" becomes the tar member `<key>.<field>`; bytes are stored as they are,
    str as UTF-8, dict/list as JSON with sorted keys.
    {"__key__": "...", "__error__": "why"} marks a sample whose input could not be used (a bad source image):
    it is counted in the stats' `failures`, nothing is written for it. Any exception the samples' iterator
    raises (a crashed sampler, an out-of-memory) fails the whole shard instead: nothing is kept, so the
    distributor retries it and a rerun redoes it; a shard is complete only with every planned sample either
    written or counted.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from d4ir.shards.io import OutputFolderError, atomic_write_json, sha256_file
from d4ir.shards.layout import MANIFEST_FILE, SIZES_FILE, parse_stats, shard_name, stats_name
from d4ir.shards.records import RoundManifest, ShardStats

# Fixed tar header fields: the wall clock, the user and the umask must not leak into the bytes.
TAR_MTIME = 0
TAR_MODE = 0o444
# A synthesized sample: `<key>.degraded.png` (the synthesized degraded image) and `<key>.json` (provenance).
DEGRADED_FIELD = "degraded.png"
META_FIELD = "json"
# errno values that mean "this folder cannot take the file", reported as OutputFolderError.
_FOLDER_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, errno.EDQUOT, errno.ENOTDIR}


def _folder_error(directory: Path, what: str, err: OSError) -> OutputFolderError:
    why = os.strerror(err.errno) if err.errno else str(err)
    return OutputFolderError(err.errno, f"cannot write {what} to output folder {directory}: {why}")


class _HashingWriter:
    """File wrapper that hashes and counts the bytes on their way to disk (saves re-reading the tar)."""

    def __init__(self, f: io.BufferedWriter):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def _encode_field(key: str, field: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        # ASCII escapes keep any file name lossless, also one that is not valid UTF-8 (a surrogate escape)
        return json.dumps(value, sort_keys=True).encode("ascii")
    raise TypeError(
        f"sample {key!r} field {field!r}: expected bytes, str, dict or list, got {type(value).__name__}"
    )


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample __key__ must be a non-empty str, got {key!r}")
    # webdataset groups members by the text before the first dot, so a dot would split the sample.
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; webdataset keys must not contain dots")
    if "/" in key or "\\" in key:
        raise ValueError(f"sample key {key!r} contains a path separator")
    return key


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    directory: str | Path, index: int, samples: Iterable[dict], *,
    extra_stats: dict | Callable[[], dict] | None = None,
) -> ShardStats:
    """Write shard `index` into `directory` and its stats file last; return the stats.

    Args:
        directory: the round folder (created if missing).
        index: shard number; the files are `{index:06d}.tar` and `{index:06d}.stats.json`.
        samples: iterable of sample dicts (module docstring); failures ({"__key__", "__error__"}) are counted in
            `failures`; an exception raised by the iterable fails the shard (re-raised, nothing left behind).
        extra_stats: JSON-serialisable values added to the stats (e.g. seconds, hashes), or a function
            returning them, called when the tar is done (e.g. the shard's time); may not override the core keys
            shard/index/count/failures/sha256/bytes.
    Returns:
        The shard's `ShardStats` (also written to its stats file).
    Raises:
        ValueError: a key with a dot, a path separator, a duplicate key, or a sample without fields.
        TypeError: a field value that is not bytes/str/dict/list.
        OutputFolderError: the folder is unwritable, read-only or full; no `.tar` is left behind.
    """
    directory = Path(directory)

    def extras() -> dict:
        extra = dict((extra_stats() if callable(extra_stats) else extra_stats) or {})
        clash = sorted(set(extra) & set(ShardStats.CORE))
        if clash:
            raise ValueError(f"extra_stats may not override core stats keys {clash}")
        return extra

    if not callable(extra_stats):
        extras()  # a clash is an error before anything is written
    name = shard_name(index)
    tar_path, stats_path = directory / name, directory / stats_name(index)
    tmp_path = directory / (name + ".tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # An old stats file would mark the shard done while its tar is being replaced: drop it first.
        stats_path.unlink(missing_ok=True)
    except OSError as err:
        if err.errno in _FOLDER_ERRNOS:
            raise _folder_error(directory, name, err) from err
        raise

    failures: list[dict] = []
    seen: set[str] = set()
    count = 0
    try:
        with open(tmp_path, "wb") as f:
            out = _HashingWriter(f)
            # Stream mode ("w|") only ever calls write(), so the hashing wrapper sees every byte.
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for sample in samples:
                    if not isinstance(sample, dict):
                        raise TypeError(f"shard {name}: a sample must be a dict, got {type(sample).__name__}")
                    key = _check_key(sample.get("__key__"))
                    if key in seen:
                        raise ValueError(f"shard {name}: duplicate sample key {key!r}")
                    seen.add(key)
                    if "__error__" in sample:
                        failures.append({"key": key, "error": str(sample["__error__"])})
                        continue
                    # Sorted fields: byte-equal output even if equal samples were built in another order.
                    fields = sorted(k for k in sample if not k.startswith("_"))
                    if not fields:
                        raise ValueError(f"shard {name}: sample {key!r} has no fields to write")
                    # Encode every field first so a bad one cannot leave half a sample in the tar.
                    members = [(f"{key}.{k}", _encode_field(key, k, sample[k])) for k in fields]
                    for member, data in members:
                        _add_member(tar, member, data)
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, tar_path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        if err.errno in _FOLDER_ERRNOS:
            raise _folder_error(directory, name, err) from err
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise

    try:
        stats = ShardStats(name, index, count, tuple(failures), out.sha.hexdigest(), out.size, extras())
    except BaseException:
        tar_path.unlink(missing_ok=True)
        raise
    try:
        atomic_write_json(stats_path, stats.to_json())  # last: the completion marker
    except BaseException:
        # Without stats the tar does not count; remove it so a full disk leaves nothing behind.
        tar_path.unlink(missing_ok=True)
        raise
    return stats


def read_stats(directory: str | Path, index: int) -> ShardStats | None:
    """The stats of shard `index`, or None when missing, unreadable or malformed (an unfinished shard: a rerun
    redoes it, `shards.verify` names what is wrong with it)."""
    path = Path(directory) / stats_name(index)
    try:
        return ShardStats.from_json(json.loads(path.read_text(encoding="utf-8")), path)
    except (OSError, ValueError):
        return None


def shard_done(directory: str | Path, index: int, planned: int | None = None) -> bool:
    """True when the stats file exists and the tar exists with the size and sha256 the stats recorded, and,
    given the number of samples `planned` for the shard, its stats account for each (written or failed): a shard
    cut short (by hand, or by a writer that stopped early) or damaged (a flipped byte) is not done, so a rerun
    redoes it.

    Cost: hashing reads the tar once (about 1 s per GB); the hash is remembered per process for a file of the
    same inode, size and mtime, so a synth rerun reads each finished shard once."""
    stats = read_stats(directory, index)
    if stats is None or (planned is not None and stats.accounted != planned):
        return False
    tar_path = Path(directory) / shard_name(index)
    try:
        st = tar_path.stat()
        return st.st_size == stats.bytes and _tar_sha256(tar_path, st) == stats.sha256
    except OSError:
        return False


# (path, inode, size, mtime_ns) -> sha256 of the tar: `shard_done` is asked several times per shard in one run.
_HASHES: dict[tuple, str] = {}


def _tar_sha256(path: Path, st: os.stat_result) -> str:
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def write_manifest(directory: str | Path, manifest: RoundManifest) -> Path:
    """Write the round's `manifest.json` atomically (what made the shards, the plan, completion)."""
    if not isinstance(manifest, RoundManifest):
        raise TypeError(f"manifest must be a RoundManifest, got {type(manifest).__name__}")
    path = Path(directory) / MANIFEST_FILE
    atomic_write_json(path, manifest.to_json())
    return path


def read_manifest(directory: str | Path) -> RoundManifest:
    """The round's manifest; a missing, corrupt or other-format file is a clear error naming it."""
    return RoundManifest.read(directory)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


_ABSENT = object()


def check_manifest(directory: str | Path, expected: dict) -> RoundManifest:
    """Check that the shards were made by what the run asks for; return the manifest.

    Args:
        directory: the round folder holding manifest.json.
        expected: the values that must match, possibly nested (compared leaf by leaf, e.g.
            {"sd": {"model_id": ...}} is checked as "sd.model_id"); keys only in the manifest are ignored.
    Raises:
        ValueError: naming every mismatching key with the shards' value and the requested one.
    """
    typed = read_manifest(directory)
    manifest = typed.to_json()
    have = _flatten(manifest)
    problems = []
    for key, want in _flatten(expected).items():
        got = have.get(key, _ABSENT)
        if got is _ABSENT:
            # A nested expected value may be stored whole under a parent key; resolve it the slow way.
            got = manifest
            for part in key.split("."):
                got = got.get(part, _ABSENT) if isinstance(got, dict) else _ABSENT
        if got is _ABSENT:
            problems.append(f"{key}: missing from the manifest, the run asks for {want!r}")
        elif got != want:
            problems.append(f"{key}: shards were made with {got!r}, the run asks for {want!r}")
    if problems:
        raise ValueError(
            f"shards in {directory} do not match this run ({len(problems)} mismatching keys): "
            + "; ".join(problems)
        )
    return typed


def write_sizes(directory: str | Path) -> dict[str, int]:
    """Write `sizes.json` ({"000000.tar": count, ...}, open_clip style) from the finished shards' stats."""
    directory = Path(directory)
    sizes: dict[str, int] = {}
    for index in sorted(i for i in map(parse_stats, (p.name for p in directory.iterdir())) if i is not None):
        if shard_done(directory, index):
            sizes[shard_name(index)] = read_stats(directory, index).count
    atomic_write_json(directory / SIZES_FILE, sizes)
    return sizes
