"""JSON -> `ExperimentConfig`: field names checked, paths resolved against the config's folder, mixed tasks
filled from the tasks they join, each table completed with the paper's defaults (pipelines/experiments/tables.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from d4ir.distill.shipped import SHIPPED_PREFIX, shipped_teacher
from d4ir.distill.teachers import split_factory
from d4ir.pipelines.options import object_fields
from d4ir.shards.layout import ExperimentLayout

from .config import (
    FOLDER_FIELDS,
    PREPARED,
    WEATHERS,
    ExperimentConfig,
    Folder,
    ScaleConfig,
    TableSpec,
    TaskConfig,
    TeacherSpec,
)
from .tables import TABLES

TOP = ("description", "out", "sd", "sd_config", "scale", "seed", "device", "threads", "vs_teacher", "export", "prepare",
       "tasks", "tables", "eval_limit")
TASK = ("weather", "teacher", "restormer_teacher", "web_degraded", "web_clean", "original", "test", "val", "mix")
TEACHER = ("checkpoint", "train", "arch", "kwargs", "overrides", "student", "student_kwargs")
TABLE = ("task", "teacher", "tests", "rows")


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    return value


class _Paths:
    """Resolves the config's paths: relative ones against the config's folder, `prepared:NAME/sub` under
    OUT/data/NAME (NAME must be in `prepare`)."""

    def __init__(self, base: Path, out: Path, prepared: tuple[str, ...]) -> None:
        self.base, self.out, self.prepared = base, out, prepared

    def path(self, value: Any, where: str) -> Path:
        text = _str(value, where)
        if text.startswith(PREPARED):
            name, _, sub = text[len(PREPARED):].partition("/")
            if name not in self.prepared:
                raise ValueError(f"{where}: {text!r} names dataset {name!r}, which `prepare` does not build")
            return ExperimentLayout(self.out).data(name) / sub
        path = Path(text).expanduser()
        return path if path.is_absolute() else (self.base / path).resolve()

    def folder(self, value: Any, where: str) -> Folder | None:
        if value is None:
            return None
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{where}: an empty list of folders")
            return tuple(self.path(v, f"{where}[{i}]") for i, v in enumerate(value))
        return self.path(value, where)


def _checkpoint(value: Any, where: str, paths: _Paths) -> Path | str | None:
    """A teacher file resolved like every path, or `package.module:callable@WEIGHTS` with only WEIGHTS resolved."""
    if value is None:
        return None
    if _str(value, where).startswith(SHIPPED_PREFIX):  # a teacher shipped inside the package (distill/shipped.py)
        return shipped_teacher(value)
    factory = split_factory(value)
    if factory is None or value.startswith(PREPARED) or (paths.base / value).exists():
        return paths.path(value, where)
    if factory[1] is None:
        raise ValueError(f"{where}: factory teacher {value!r} needs its weights: {value}@WEIGHTS")
    return f"{factory[0]}@{paths.path(factory[1], where)}"


def _teacher(value: Any, where: str, paths: _Paths) -> TeacherSpec | None:
    if value is None:
        return None
    d = object_fields(value, where, TEACHER)
    try:
        spec = TeacherSpec(checkpoint=_checkpoint(d.get("checkpoint"), f"{where}.checkpoint", paths),
                           train=paths.folder(d.get("train"), f"{where}.train"), arch=d.get("arch", "airnet"),
                           kwargs=d.get("kwargs"), overrides=d.get("overrides", {}), student=d.get("student"),
                           student_kwargs=d.get("student_kwargs"))
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from err
    if spec.checkpoint is not None and ("arch" in d or "kwargs" in d):
        # the rows load a checkpoint by its keys (registry.load_model): a name given here would go unread
        raise ValueError(f"{where}: arch and kwargs describe a teacher trained here and are not read for a "
                         "checkpoint (its architecture comes from its keys): remove them")
    return spec


def _task(name: str, value: Any, paths: _Paths) -> TaskConfig:
    where = f"tasks.{name}"
    d = object_fields(value, where, TASK)
    weather = d.get("weather", name if name in WEATHERS else None)
    if weather is None:
        raise ValueError(f"{where}.weather: task {name!r} is not named after a weather; give one of "
                         f"{', '.join(WEATHERS)}")
    tests = _dict(d.get("test", {}), f"{where}.test")
    mix = d.get("mix", [])
    if not isinstance(mix, list) or not all(isinstance(m, str) for m in mix):
        raise ValueError(f"{where}.mix: expected a list of task names, got {mix!r}")
    parts = dict(teacher=_teacher(d.get("teacher"), f"{where}.teacher", paths),
                 restormer_teacher=_teacher(d.get("restormer_teacher"), f"{where}.restormer_teacher", paths),
                 **{f: paths.folder(d.get(f), f"{where}.{f}") for f in FOLDER_FIELDS},
                 test={k: paths.folder(v, f"{where}.test.{k}") for k, v in tests.items()})
    try:
        return TaskConfig(weather=weather, val=d.get("val"), mix=tuple(mix), **parts)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from err


def _flat(folders: list[Folder | None]) -> tuple[Path, ...]:
    out: list[Path] = []
    for f in folders:
        out += list(f) if isinstance(f, tuple) else [f]
    return tuple(dict.fromkeys(out))  # the same folder twice is mixed in once


def _mixed(name: str, task: TaskConfig, tasks: dict[str, TaskConfig]) -> TaskConfig:
    """A task that joins others: each folder it does not give is the list of theirs (None where one lacks
    it), its test sets are theirs too (a name given twice is an error)."""
    where = f"tasks.{name}.mix"
    for other in task.mix:
        if other not in tasks or other == name:
            raise ValueError(f"{where}: {other!r} is not another task of the config")
        if tasks[other].mix:
            raise ValueError(f"{where}: {other!r} mixes tasks itself; mix only plain tasks")
    changes: dict[str, Any] = {}
    for f in FOLDER_FIELDS:
        parts = [tasks[o].part(f) for o in task.mix]
        if task.part(f) is None and all(p is not None for p in parts):
            changes[f] = _flat(parts)
    test = dict(task.test)
    for other in task.mix:
        for test_name, folder in tasks[other].test.items():
            if test_name in test and test[test_name] != folder:
                raise ValueError(f"{where}: test set {test_name!r} of {other!r} clashes with another of that name")
            test[test_name] = folder
    return dataclasses.replace(task, test=test, **changes)


def _with_teacher(name: str, task: TaskConfig) -> TaskConfig:
    """The default teacher (an AirNet trained on the original pairs); the original pairs default to the ones the
    teacher trains on; an error without pairs to train a teacher on."""
    teacher = task.teacher or TeacherSpec()
    original = task.original if task.original is not None else teacher.train  # what the teacher was trained on
    for field_name, spec in (("teacher", teacher), ("restormer_teacher", task.restormer_teacher)):
        if spec is not None and spec.checkpoint is None and spec.train is None and original is None:
            raise ValueError(f"tasks.{name}.{field_name}: give a checkpoint, or the pairs to train it on "
                             f"({field_name}.train or the task's original)")
    return dataclasses.replace(task, teacher=teacher, original=original)


def _tables(value: Any) -> tuple[TableSpec, ...]:
    if isinstance(value, list):
        value = {_str(v, "tables[]"): {} for v in value}
    tables = []
    for name, spec in object_fields(value, "tables", tuple(TABLES)).items():
        where, d, default = f"tables.{name}", object_fields(spec or {}, f"tables.{name}", TABLE), TABLES[name]
        for key in ("tests", "rows"):
            if key in d and (not isinstance(d[key], list) or not all(isinstance(v, str) for v in d[key])):
                raise ValueError(f"{where}.{key}: expected a list of names, got {d[key]!r}")
        try:
            tables.append(TableSpec(name=name, task=d.get("task", default.task),
                                    teacher=d.get("teacher", default.teacher),
                                    tests=tuple(d["tests"]) if "tests" in d else default.tests,
                                    rows=tuple(d.get("rows", default.rows))))
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from err
    return tuple(tables)


def _local(spec: Any, base: Path) -> Any:
    """An SD spec or config naming a path relative to the config file, made absolute; anything else as given
    (tiny, a cached hub id)."""
    if isinstance(spec, str) and spec != "tiny" and (base / spec).exists():
        return str((base / spec).resolve())
    return spec


def parse_config(data: Any, base: Path, out: str | Path | None = None) -> ExperimentConfig:
    """The validated config of a parsed JSON object whose relative paths are relative to `base`."""
    top = object_fields(data, "config", TOP)
    if out is None and "out" not in top:
        raise ValueError("out: name the experiments folder (or pass --out)")
    out_dir = Path(out).resolve() if out is not None else _Paths(base, base, ()).path(top["out"], "out")
    prepare = _dict(top.get("prepare", {}), "prepare")
    paths = _Paths(base, out_dir, tuple(prepare))
    tasks = {name: _task(name, spec, paths) for name, spec in _dict(top.get("tasks", {}), "tasks").items()}
    tasks = {name: t if t.mix else _with_teacher(name, t) for name, t in tasks.items()}
    tasks = {name: _with_teacher(name, _mixed(name, t, tasks)) if t.mix else t for name, t in tasks.items()}
    sd, sd_config = (_local(top.get(k, default), base) for k, default in (("sd", "tiny"), ("sd_config", None)))
    return ExperimentConfig(
        out=out_dir, sd=sd, sd_config=sd_config,
        scale=ScaleConfig(**object_fields(top.get("scale", {}), "scale", ("preset", "teacher", "prompts", "synth",
                                                                     "distill"))),
        seed=top.get("seed", 0), device=top.get("device"), threads=top.get("threads"),
        vs_teacher=top.get("vs_teacher", False), export=top.get("export", False),
        prepare={name: paths.path(v, f"prepare.{name}") for name, v in prepare.items()},
        tasks=tasks, tables=_tables(top.get("tables", [])), eval_limit=top.get("eval_limit"))
