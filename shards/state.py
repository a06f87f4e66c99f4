"""Resumable training states and their logs, the same way in every stage.

A state (`state.pt`) holds only tensors and plain Python values (model and optimizer state dicts, the
numpy bit-generator state, torch's RNG state, ints, floats, strings, lists, dicts), written atomically and
read back with ``torch.load(weights_only=True)``: a crafted state file cannot run code, it is refused with
its name. A state that loads but is not what its stage wrote (a key missing, a value of another type, a tensor
or state dict that does not fit) is refused the same way, naming the file and the key: the loader checks the
stage's schema, and every restore from a state runs inside `restoring`. A log (`train.jsonl`) gets one record
per step or epoch; on resume the records after the state's position are dropped before training goes on, so a
killed run and its resume leave exactly one record each.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_torch_save, atomic_write_text, read_jsonl


class StateError(ValueError):
    """A resumable state that cannot be used (unreadable, unsafe, or written by other settings)."""


class PickleRefused(pickle.UnpicklingError):
    """A torch file that a weights-only load refused, in d4ir's words (`load_plain`); `unsafe`: it asked for
    Python objects (rather than being broken or a raw pickle the weights-only reader cannot parse)."""

    def __init__(self, message: str, unsafe: bool):
        super().__init__(message)
        self.unsafe = unsafe


def is_unsafe(err: BaseException) -> bool:
    """True when a weights_only load failed because the file asks for Python objects (not for a broken file)."""
    if isinstance(err, PickleRefused):
        return err.unsafe
    return bool(re.search(r"GLOBAL|global|REDUCE|BUILD", str(err))) and "Unsupported operand" not in str(err)


def unsafe_reason(err: BaseException) -> str:
    """What a weights_only load refused, in one short clause (torch's own text suggests loading it unsafely)."""
    if isinstance(err, PickleRefused):
        return str(err)
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"the Python object {found.group(1)}" if found else "Python objects"
    return f"it holds {what}, not plain tensors and values; d4ir never unpickles code"


def load_plain(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, the one way d4ir reads a torch file, with torch's words kept out:
    its warnings (e.g. on a raw pickle's protocol) are silenced, and a refused file raises `PickleRefused` saying
    what it is, never torch's advice that loading it with weights_only=False "will likely succeed" (that would run
    whatever code the file holds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if is_unsafe(err):
                raise PickleRefused(unsafe_reason(err), unsafe=True) from err
            text = " ".join(str(err).split())
            found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
            detail = f" (the weights-only reader stops at: {found.group(1).rstrip('.')})" if found else ""
            raise PickleRefused(f"not plain tensors and values{detail}; d4ir never unpickles code",
                                unsafe=False) from err


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` atomically (a kill leaves the previous state or the new one, never half a file)."""
    atomic_torch_save(path, state)


# A schema maps each key a state must hold to the type of its value, or to the schema of a nested dict.
Schema = dict[str, "type | tuple[type, ...] | Schema"]


def load_state(path: str | Path, device: str | torch.device = "cpu", *, schema: Schema | None = None) -> dict[str, Any]:
    """Read a state written by `save_state`; anything that is not plain data is refused, naming the file, and so
    is a state without the keys and types of `schema` (see `check_schema`)."""
    path = Path(path)
    try:
        state = load_plain(path, map_location=device)
    except pickle.UnpicklingError as err:
        if not is_unsafe(err):
            raise StateError(f"{path}: unreadable training state ({' '.join(str(err).split())[:200]})") from err
        raise StateError(f"{path}: refused: {unsafe_reason(err)}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise StateError(f"{path}: unreadable training state ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise StateError(f"{path}: a training state must be a dict, got {type(state).__name__}")
    if schema is not None:
        check_schema(path, state, schema)
    return state


def _type_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def check_schema(path: Path, state: dict, schema: Schema, where: str = "") -> None:
    """Every key of `schema` is in `state` with a value of its type (an int is never a bool), recursively;
    else a StateError naming the file and the key ("objects.student")."""
    for key, kind in schema.items():
        name = where + key
        if key not in state:
            raise StateError(f"{path}: malformed training state: it has no {name!r}")
        value = state[key]
        wanted = dict if isinstance(kind, dict) else kind
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise StateError(f"{path}: malformed training state: {name!r} is a {type(value).__name__}, "
                             f"expected {_type_name(wanted)}")
        if isinstance(kind, dict):
            check_schema(path, value, kind, name + ".")


@contextlib.contextmanager
def restoring(path: Path, key: str) -> Iterator[None]:
    """Restore `key` of the state at `path` inside this block: what torch, numpy or a module raise on a value of
    the right type but the wrong content (a tensor of another shape or dtype, a state dict of another model, a
    bit-generator state of another kind) becomes a StateError naming the file and the key."""
    try:
        yield
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise StateError(f"{path}: malformed training state: {key!r} cannot be restored ({detail})") from err


def changed_settings(saved: dict | None, wanted: dict) -> list[str]:
    """The names whose values differ between the settings a run was written with and the ones asked for now
    (a name only one side has counts): every resume check (stages 1 and 3, the experiments' steps) refuses
    with this list, so that the user sees what to put back."""
    saved = saved or {}
    return sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The numpy generator's state as plain data (a dict of str and int)."""
    return rng.bit_generator.state


def restore_rng(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


def trim_log(path: str | Path, key: str, last: int) -> list[dict]:
    """Keep the records of `path` whose `key` is at most `last` (a resumed run redoes the rest)."""
    path = Path(path)
    kept = [r for r in read_jsonl(path) if isinstance(r.get(key), int) and r[key] <= last]
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return kept
