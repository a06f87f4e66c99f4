"""Atomic writes, hashing and weight files.

Every file a stage hands to the next is written to a temporary name in the same folder, flushed to disk
and renamed, so a killed run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .errors import StageFailedError

_DISK_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, errno.EDQUOT}


class OutputFolderError(OSError):
    """The output folder cannot take the file (unwritable, read-only or full)."""


def _raise_folder_error(path: Path, err: OSError) -> None:
    if err.errno in _DISK_ERRORS:
        why = os.strerror(err.errno) if err.errno else str(err)
        raise OutputFolderError(err.errno, f"cannot write {path.name} to {path.parent}: {why}") from err
    raise err


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through `path.tmp`, fsync and rename; clean up the temporary on failure."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        _raise_folder_error(path, err)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (logs such as train.jsonl; a torn last line is ignored by `read_jsonl`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    except OSError as err:
        _raise_folder_error(path, err)


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding one object; a file that is not valid JSON or holds something else is a ValueError
    naming it (a missing one stays FileNotFoundError)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file, skipping a torn (unparseable) line left by a killed writer."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """torch.save through `atomic_write_bytes` (resumable training states: a kill never leaves half a file)."""
    buf = BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict: names, dtypes, shapes and bytes, in sorted key order (device independent)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in {".safetensors", ".json"} else path


def atomic_save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    """Write a safetensors file (string metadata only) through `atomic_write_bytes` (`path.tmp`, fsynced,
    renamed, the umask's mode). The bytes are serialised in memory (one copy of the weights) and written by Python:
    the safetensors file writer's own errors name no file ("Error while serializing: I/O error: No space left on
    device") and its files come out 0600."""
    atomic_write_bytes(path, save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def save_weights(
    stem: str | Path, state_dict: dict[str, torch.Tensor], config: dict, metadata: dict | None = None
) -> Path:
    """Write `stem.safetensors` (weights) and `stem.json` (constructor config), both atomically.

    Args:
        stem: path without suffix (a `.safetensors` or `.json` suffix is stripped).
        state_dict: tensors to store; made contiguous and moved to the CPU.
        config: JSON-serialisable description that rebuilds the module (e.g. arch and kwargs).
        metadata: optional string metadata stored inside the safetensors header.
    Returns:
        The path of the `.safetensors` file.
    """
    stem = _stem(stem)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    weights = stem.with_suffix(".safetensors")
    atomic_save_safetensors(weights, tensors, metadata)
    cfg = dict(config)
    cfg["sha256"] = state_dict_sha256(tensors)
    atomic_write_json(stem.with_suffix(".json"), cfg)
    return weights


def load_weights(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a pair written by `save_weights`; a missing half is a clear `FileNotFoundError`, tensors that do not
    match the sha256 in the JSON (edited, damaged, or the JSON of other weights) a ValueError naming both."""
    stem = _stem(path)
    weights, cfg = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for p in (weights, cfg):
        if not p.exists():
            raise FileNotFoundError(f"missing {p} (expected {stem}.safetensors and {stem}.json side by side)")
    try:
        tensors = load_file(str(weights), device="cpu")  # hashed on the CPU, then moved
    except Exception as err:  # SafetensorError for a truncated or foreign file; its text varies by version
        raise ValueError(f"{weights}: unreadable safetensors file (truncated or not safetensors): {err}") from err
    config = read_json_object(cfg)
    # weights without a recorded hash (written by hand or by another tool) are taken as they are
    if "sha256" in config and state_dict_sha256(tensors) != config["sha256"]:
        raise ValueError(f"{weights}: its tensors do not match the sha256 recorded in {cfg.name} (changed or "
                         "damaged since they were written, or the JSON of other weights)")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, config


class FolderBusyError(StageFailedError):
    """Another live process holds the folder's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# How long a taker waits for another one's check of the lock (a few file operations) before giving up.
_GUARD_WAIT_S = 30.0


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    """Serialise this host's takers of a folder's lock: an flock on the folder itself. Reading the owner, finding
    it dead, deleting its lock and creating one's own must be one step, or two takers of a stale lock both delete
    it and both hold the new one. The kernel drops an flock with its holder, so, unlike the lock file, the guard
    never goes stale; it is held only for those few file operations."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + _GUARD_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FolderBusyError(f"{folder}: another process has been checking its lock for "
                                          f"{_GUARD_WAIT_S:.0f} s; try again") from None
                time.sleep(0.01)
            except OSError:
                break  # a filesystem without flock (some network ones): unguarded, as across hosts
        yield
    finally:
        os.close(fd)  # drops the flock


def _owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


@contextlib.contextmanager
def folder_lock(path: str | Path) -> Iterator[None]:
    """Hold `path` (a lock file) for the block: one writer at a time for a folder's manifest and shards.

    The file holds the owner's host and pid; a lock left by a killed process on this host is taken over, a live
    owner's is refused with a `FolderBusyError` naming it. Taking, taking over and releasing happen under
    `_guard`, so of two processes that find the same stale lock exactly one takes it over.
    """
    path = Path(path)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        with _guard(path.parent):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(path)
                if not (owner.get("host") == me["host"] and isinstance(owner.get("pid"), int)
                        and not _alive(owner["pid"])):
                    raise FolderBusyError(
                        f"{path.parent} is being written by another process (pid {owner.get('pid')} on "
                        f"{owner.get('host')}, lock {path.name}); wait for it, or delete the lock if it is gone"
                    ) from None
                path.unlink()  # stale: its owner was killed (and no other taker can be between check and here)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            # written before the guard is dropped: a taker never reads a lock without its owner
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me))
    except FolderBusyError:
        raise
    except OSError as err:
        _raise_folder_error(path, err)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # the folder itself is gone: nothing left to release
            with _guard(path.parent):
                if _owner(path) == me:  # never delete a lock someone else holds
                    path.unlink(missing_ok=True)
