"""The experiments' JSON config: validated dataclasses, one clear error per bad field.

A config names the frozen SD, the scale (a preset with per-stage overrides of its dataclass fields), the seed
and device, the datasets to prepare, the tasks (per weather: teachers, web folders, the teacher's original
pairs, named test sets) and the tables to run. Every path is relative to the config file (a shipped config's, given
by name, to the current folder: pipelines/experiments/shipped.py); `prepared:NAME/sub`
names a folder a dataset builder wrote (pipelines/experiments/datasets.py) under OUT/data/NAME. An error names
the field by its path in the file (e.g. `tasks.derain.test.SPA`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d4ir.distill.registry import ARCHITECTURES
from d4ir.pipelines.options import apply_overrides, object_fields
from d4ir.pipelines.presets import PRESETS, STAGES, preset
from d4ir.synth.plan import WEATHERS as PIPELINE_WEATHERS

from .tables import ROWS, TABLES, TEACHER_FIELDS

WEATHERS = (*PIPELINE_WEATHERS, "all")  # a task's weather: one of the pipeline's, or all of them mixed
PREPARED = "prepared:"
# Fields the experiments set per row or per stage; an override of them would be silently lost, so it is refused.
OWNED = {"teacher": ("arch", "seed"), "prompts": ("seed",),
         "synth": ("prompt_mode", "text", "seed", "round", "ccd.z0"), "distill": ("student", "data", "seed", "round")}
FOLDER_FIELDS = ("web_degraded", "web_clean", "original")

Folder = Path | tuple[Path, ...]  # one folder, or several mixed into one (the all-in-one task)


def _owned(overrides: dict, stage: str, where: str) -> None:
    for dotted in OWNED[stage]:
        node: Any = overrides
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ValueError(f"{where}.{dotted}: set by the experiments for each row; remove it")


@dataclass(frozen=True)
class ScaleConfig:
    """The scale every stage runs at.

    Args:
        preset: demo (the CPU scale of pipelines/presets.py) or paper (the paper's settings).
        teacher, prompts, synth, distill: overrides of that stage's config fields (SupervisedConfig,
            PromptsConfig, SynthConfig, DistillConfig); nested configs (ccd, moco, datafree) as objects.
    """

    preset: str = "demo"
    teacher: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)
    synth: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"scale.preset: unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for stage in STAGES:
            _owned(object_fields(getattr(self, stage), f"scale.{stage}", _fields_of(stage)), stage, f"scale.{stage}")
            self.stage(stage)  # raises on a bad value

    def stage(self, name: str) -> Any:
        """The config of stage `name` at this scale (the preset with this scale's overrides)."""
        return apply_overrides(preset(self.preset, name), getattr(self, name), f"scale.{name}")


def _fields_of(stage: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(preset("paper", stage)))


@dataclass(frozen=True)
class TeacherSpec:
    """A task's teacher: an existing checkpoint, or one trained here on paired data.

    Args:
        checkpoint: an existing teacher (our .safetensors or an official AirNet/Restormer .pth); nothing trained.
        train: the paired set the teacher is trained on (default: the task's original pairs).
        arch: registry name of a teacher trained here (`d4ir models`).
        kwargs: its constructor overrides (default: the scale's teacher width when arch is the preset's).
        overrides: SupervisedConfig fields for this teacher (and its Student row) only, e.g. {"epochs": 2}.
        student: registry name of every student of this teacher (default: the teacher's architecture at half
            width; required for a TorchScript, torch.export or factory checkpoint, which cannot be halved).
        student_kwargs: that student's constructor overrides.
    """

    checkpoint: Path | str | None = None  # a str: package.module:callable@WEIGHTS (distill/teachers.py)
    train: Folder | None = None
    arch: str = "airnet"
    kwargs: dict | None = None
    overrides: dict = field(default_factory=dict)
    student: str | None = None
    student_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.train is not None:
            raise ValueError("give a checkpoint or train (a paired set to train on), not both")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch: unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        for name in ("kwargs", "student_kwargs"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}: expected an object, got {type(getattr(self, name)).__name__}")
        if self.student is not None and self.student not in ARCHITECTURES:
            raise ValueError(f"student: unknown architecture {self.student!r}; known: {', '.join(ARCHITECTURES)}")
        if self.student_kwargs is not None and self.student is None:
            raise ValueError("student_kwargs: name the student too (student: a registry name)")
        _owned(object_fields(self.overrides, "overrides", _fields_of("teacher")), "teacher", "overrides")


@dataclass(frozen=True)
class TaskConfig:
    """One weather task: its teachers, web folders, the teacher's original pairs and its test sets.

    Args:
        weather: derain, dehaze, desnow or all (default: the task's name).
        teacher: the teacher of every table but Table 5 (default: an AirNet trained on `original`).
        restormer_teacher: Table 5's teacher (a Restormer, dim 24 in the paper; students get half its width).
        web_degraded: web-collected degraded photos (stage 1, L_cl, M0).
        web_clean: web-collected clean photos (stage 2's content).
        original: the teacher's own paired training set (Student and Data rows need it).
        test: named paired test sets, e.g. {"Rain100L": "...", "SPA": "..."}.
        val: the test set scored after every epoch (training curves); none by default (it costs time).
        mix: tasks whose folders and test sets this one joins (the all-in-one task: derain, dehaze, desnow).
    """

    weather: str
    teacher: TeacherSpec | None = None
    restormer_teacher: TeacherSpec | None = None
    web_degraded: Folder | None = None
    web_clean: Folder | None = None
    original: Folder | None = None
    test: dict[str, Folder] = field(default_factory=dict)
    val: str | None = None
    mix: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.weather not in WEATHERS:
            raise ValueError(f"weather: expected one of {', '.join(WEATHERS)}, got {self.weather!r}")
        for name in self.test:
            if not name.strip() or "/" in name:
                raise ValueError(f"test: a test set needs a plain name, got {name!r}")
        if self.val is not None and self.val not in self.test:
            raise ValueError(f"val: {self.val!r} is not one of the test sets ({', '.join(self.test) or 'none'})")

    def part(self, name: str) -> Any:
        return getattr(self, name)


@dataclass(frozen=True)
class TableSpec:
    """A table to run.

    Args:
        name: 1, 2, 3, 4, 5, desnow or all (pipelines/experiments/tables.py).
        task: the task it runs on (default: the table's: derain, dehaze, desnow or all).
        teacher: teacher or restormer_teacher (default: the table's).
        tests: the test sets it is scored on (default: the paper's, e.g. Rain100L; all's: every one).
        rows: a subset of rows (default: the paper's rows of the table; any row name is allowed).
    """

    name: str
    task: str
    teacher: str
    tests: tuple[str, ...] | None
    rows: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.name not in TABLES:
            raise ValueError(f"name: unknown table {self.name!r}; known: {', '.join(TABLES)}")
        if self.teacher not in TEACHER_FIELDS:
            raise ValueError(f"teacher: expected one of {', '.join(TEACHER_FIELDS)}, got {self.teacher!r}")
        bad = [r for r in self.rows if r not in ROWS]
        if bad or not self.rows:
            raise ValueError(f"rows: unknown row {bad[0] if bad else '(none)'!r}; known: {', '.join(ROWS)}")


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole matrix.

    Args:
        out: the experiments folder (OUT): runs, row results, prepared data, report.md.
        sd: the frozen SD spec (tiny, a diffusers folder, a single file, a cached hub id).
        sd_config: configs of a single-file SD (`--sd-config`).
        scale: see `ScaleConfig`.
        seed: the seed of every stage.
        device: cpu, cuda or cuda:N (default: cuda when available).
        threads: torch CPU threads (default: torch's).
        vs_teacher: also score every row against the teacher's outputs (ref_* metrics in eval.json, a column in
            the report); off by default, as it runs the teacher once more per test image and row.
        export: after the rows, export each task's teacher and D4IR student to ONNX and time them with
            onnxruntime (OUT/TASK/export/latency.json, a table in the report; the demo's device check).
        prepare: dataset builders to run, name -> the shared data folder they read (e.g. rain100l-split).
        tasks: name -> `TaskConfig`.
        tables: the tables to run (`TableSpec`), in report order.
        eval_limit: score every row on only the first N pairs of each test set (a smoke run; the report says so);
            None scores them all.
    """

    out: Path
    sd: str = "tiny"
    sd_config: str | None = None
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    vs_teacher: bool = False
    export: bool = False
    prepare: dict[str, Path] = field(default_factory=dict)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    tables: tuple[TableSpec, ...] = ()
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        from .datasets import BUILDERS

        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        for name in ("vs_teacher", "export"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected a positive integer, got {self.threads!r}")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or isinstance(self.eval_limit, bool)
                                            or self.eval_limit < 1):
            raise ValueError(f"eval_limit: expected a positive integer (or null), got {self.eval_limit!r}")
        if not isinstance(self.sd, str) or not self.sd.strip():
            raise ValueError(f"sd: expected an SD spec (e.g. tiny), got {self.sd!r}")
        for name in ("sd_config", "device"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        for name in self.prepare:
            if name not in BUILDERS:
                raise ValueError(f"prepare: unknown dataset builder {name!r}; known: {', '.join(BUILDERS)}")
        if not self.tables:
            raise ValueError("tables: name at least one table")


def load_config(path: str | Path, out: str | Path | None = None, *, base: str | Path | None = None,
                data: tuple[str, ...] = ()) -> ExperimentConfig:
    """Read and validate a config file; `out` (e.g. the CLI's --out) replaces the file's out.

    Args:
        base: the folder relative paths are resolved against (default: the file's folder; the current folder for
            a shipped config, see pipelines/experiments/shipped.py).
        data: --data values (DIR or NAME=DIR) replacing the sources of the config's `prepare` datasets.
    """
    from .config_parse import parse_config
    from .shipped import data_roots

    path = Path(path)
    try:
        data_ = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config not found: {path}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if data and isinstance(data_, dict):
        prepare = data_.get("prepare", {})
        roots = data_roots(data, list(prepare) if isinstance(prepare, dict) else [])
        data_ = {**data_, "prepare": {**prepare, **{k: str(v) for k, v in roots.items()}}}
    try:
        return parse_config(data_, Path(base).resolve() if base is not None else path.resolve().parent, out)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
