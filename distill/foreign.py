"""Reading the teachers from outside the registry: TorchScript and torch.export archives (recognised by their
members, never by suffix alone, and checked to need no unpickling) and `package.module:callable@WEIGHTS` factories
(safetensors, or a state dict read with weights_only=True). The spec-level API is distill/teachers.py.
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from d4ir.shards.state import is_unsafe, unsafe_reason
from torch import nn

from .probe import one_line
from .registry import _strip_module, _unwrap

FACTORY = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
                     r"(?:@(?P<weights>.*))?$")
FOREIGN = {"torchscript": "TorchScript", "export": "torch.export", "factory": "factory"}
REGISTRY_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".json"}  # what load_model reads
FOREIGN_SUFFIXES = {".pt2": "export", ".ts": "torchscript", ".jit": "torchscript", ".torchscript": "torchscript"}


class ForeignTeacher(nn.Module):
    """A network from outside the registry, frozen and always in eval mode (exported programs cannot switch
    modes, and a teacher never trains): `train()` only sets this wrapper's flag.

    forward: x [B,3,H,W] in [0, 1] -> restored [B,3,H,W].
    """

    def __init__(self, net: nn.Module, kind: str, program: torch.export.ExportedProgram | None = None) -> None:
        super().__init__()
        self.net, self.kind, self._program = net, kind, program
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> ForeignTeacher:
        self.training = mode
        return self

    def to(self, *args, **kwargs) -> ForeignTeacher:
        """Moving an exported program rebuilds it with `move_to_device_pass`: its graph names devices (a
        `zeros(..., device=cpu)` it made while tracing) that moving the weights would leave behind."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if self._program is not None and device is not None:
            from torch.export.passes import move_to_device_pass

            self.net = move_to_device_pass(self._program, device).module()
            self.requires_grad_(False)
        return super().to(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def factory_match(spec: str) -> re.Match | None:
    """The parts (module, attr, weights) of a `package.module:callable@WEIGHTS` spec; None for anything else,
    an existing file of that name included."""
    match = FACTORY.match(spec)
    return match if match and not Path(spec).exists() else None


def split_factory(spec: str) -> tuple[str, str | None] | None:
    """("package.module:callable", weights or None) when `spec` has the factory form, else None (by form only:
    a config resolves the weights' path against its own folder)."""
    match = FACTORY.match(spec)
    return (f"{match['module']}:{match['attr']}", match["weights"] or None) if match else None


def _archive_kind(path: Path) -> str | None:
    """"torchscript" or "export" from a zip archive's members; None for anything else (a torch.save file too)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        fmt = [n for n in names if n.split("/", 1)[-1] == "archive_format"]
        if fmt and z.read(fmt[0]).strip() == b"pt2":
            return "export"
    if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return None


def file_kind(path: Path) -> str:
    """"torchscript", "export" or "registry" for an existing file; a foreign suffix on another file is an error."""
    kind = _archive_kind(path)
    wanted = FOREIGN_SUFFIXES.get(path.suffix.lower())
    if kind is None and wanted is not None:
        raise ValueError(f"{path} is not a {FOREIGN[wanted]} file (not a zip archive with its members)")
    if kind is None and path.suffix.lower() not in REGISTRY_SUFFIXES:
        raise ValueError(f"{path} is not a teacher d4ir reads: give our checkpoint, an official .pth, a TorchScript "
                         "or torch.export (.pt2) file, or package.module:factory@weights")
    return kind or "registry"


def _export_safe(path: Path) -> None:
    """Refuse a .pt2 archive that torch.export.load would unpickle (pickled weights or constants, legacy files,
    sample inputs beyond weights_only)."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            part = name.split("/", 1)[-1]
            if part.endswith("_config.json") and part.startswith(("data/weights/", "data/constants/")):
                entries = json.loads(z.read(name)).get("config", {})
                bad = [k for k, v in entries.items() if v.get("use_pickle")
                       or not str(v.get("path_name", "")).startswith(("weight_", "tensor_"))]
                if bad:
                    raise ValueError(f"{path}: refused: entries {bad[:3]} of {part} would be unpickled")
            elif part.startswith(("data/weights/", "data/constants/")) and part.endswith(".pt"):
                raise ValueError(f"{path}: refused: {part} is a legacy pickled file (save the program again with "
                                 "torch.export.save)")
            elif part.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(z.read(name)), map_location="cpu", weights_only=True)
                except Exception as err:  # noqa: BLE001 - torch would retry with weights_only=False
                    raise ValueError(f"{path}: refused: its sample inputs need unpickling ({one_line(err)})") from err


def load_archive(path: Path, kind: str) -> ForeignTeacher:
    """A TorchScript ("torchscript") or torch.export ("export") archive on the CPU, in a ForeignTeacher."""
    try:
        if kind == "torchscript":
            return ForeignTeacher(torch.jit.load(str(path), map_location="cpu").eval(), kind)
        _export_safe(path)
        import torchvision  # noqa: F401 - registers the torchvision:: ops (deform_conv2d) a program may call

        program = torch.export.load(str(path))
        return ForeignTeacher(program.module(), kind, program)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged archive fails in many ways
        raise ValueError(f"cannot load {path} as a {FOREIGN[kind]} program: {one_line(err)}") from err


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or torch.load(weights_only=True), training-code wrappers unwrapped."""
    if not path.is_file():
        raise FileNotFoundError(f"factory weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = unsafe_reason(err) if is_unsafe(err) else one_line(err)
        raise ValueError(f"{path}: refused as factory weights: {reason}") from err
    except Exception as err:  # noqa: BLE001 - header/zip errors vary by version
        raise ValueError(f"cannot read {path} as factory weights (safetensors or a state dict): "
                         f"{one_line(err)}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    obj, _ = _unwrap(obj, path)
    return _strip_module({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, path)


def load_factory(match: re.Match, spec: str) -> ForeignTeacher:
    """The factory's network with its weights loaded strictly, in a ForeignTeacher."""
    if not match["weights"]:
        raise ValueError(f"factory teacher {spec} needs its weights: {spec}@WEIGHTS (.safetensors or a state dict)")
    module_name, attr = match["module"], match["attr"]
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - the user's module may fail in any way
        raise ValueError(f"cannot import {module_name} for teacher {spec} (is it on PYTHONPATH?): "
                         f"{one_line(err)}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"teacher {spec}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"teacher {spec}: {module_name}:{attr} is not callable")
    try:
        net = obj()
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"teacher {spec}: {module_name}:{attr}() fails: {one_line(err)}") from err
    if not isinstance(net, nn.Module):
        raise ValueError(f"teacher {spec}: {module_name}:{attr}() returns a {type(net).__name__}, not an nn.Module")
    state = read_state(Path(match["weights"]))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{match['weights']} does not match {module_name}:{attr}(): {one_line(err)}") from err
    return ForeignTeacher(net.eval(), "factory")
