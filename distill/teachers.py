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

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from d4ir.shards.io import sha256_file
from d4ir.shards.layout import CONFIG_FILE
from torch import nn

from .config import DistillConfig
from .foreign import (
    FOREIGN,
    FOREIGN_SUFFIXES,
    ForeignTeacher,
    factory_match,
    file_kind,
    load_archive,
    load_factory,
    split_factory,
)
from .probe import check_contract
from .registry import half_of, load_model

__all__ = ["FOREIGN", "ForeignTeacher", "TeacherInfo", "check_gradients", "identify", "is_foreign", "load_teacher",
           "needs_gradients", "recorded_teacher", "spec_file", "split_factory", "student_of", "teacher_record"]


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


def is_foreign(spec: str | Path) -> str | None:
    """The kind of a teacher from outside the registry ("torchscript", "export", "factory"), None for registry
    checkpoints and paths that name no file (checked where the file is read)."""
    if factory_match(str(spec)):
        return "factory"
    path = Path(spec)
    kind = file_kind(path) if path.is_file() else "registry"
    return None if kind == "registry" else kind


def identify(spec: str | Path) -> dict | None:
    """The identity of a foreign teacher ({"kind", "path", "sha256"}, or {"kind": "factory", "factory",
    "weights", "sha256"} with the weights' hash); None for registry networks and specs that name nothing."""
    text = str(spec)
    if match := factory_match(text):
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
    match = factory_match(str(spec))
    return Path(match["weights"] or ".") if match else Path(spec)


def recorded_teacher(student_dir: str | Path) -> str | None:
    """The spec of the teacher a finished student recorded in its config.json (`TeacherInfo.record()`), when
    its file is still there; None otherwise."""
    config = Path(student_dir) / CONFIG_FILE
    record = json.loads(config.read_text()).get("teacher") if config.is_file() else None
    if isinstance(record, dict):
        spec = f"{record['factory']}@{record['weights']}" if record.get("kind") == "factory" else record.get("path")
    else:
        spec = record
    return spec if isinstance(spec, str) and spec_file(spec).exists() else None


def teacher_record(spec: str | Path) -> str | dict:
    """What a student records as its teacher, without loading it: `TeacherInfo.record()` of `spec`."""
    return identify(spec) or str(spec)


def load_teacher(spec: str | Path, *, arch: str | None = None, weights_key: str | None = None,
                 probe: bool = True) -> tuple[nn.Module, TeacherInfo]:
    """Load any teacher (see the module docstring) on the CPU in eval mode and check its contract.

    Args:
        spec: a path (our checkpoint, an official .pth, TorchScript, .pt2) or package.module:callable@weights.
        arch: the architecture of an official .pth (registry networks only).
        weights_key: the entry of a training-code checkpoint holding the weights (registry networks only; default:
            `registry.WRAPPER_KEYS`' order, EMA weights first).
        probe: run the contract probe (distill/probe.py); a broken contract is a one-line ValueError.
    Returns:
        (network, TeacherInfo); a foreign network is wrapped in `ForeignTeacher`.

    The global RNG is left as it was (building a registry network draws its initial weights): a student built
    after this gets the same initial weights whatever form its teacher came in.
    """
    with torch.random.fork_rng(devices=[]):
        return _load(str(spec), arch, weights_key, probe)


def _load(text: str, arch: str | None, weights_key: str | None, probe: bool) -> tuple[nn.Module, TeacherInfo]:
    if match := factory_match(text):
        net, kind, name = load_factory(match, text), "factory", text.split("@", 1)[0]
    else:
        path = Path(text)
        if not path.exists() and path.suffix.lower() in FOREIGN_SUFFIXES:
            raise FileNotFoundError(f"teacher not found: {path}")
        kind = file_kind(path) if path.is_file() else "registry"
        if kind == "registry":
            model, registry = load_model(path, arch=arch, weights_key=weights_key)
            return _probed(model, TeacherInfo("registry", text, registry["name"], registry=registry), probe)
        net, name = load_archive(path, kind), path.name
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
