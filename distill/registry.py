"""The restoration networks by name, and saving/loading them (ours and the official checkpoints).

The families (class, names, official-layout detection, variant from the keys, half-width student) are the
one table `distill.families.FAMILIES`; names map to (class, default kwargs) and any width can be built by
overriding kwargs. Our checkpoints are a
`stem.safetensors` + `stem.json` pair written by `shards.io.save_weights`; the JSON holds
{"arch": base key, "name": registry name, "kwargs": constructor kwargs}, so `load_model` rebuilds the
model without being told the architecture. Official `.pth` files are read with `weights_only=True`:
AirNet's and PReNet's bare state_dicts and Restormer's BasicSR `{'params': sd}`; the family is recognised
from the keys and the load is strict (every key and shape); the wrappers of common training code
(`{'params_ema'}`, `{'state_dict'}`, `{'model'}`, `{'net'}`, nested ones, and the `module.` prefix of
DataParallel/DDP) are unwrapped, and the log says which entry the weights came from.
"""

from __future__ import annotations

import inspect
import logging
import pickle
from pathlib import Path

import torch
from d4ir.distill.families import FAMILIES, detect_family, restormer_kwargs_from_state_dict
from d4ir.shards.errors import UnknownNameError
from d4ir.shards.io import load_weights, save_weights
from d4ir.shards.state import is_unsafe, load_plain, unsafe_reason
from torch import nn

__all__ = ["ARCHITECTURES", "FAMILIES", "build", "half_of", "count_parameters", "base_arch", "save_model",
           "load_model", "restormer_kwargs_from_state_dict"]

# Registry name -> (class, default kwargs), every family's names (distill/families.py is the one table).
ARCHITECTURES: dict[str, tuple[type[nn.Module], dict]] = {
    name: (fam.cls, kwargs) for fam in FAMILIES.values() for name, kwargs in fam.names.items()
}
OFFICIAL_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin"}
# Entries that hold the weights in checkpoints of BasicSR ('params_ema', 'params') and common training loops,
# in the order they are preferred when several are present: the EMA weights first, as BasicSR's own test
# options load them (`param_key_g: params_ema`). `load_model(weights_key=...)` (--weights-key) chooses another.
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net")

log = logging.getLogger(__name__)


def build(name: str, **overrides) -> nn.Module:
    """Build a registered network, e.g. build("half-airnet") or build("airnet", n_feats=16).

    Args:
        name: a key of ARCHITECTURES.
        overrides: constructor kwargs that replace the entry's defaults.
    """
    if name not in ARCHITECTURES:
        raise UnknownNameError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    cls, defaults = ARCHITECTURES[name]
    try:
        return cls(**{**defaults, **overrides})
    except TypeError as err:
        raise TypeError(f"bad arguments for {name!r} ({cls.__name__}): {err}") from err


def half_of(info: dict) -> tuple[str, dict]:
    """The architecture and kwargs of a loaded teacher (`load_model`'s info) with feature channels halved by
    its family's `half_kwargs`: AirNet's n_feats (its E_pre follows), Restormer's dim (the paper's students),
    PReNet's channels."""
    base = _base_of_name(info["arch"])
    kwargs = FAMILIES[base].half_kwargs(dict(info["kwargs"]))
    return name_of(base, kwargs), kwargs


def name_of(base: str, kwargs: dict) -> str:
    """A registry name that `build` accepts for a `base` family network with these (complete) kwargs: the base key
    when it is a name (airnet, prenet, ...), else the name whose defaults they equal (e.g. half-gcanet-derain), else
    the family's first name (the kwargs override its defaults). A checkpoint records its family's base key, which is
    not always a registry name (GCANet's is not: its names carry the output rule)."""
    names = FAMILIES[base].names
    if base in names:
        return base
    same = [n for n, d in names.items() if all(kwargs.get(k) == v for k, v in d.items())]
    return same[0] if same else next(iter(names))


def count_parameters(model: nn.Module) -> int:
    """All parameters (not buffers), frozen ones included: AirNet's published 8.93M counts the MoCo key
    encoder, whose parameters never receive gradients."""
    return sum(p.numel() for p in model.parameters())


def base_arch(model: nn.Module) -> str:
    """The base key ('airnet', 'restormer', 'prenet', ...) of a model built here."""
    for key, fam in FAMILIES.items():
        if isinstance(model, fam.cls):
            return key
    raise TypeError(f"{type(model).__name__} is not a registered restoration network")


def save_model(stem: str | Path, model: nn.Module, name: str | None = None, metadata: dict | None = None) -> Path:
    """Write `stem.safetensors` + `stem.json` ({"arch", "name", "kwargs"}); returns the .safetensors path.

    Args:
        stem: output path without suffix.
        model: a network of one of the families built here (it records its kwargs in `model.config`).
        name: registry name to record (e.g. "half-airnet"); defaults to the base architecture key.
        metadata: optional strings stored in the safetensors header.
    """
    arch = base_arch(model)
    config = {"arch": arch, "name": name or arch, "kwargs": dict(model.config)}
    return save_weights(stem, model.state_dict(), config, metadata)


def _strip_module(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop the `module.` prefix that DataParallel/DDP put on every key."""
    if state and all(k.startswith("module.") for k in state):
        log.warning("%s: stripped the 'module.' prefix (a DataParallel/DDP state_dict)", path)
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _unwrap(obj: dict, path: Path, key: str | None = None) -> tuple[dict, str | None]:
    """The state_dict inside training-code wrappers ({'params': sd}, {'model': {'state_dict': sd}}, ...) and
    the entry it came from ('model/state_dict'; None for a bare state_dict). `key` ("params" or a nested
    "model/state_dict") names the entry to take first instead of the WRAPPER_KEYS preference."""
    used: list[str] = []
    for part in filter(None, (key or "").split("/")):
        if not isinstance(obj.get(part), dict):
            present = [k for k, v in obj.items() if isinstance(v, dict)]
            raise ValueError(f"{path}: no {'/'.join([*used, part])!r} entry to take the weights from "
                             f"(--weights-key); entries holding weights: {', '.join(map(str, present)) or 'none'}")
        others = [k for k in WRAPPER_KEYS if k != part and isinstance(obj.get(k), dict)]
        used.append(part)
        obj = obj[part]
        also = f" (also present: {', '.join(others)})" if others else ""
        log.warning("%s: weights from the checkpoint's %r entry, as chosen%s", path, "/".join(used), also)
    while True:
        found = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if not found:
            break
        used.append(found[0])
        others = f" (also present: {', '.join(found[1:])}; --weights-key chooses)" if len(found) > 1 else ""
        log.warning("%s: weights from the checkpoint's %r entry%s", path, "/".join(used), others)
        obj = obj[found[0]]
    return obj, "/".join(used) or None


def _load_official(path: Path, arch: str | None, weights_key: str | None = None) -> tuple[nn.Module, dict]:
    try:
        obj = load_plain(path)
    except pickle.UnpicklingError as err:
        if is_unsafe(err):
            raise ValueError(f"{path}: refused: {unsafe_reason(err)}") from err
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {' '.join(str(err).split())}") from err
    except Exception as err:  # zip/format errors vary by torch version
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {' '.join(str(err).split())}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict or {{'params': state_dict}}, got {type(obj).__name__}")
    obj, container = _unwrap(obj, path, weights_key)
    state = _strip_module({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, path)
    guessed = detect_family(state)
    arch = arch or guessed
    if arch is None:
        raise ValueError(
            f"{path}: unknown checkpoint layout (keys of none of the families {', '.join(FAMILIES)}); "
            f"first keys: {list(obj)[:5]}"
        )
    named, arch = arch, _base_of_name(arch)
    if guessed is not None and guessed != arch:
        raise ValueError(f"{path} holds a {guessed} state_dict, but arch={arch!r} was requested")
    fam = FAMILIES[arch]
    if named not in fam.names and fam.unread:
        named = next(iter(fam.names))
        log.warning("%s: the keys do not say %s", path, fam.unread)
    try:  # what the keys say wins; the registry name fills in what they cannot (GCANet's output rule)
        kwargs = {**fam.names.get(named, {}), **fam.kwargs_from_state_dict(state)}
    except KeyError as err:  # keys the architecture needs are missing: a checkpoint of something else
        raise ValueError(f"{path}: {err.args[0] if err.args else err}") from err
    model = FAMILIES[arch].cls(**kwargs)
    _load_strict(model, state, path)
    info = {"arch": arch, "name": _name_of(arch, model.config), "kwargs": dict(model.config), "source": "official",
            "container": container, "path": str(path)}
    return model, info


def _name_of(arch: str, config: dict) -> str:
    """The registry name whose kwargs (over the constructor's defaults) are `config` ('prn-r' for an official
    PRN6_r file), or the base key when none is."""
    fam = FAMILIES[arch]
    defaults = {k: p.default for k, p in inspect.signature(fam.cls).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for name, kwargs in fam.names.items():
        merged = {**defaults, **fam.names[arch], **kwargs} if arch in fam.names else {**defaults, **kwargs}
        if all(merged.get(k) == v for k, v in config.items()):
            return name
    return arch


def _base_of_name(arch: str) -> str:
    if arch in FAMILIES:
        return arch
    for key, fam in FAMILIES.items():
        if arch in fam.names:
            return key
    raise UnknownNameError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # torch's message spans lines: one line for the CLI
        raise ValueError(f"{path} does not match {type(model).__name__}({model.config}): {detail}") from err


def load_model(path: str | Path, arch: str | None = None, weights_key: str | None = None) -> tuple[nn.Module, dict]:
    """Load a network from our checkpoint (stem, .safetensors or .json) or an official .pth.

    Args:
        path: our checkpoint (any of stem, stem.safetensors, stem.json) or an official .pth/.pt file.
        arch: optional base key or registry name; inferred from the file when omitted, checked when given.
        weights_key: the entry of an official .pth to take the weights from ("params", "params_ema",
            "model/state_dict"); default: the first of WRAPPER_KEYS present (the EMA weights of BasicSR).
    Returns:
        (model on the CPU in eval mode, info dict with arch, name, kwargs, source and path).
    """
    path = Path(path)
    if path.suffix in OFFICIAL_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        model, info = _load_official(path, arch, weights_key)
    else:
        stem = path.with_suffix("") if path.suffix in {".safetensors", ".json"} else path
        if not stem.with_suffix(".safetensors").exists() and not stem.with_suffix(".json").exists():
            raise FileNotFoundError(f"checkpoint not found: {path} (expected {stem}.safetensors + .json)")
        if weights_key is not None:
            raise ValueError(f"{path}: --weights-key applies to official .pth checkpoints only")
        state, config = load_weights(stem)
        if "arch" not in config or "kwargs" not in config:
            raise ValueError(f"{stem}.json is not a network checkpoint (needs 'arch' and 'kwargs')")
        base = _base_of_name(config["arch"])
        if arch is not None and _base_of_name(arch) != base:
            raise ValueError(f"{stem} holds a {base} network, but arch={arch!r} was requested")
        model = FAMILIES[base].cls(**config["kwargs"])
        _load_strict(model, state, stem)
        info = {"arch": base, "name": config.get("name", base), "kwargs": dict(model.config),
                "source": "d4ir", "path": str(stem)}
    return model.eval(), info
