"""`d4ir experiments CONFIG`: the paper's tables from one resumable command.

1. prepare: the dataset builders the config names write OUT/data/NAME (reused when finished);
2. plan: each table becomes its task, teacher, test sets and rows; a row whose parts are missing (no original
   pairs for Student/Data, no web folder, no text prompt for M1/M5, no Restormer teacher for Table 5, no test
   set of that name) is skipped with the reason, never silently;
3. rows: the rows of every table, each (task, teacher, row) once, the teacher first; each writes its eval.json
   per test set and its done marker, so a rerun skips finished rows and resumes an interrupted one;
4. export (a config with `"export": true`, the demo): each task's teacher and D4IR student to ONNX, timed;
5. report: OUT/report.md (pipelines/experiments/report.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from d4ir.distill.teachers import FOREIGN, is_foreign, spec_file
from d4ir.shards.layout import DONE_FILE
from d4ir.synth.plan import WEATHER_TEXT
from d4ir.synth.sd import default_device

from . import stages
from .config import FOLDER_FIELDS, ExperimentConfig, TeacherSpec
from .datasets import prepare
from .inputs import check_exists
from .rows import run_row
from .steps import Context
from .tables import ROW_ORDER, ROWS, TABLES

RESERVED = ("data", "samples", "figures")  # folders of OUT that are not tasks


@dataclass
class PlannedTable:
    """A table as it will run: its task, teacher field, test sets and rows; what is skipped and why."""

    name: str
    title: str
    task: str
    teacher: str
    tests: list[str] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    skipped_rows: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None  # the whole table
    notes: list[str] = field(default_factory=list)


class _TextCheck:
    """Whether the SD has a text encoder (M1/M5), asked only when a text row is planned."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.answer = ctx, None

    def __call__(self) -> bool:
        if self.answer is None:
            sd = stages.load_sd_cached(self.ctx.sd, self.ctx.device, "float32")
            self.answer = sd.text_encoder is not None and sd.tokenizer is not None
        return self.answer


def _missing(config: ExperimentConfig, task: str, key: str, has_text: _TextCheck) -> str | None:
    t = config.tasks[task]
    for need in ROWS[key].needs:
        if need in FOLDER_FIELDS and t.part(need) is None:
            what = "the teacher's original paired data" if need == "original" else f"a {need} folder"
            return f"task {task!r} lacks {what} (`{need}`)"
        if need == "text" and t.weather not in WEATHER_TEXT:
            return f"weather {t.weather!r} has no text prompt (synth.plan.WEATHER_TEXT)"
        if need == "text" and not has_text():
            return f"SD {config.sd!r} has no text encoder"
    return None


def plan(config: ExperimentConfig, has_text: _TextCheck) -> list[PlannedTable]:
    """Every table of the config with what runs and what is skipped, and why."""
    planned = []
    for spec in config.tables:
        p = PlannedTable(spec.name, TABLES[spec.name].title, spec.task, spec.teacher)
        planned.append(p)
        if spec.task not in config.tasks:
            p.skipped = f"the config has no task {spec.task!r}"
            continue
        task = config.tasks[spec.task]
        if getattr(task, spec.teacher) is None:
            p.skipped = (f"task {spec.task!r} has no {spec.teacher} (Table 5 distils a Restormer teacher, dim 24 in "
                         "the paper, into a student of half its width)")
            continue
        wanted = list(spec.tests) if spec.tests is not None else list(task.test)
        p.tests = [t for t in wanted if t in task.test]
        lacking = [t for t in wanted if t not in task.test]
        if lacking:
            p.notes.append(f"task {spec.task!r} has no test set {', '.join(map(repr, lacking))} "
                           f"(its test sets: {', '.join(task.test) or 'none'})")
        if not p.tests:
            p.skipped = p.notes.pop()
            continue
        for key in spec.rows:
            reason = _missing(config, spec.task, key, has_text)
            if reason:
                p.skipped_rows[key] = reason
            else:
                p.rows.append(key)
    return planned


def _jobs(tables: list[PlannedTable]) -> list[tuple[str, str, str, list[str]]]:
    """(task, teacher field, row, test sets) of every row to run, each once, the teacher's first."""
    jobs: dict[tuple[str, str, str], list[str]] = {}
    for t in tables:
        if t.skipped:
            continue
        for key in t.rows:
            tests = jobs.setdefault((t.task, t.teacher, key), [])
            tests += [name for name in t.tests if name not in tests]
    order = {k: i for i, k in enumerate(ROW_ORDER)}
    groups = list(dict.fromkeys((task, teacher) for task, teacher, _ in jobs))
    keys = sorted(jobs, key=lambda j: (groups.index(j[:2]), order[j[2]]))
    return [(task, teacher, key, jobs[(task, teacher, key)]) for task, teacher, key in keys]


def _check_paths(config: ExperimentConfig, tables: list[PlannedTable]) -> None:
    for name in dict.fromkeys(t.task for t in tables if not t.skipped):
        task = config.tasks[name]
        if name in RESERVED or "/" in name or name.startswith("."):
            raise ValueError(f"tasks.{name}: a task name must be a plain folder name other than "
                             f"{', '.join(RESERVED)}")
        for f in FOLDER_FIELDS:
            check_exists(task.part(f), f"tasks.{name}.{f}")
        for test, folder in task.test.items():
            check_exists(folder, f"tasks.{name}.test.{test}")
        for f in ("teacher", "restormer_teacher"):
            spec = getattr(task, f)
            if spec is not None:
                _check_teacher(spec, f"tasks.{name}.{f}")


def _check_teacher(spec: TeacherSpec, where: str) -> None:
    """The teacher's files exist; one from outside the registry names its students' architecture."""
    check_exists(spec_file(spec.checkpoint) if spec.checkpoint else None, f"{where}.checkpoint")
    check_exists(spec.train, f"{where}.train")
    kind = is_foreign(spec.checkpoint) if spec.checkpoint else None
    if kind and spec.student is None:
        raise ValueError(f"{where}: a {FOREIGN[kind]} teacher cannot be halved: name its students' registry "
                         "architecture in student (and their width in student_kwargs)")


def export_task(ctx: Context, task: str, field: str) -> dict:
    """The device check: the task's teacher and its D4IR student exported to ONNX and timed by onnxruntime into
    OUT/TASK/export/latency.json (pipelines/demo_export.py); skipped, with the reason logged, without the extra."""
    from d4ir.shards.layout import RunLayout

    from ..demo_export import export_and_time
    from .rows import row_dir

    models = {}
    for label, key in (("teacher", "Teacher"), ("student", "D4IR")):
        models[label] = Path(json.loads((row_dir(ctx, task, field, key) / DONE_FILE).read_text())["model"])
    ctx.log(f"== {task}: export (ONNX) and onnxruntime latency")
    out = export_and_time(RunLayout(ctx.root(task)), models)
    if "skipped" in out:
        ctx.log(f"   export skipped: {out['skipped']}")
    return out


def run_experiments(config: ExperimentConfig, *, only: list[str] | None = None, report_only: bool = False,
                    progress: bool = True, log=print) -> Path:
    """Run the config's tables (or only those named in `only`) and write OUT/report.md; returns its path."""
    import torch

    from .report import build_report

    unknown = [n for n in only or [] if n not in {t.name for t in config.tables}]
    if unknown:
        raise ValueError(f"--table {unknown[0]!r} is not a table of the config "
                         f"({', '.join(t.name for t in config.tables)})")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = default_device(config.device)
    ctx = Context(config, device, progress=progress, log=log)
    if not report_only:
        for name, root in config.prepare.items():
            prepare(name, root, config.out, config.seed)
    tables = plan(config, _TextCheck(ctx))
    if not report_only:
        _check_paths(config, tables)
        for t in tables:
            if t.skipped:
                log(f"-- table {t.name} skipped: {t.skipped}")
            for key, reason in t.skipped_rows.items():
                log(f"-- table {t.name}, row {key} skipped: {reason}")
        jobs = _jobs([t for t in tables if only is None or t.name in only])
        for task, teacher, key, tests in jobs:
            run_row(ctx, task, teacher, key, tests)
        if config.export:
            for task, teacher in dict.fromkeys((j[0], j[1]) for j in jobs if j[2] == "D4IR"):
                export_task(ctx, task, teacher)
    report = build_report(ctx, tables)
    log(f"report: {report}")
    return report
