"""One row: train (or take) its model once, score it on each of its test sets, record the seconds it took.

OUT/TASK/rows/NAME/ROW/done.json is the row's marker (its settings, its model, the seconds, one entry per test
set); OUT/TASK/rows/NAME/ROW/TEST/eval.json holds the scores (PSNR/SSIM on RGB and Y, per image and mean, also
against the teacher). A test set added to a finished row is scored without training anything again.

What each row trains (docs/design.md): Student is the teacher's architecture at half width (or the teacher spec's
`student`, required for a teacher from outside the registry) trained on the teacher's pairs with ground truth
(`train_supervised`); Data, DFSR, DFMC, M0 and D4IR distil that student with `distill` on their data source;
M1-M5 distil on their own ablation round without the joint phase.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from d4ir.distill.evaluate import IDENTITY
from d4ir.distill.teachers import load_teacher, student_of, teacher_record
from d4ir.shards.io import atomic_write_json
from d4ir.shards.layout import DONE_FILE, EVAL_FILE, STUDENT_STEM, RunLayout

from . import stages, steps
from .config import TeacherSpec
from .inputs import slug
from .procedural import procedural_folder
from .steps import Context, marked, resume_flag
from .tables import ROWS, TEACHER_NAMES, RowDef


def row_dir(ctx: Context, task: str, field: str, key: str) -> Path:
    return ctx.paths.row(task, TEACHER_NAMES[field], key)


def student_name(field: str, key: str) -> str:
    """The student's folder under the run's students/ (main-d4ir, restormer-data, main-m1, ...)."""
    return f"{TEACHER_NAMES[field]}-{key.lower()}"


def distill_config(ctx: Context, data: str, spec: TeacherSpec | None = None):
    """The scale's DistillConfig on `data` for the teacher's student (a half-width one, or the spec's student);
    DFSR/DFMC (no dataset to count an epoch by) take as many steps per epoch as one pass over a shard round."""
    cfg = replace(ctx.stage("distill"), student="half", data=data)
    if spec is not None and spec.student is not None:
        kwargs = spec.student_kwargs if spec.student_kwargs is not None else cfg.student_kwargs
        cfg = replace(cfg, student=spec.student, student_kwargs=kwargs)
    if data in ("dfsr", "dfmc") and cfg.iters_per_epoch is None:
        cfg = replace(cfg, iters_per_epoch=max(1, ctx.stage("synth").num_samples // cfg.batch_size))
    return cfg


def _student(ctx: Context, task: str, field: str, teacher: Path | str):
    spec = getattr(ctx.config.tasks[task], field)
    if spec.student is not None:
        arch, kwargs = spec.student, dict(spec.student_kwargs or {})
    else:
        arch, kwargs = student_of(load_teacher(teacher, probe=False)[1], "half")
    base = ctx.stage("teacher") if spec.checkpoint is not None else steps.teacher_config(ctx, spec)
    cfg = replace(base, arch=arch, arch_kwargs=kwargs)
    out = RunLayout(ctx.root(task)).student(student_name(field, "Student"))
    original = ctx.folder(task, "original")

    def train() -> dict:
        r = stages.train_supervised(original, out, cfg, val_dir=ctx.val_dir(task), name=STUDENT_STEM,
                                    resume=resume_flag(out), device=ctx.device, progress=ctx.progress)
        return {"model": str(r.weights), "params": r.params}

    return {"config": asdict(cfg), "original": str(original)}, train


def _distilled(ctx: Context, task: str, field: str, row: RowDef, teacher: Path | str):
    cfg = distill_config(ctx, row.data, getattr(ctx.config.tasks[task], field))
    run = ctx.root(task)
    if row.key == "D4IR":
        steps.round0(ctx, task)  # runs stage 1 first
    elif row.ablation:
        run = steps.ablation_round(ctx, task, row)
        cfg = replace(cfg, joint_epochs=0, round_every=0)  # Table 3's rows: no joint phase, no regeneration
    layout, name = RunLayout(run), student_name(field, row.key)
    shards = cfg.data == "shards"
    # Procedural distils, as M0 does on the web degraded photos, on the renderer's images of the web clean ones
    degraded = procedural_folder(ctx, task) if row.key == "Procedural" else ctx.folder(task, "web_degraded")

    def train() -> dict:
        r = stages.distill(run, teacher, cfg, sd_source=ctx.sd if shards else None,
                           degraded_dir=degraded, clean_dir=ctx.folder(task, "web_clean"),
                           original_dir=ctx.folder(task, "original"), val_dir=ctx.val_dir(task), name=name,
                           resume=resume_flag(layout.student(name)), device=ctx.device, progress=ctx.progress)
        return {"model": str(layout.student_weights(name)), "params": r.params, "round": r.round}

    settings = {"config": asdict(cfg), "run": str(run), "inputs": steps.inputs_settings(ctx, task)}
    if row.key == "Procedural":
        settings["procedural"] = str(degraded)
    return settings | ({"sd": str(ctx.sd)} if shards else {}), train


def _evaluate(ctx: Context, task: str, field: str, row: RowDef, model: str, teacher: Path | str, test: str) -> dict:
    pairs = ctx.test_dir(task, test)
    out = row_dir(ctx, task, field, row.key) / slug(test) / EVAL_FILE
    t0 = time.perf_counter()
    reference = teacher if ctx.config.vs_teacher and row.key != "Teacher" else None
    stages.evaluate(model, pairs, out, reference=reference, device=ctx.device, limit=ctx.config.eval_limit,
                    progress=False, type=row.type, method=row.label, task=task, teacher=field, row=row.key,
                    test=test)
    return {"eval": str(out), "pairs": str(pairs), "vs_teacher": reference is not None,
            "limit": ctx.config.eval_limit, "seconds": round(time.perf_counter() - t0, 1)}


def _scored(record: dict, vs_teacher: bool) -> tuple:
    """What an eval record was scored on: (pairs, vs_teacher, limit); records older than `limit` scored all."""
    return record.get("pairs"), record.get("vs_teacher", vs_teacher), record.get("limit")


def run_row(ctx: Context, task: str, field: str, key: str, tests: list[str]) -> dict:
    """Train row `key` of (task, teacher field) unless its marker exists, and score it on every test set in
    `tests` it has no eval.json for; returns its marker's record."""
    row = ROWS[key]
    teacher = steps.teacher(ctx, task, field)
    if key == "Input":
        settings, train = {}, lambda: {"model": IDENTITY}
    elif key == "Teacher":
        settings, train = {}, lambda: {"model": str(teacher)}
    elif key == "Student":
        settings, train = _student(ctx, task, field, teacher)
    else:
        settings, train = _distilled(ctx, task, field, row, teacher)
    settings = {"row": key, "teacher": teacher_record(teacher), **settings}

    def run() -> dict:
        result = train()
        return result | {"evals": {t: _evaluate(ctx, task, field, row, result["model"], teacher, t) for t in tests}}

    marker = row_dir(ctx, task, field, key) / DONE_FILE
    record = marked(marker, settings, run, title=f"{task}: {key} ({TEACHER_NAMES[field]} teacher)", log=ctx.log)
    want = (ctx.config.vs_teacher and key != "Teacher", ctx.config.eval_limit)
    missing = [t for t in tests if _scored(record["evals"].get(t, {}), want[0]) != (str(ctx.test_dir(task, t)), *want)]
    for t in missing:
        ctx.log(f"== {task}: {key}, scoring on {t}")
        record["evals"][t] = _evaluate(ctx, task, field, row, record["model"], teacher, t)
    if missing:
        atomic_write_json(marker, record)
    return record
