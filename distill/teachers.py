"""Any teacher: the registry's networks, a TorchScript file, a torch.export program, or a Python factory.

A teacher spec (`--teacher`, `d4ir eval --model/--reference`, an experiments config's teacher checkpoint) is

* our checkpoint (stem, .safetensors or .json) or an official .pth: `distill.registry.load_model`;
* a TorchScript file (`torch.jit.save`): a zip archive with `code/` and `constants.pkl` members, whatever its
  suffix; loaded with `torch.jit.load(map_location="cpu")`, which reads its data with TorchScript's own
  restricted unpickler (tensors and TorchScript types, never Python objects);
* a torch.export program (`torch.export.save`, `.pt2`): a zip archive with an `archive_format` member that reads
  `pt2`; loaded with `torch.export.load` after the archive is checked to need no unpickling (no pickled weight
  or constant, no legacy weight file, sample inputs that `torch.load(weights_only=True)` reads), and run through
  `ExportedProgram.module()`, so it must have been exported with dynamic batch, height and width;
* `package.module:callable@weights`: the callable (importable from PYTHONPATH) is called with no arguments and
  must return an nn.Module (a factory with settings is a small function or a functools.partial); the weights
  (safetensors, or a state dict that `torch.load(weights_only=True)` reads, with the usual training-code
  wrappers) are loaded strictly.

How a file is recognised: by its archive members, not its suffix; a file that is none of these is one line naming
it. TorchScript, export programs and factories are code: load only teachers you trust.

Every teacher then passes the contract probe (distill/probe.py). A teacher from outside the registry runs inside
`ForeignTeacher`, always in eval mode; its architecture is unknown, so its students come from the registry by
name (`student_of`). Its identity (`identify`: the kind, the file or factory + weights, and their sha256) is
recorded wherever a student records its teacher; registry teachers keep being recorded by their path.
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from d4ir.shards.io import sha256_file
from d4ir.shards.state import is_unsafe, unsafe_reason
from torch import nn

from .config import DistillConfig
from .probe import _line, check_contract
from .registry import _strip_module, _unwrap, half_of, load_model

FACTORY = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
                     r"(?:@(?P<weights>.*))?$")
FOREIGN = {"torchscript": "TorchScript", "export": "torch.export", "factory": "factory"}
_REGISTRY_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".json"}  # what load_model reads
_FOREIGN_SUFFIXES = {".pt2": "export", ".ts": "torchscript", ".jit": "torchscript", ".torchscript": "torchscript"}


@dataclass(frozen=True)
class TeacherInfo:
    """What was loaded.

    kind: "registry" (our checkpoint or an official .pth), "torchscript", "export" or "factory".
    spec: the spec as given; name: a short label (registry name, file name, or the factory).
    registry: `load_model`'s info (arch, name, kwargs, ...) for registry networks, else None.
    identity: `identify(spec)` for foreign teachers, else None.
    differentiable, why_not: the probe's verdict on gradients w.r.t. the input.
    """

    kind: str
    spec: str
    name: str
    registry: dict | None = None
    identity: dict | None = None
    differentiable: bool = True
    why_not: str = ""

    def record(self) -> str | dict:
        """What a student records as its teacher: the identity of a foreign teacher, else the resolved path."""
        return self.identity if self.identity is not None else str(Path(self.spec).resolve())


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


def _factory(spec: str) -> re.Match | None:
    match = FACTORY.match(spec)
    return match if match and not Path(spec).exists() else None


def split_factory(spec: str) -> tuple[str, str | None] | None:
    """("package.module:callable", weights or None) when `spec` has the factory form, else None (by form only:
    a config resolves the weights' path against its own folder)."""
    match = FACTORY.match(spec)
    return (f"{match['module']}:{match['attr']}", match["weights"] or None) if match else None


def is_foreign(spec: str | Path) -> str | None:
    """The kind of a teacher from outside the registry ("torchscript", "export", "factory"), None for registry
    checkpoints and paths that name no file (checked where the file is read)."""
    if _factory(str(spec)):
        return "factory"
    path = Path(spec)
    kind = file_kind(path) if path.is_file() else "registry"
    return None if kind == "registry" else kind


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
    wanted = _FOREIGN_SUFFIXES.get(path.suffix.lower())
    if kind is None and wanted is not None:
        raise ValueError(f"{path} is not a {FOREIGN[wanted]} file (not a zip archive with its members)")
    if kind is None and path.suffix.lower() not in _REGISTRY_SUFFIXES:
        raise ValueError(f"{path} is not a teacher d4ir reads: give our checkpoint, an official .pth, a TorchScript "
                         "or torch.export (.pt2) file, or package.module:factory@weights")
    return kind or "registry"


def identify(spec: str | Path) -> dict | None:
    """The identity of a foreign teacher ({"kind", "path", "sha256"}, or {"kind": "factory", "factory",
    "weights", "sha256"} with the weights' hash); None for registry networks and specs that name nothing."""
    text = str(spec)
    if match := _factory(text):
        weights = Path(match["weights"] or "")
        if not match["weights"] or not weights.is_file():
            return None
        return {"kind": "factory", "factory": f"{match['module']}:{match['attr']}", "weights": str(weights.resolve()),
                "sha256": sha256_file(weights)}
    path = Path(text)
    if not path.is_file() or (kind := file_kind(path)) == "registry":
        return None
    return {"kind": kind, "path": str(path.resolve()), "sha256": sha256_file(path)}


def spec_file(spec: str | Path) -> Path:
    """The file a spec names: the weights of a factory, else the path itself."""
    match = _factory(str(spec))
    return Path(match["weights"] or ".") if match else Path(spec)


def teacher_record(spec: str | Path) -> str | dict:
    """What a student records as its teacher, without loading it: `TeacherInfo.record()` of `spec`."""
    return identify(spec) or str(spec)


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
                    raise ValueError(f"{path}: refused: its sample inputs need unpickling ({_line(err)})") from err


def _load_archive(path: Path, kind: str) -> ForeignTeacher:
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
        raise ValueError(f"cannot load {path} as a {FOREIGN[kind]} program: {_line(err)}") from err


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or torch.load(weights_only=True), training-code wrappers unwrapped."""
    if not path.is_file():
        raise FileNotFoundError(f"factory weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = unsafe_reason(err) if is_unsafe(err) else _line(err)
        raise ValueError(f"{path}: refused as factory weights: {reason}") from err
    except Exception as err:  # noqa: BLE001 - header/zip errors vary by version
        raise ValueError(f"cannot read {path} as factory weights (safetensors or a state dict): {_line(err)}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    obj, _ = _unwrap(obj, path)
    return _strip_module({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, path)


def _load_factory(match: re.Match, spec: str) -> nn.Module:
    if not match["weights"]:
        raise ValueError(f"factory teacher {spec} needs its weights: {spec}@WEIGHTS (.safetensors or a state dict)")
    module_name, attr = match["module"], match["attr"]
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - the user's module may fail in any way
        raise ValueError(f"cannot import {module_name} for teacher {spec} (is it on PYTHONPATH?): "
                         f"{_line(err)}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"teacher {spec}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"teacher {spec}: {module_name}:{attr} is not callable")
    try:
        net = obj()
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"teacher {spec}: {module_name}:{attr}() fails: {_line(err)}") from err
    if not isinstance(net, nn.Module):
        raise ValueError(f"teacher {spec}: {module_name}:{attr}() returns a {type(net).__name__}, not an nn.Module")
    state = _read_state(Path(match["weights"]))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{match['weights']} does not match {module_name}:{attr}(): {_line(err)}") from err
    return net.eval()


def load_teacher(spec: str | Path, *, arch: str | None = None, probe: bool = True) -> tuple[nn.Module, TeacherInfo]:
    """Load any teacher (see the module docstring) on the CPU in eval mode and check its contract.

    Args:
        spec: a path (our checkpoint, an official .pth, TorchScript, .pt2) or package.module:callable@weights.
        arch: the architecture of an official .pth (registry networks only).
        probe: run the contract probe (distill/probe.py); a broken contract is a one-line ValueError.
    Returns:
        (network, TeacherInfo); a foreign network is wrapped in `ForeignTeacher`.

    The global RNG is left as it was (building a registry network draws its initial weights): a student built
    after this gets the same initial weights whatever form its teacher came in.
    """
    with torch.random.fork_rng(devices=[]):
        return _load(str(spec), arch, probe)


def _load(text: str, arch: str | None, probe: bool) -> tuple[nn.Module, TeacherInfo]:
    if match := _factory(text):
        net, kind, name = ForeignTeacher(_load_factory(match, text), "factory"), "factory", text.split("@", 1)[0]
    else:
        path = Path(text)
        if not path.exists() and path.suffix.lower() in _FOREIGN_SUFFIXES:
            raise FileNotFoundError(f"teacher not found: {path}")
        kind = file_kind(path) if path.is_file() else "registry"
        if kind == "registry":
            model, registry = load_model(path, arch=arch)
            return _probed(model, TeacherInfo("registry", text, registry["name"], registry=registry), probe)
        net, name = _load_archive(path, kind), path.name
    if arch is not None:
        raise ValueError(f"--arch names the architecture of an official .pth; teacher {text} is a {FOREIGN[kind]} "
                         "program")
    return _probed(net, TeacherInfo(kind, text, name, identity=identify(text)), probe)


def _probed(net: nn.Module, info: TeacherInfo, probe: bool) -> tuple[nn.Module, TeacherInfo]:
    if not probe:
        return net, info
    result = check_contract(net, info.spec)
    return net, TeacherInfo(**{**info.__dict__, "differentiable": result.differentiable, "why_not": result.why_not})


def student_of(info: TeacherInfo, student: str) -> tuple[str, dict]:
    """The registry name and kwargs of the student: the teacher's architecture at half width for "half" (registry
    teachers only), else `student` itself with no overrides."""
    if student != "half":
        return student, {}
    if info.registry is None:
        raise ValueError(f"a {FOREIGN[info.kind]} teacher cannot be halved ({info.name}: its architecture is not one "
                         "d4ir builds): name a registry student, e.g. --student half-airnet (`d4ir models` lists them; "
                         "--student-kwargs sets its width)")
    return half_of(info.registry)


def needs_gradients(config: DistillConfig) -> str:
    """What in this training differentiates through the teacher w.r.t. its input ('' when nothing does)."""
    if config.data in ("dfsr", "dfmc"):
        return f"the {config.data.upper()} generator trains through the teacher"
    if config.joint and config.feedback_batch > 0:
        return "D4IR's feedback loss (the joint phase, --feedback-batch > 0) differentiates through the teacher"
    return ""


def check_gradients(info: TeacherInfo, config: DistillConfig) -> None:
    """Refuse a teacher without input gradients for a training that needs them, in one line saying what runs."""
    why = needs_gradients(config)
    if why and not info.differentiable:
        raise ValueError(f"teacher {info.spec} is not differentiable with respect to its input ({info.why_not}), "
                         f"but {why}: it can teach with --feedback-batch 0 or --joint-epochs 0, a pinned --round, "
                         "or --data original/web")
