"""Resumable steps and the stages a task's rows share: its teachers, stage 1, round 0 and the ablation rounds.

A step is done when its marker (a JSON file: the step's settings and the seconds it took) exists; a rerun
skips it. A step killed half-way has no marker: the rerun calls its stage again with resume=True where the
stage left a state (state.pt), and stage 2 skips its finished shards by itself. A marker written with other
settings is refused: the folder was made by another config, and mixing the two would be silently wrong.

Layout of a task (OUT/TASK is a run folder, shards/layout.py):
  OUT/TASK/teachers/NAME-teacher/   a teacher trained here (NAME: main, or restormer for Table 5)
  OUT/TASK/prompts/, shards/round-000/, students/NAME-ROW/    stage 1, round 0 and the rows' students
  OUT/TASK/ablations/M1..M5/shards/round-000/, students/NAME-Mk/   Table 3's rounds and their students
  OUT/TASK/steps/*.json             the shared steps' markers
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from d4ir.distill.families import without_encoder_first
from d4ir.pipelines.options import apply_overrides
from d4ir.shards.io import atomic_write_json
from d4ir.shards.layout import STATE_FILE, TEACHER_STEM, ExperimentLayout, RunLayout, round_name, weights_file
from d4ir.shards.state import changed_settings
from d4ir.synth.plan import WEATHER_TEXT
from d4ir.synth.sd import SDSource

from . import stages
from .config import FOLDER_FIELDS, ExperimentConfig, TeacherSpec
from .inputs import resolve, slug
from .tables import TEACHER_NAMES, RowDef


def plain(obj: Any) -> Any:
    """JSON-plain data (tuples -> lists, paths -> strings), as a marker reads back."""
    return json.loads(json.dumps(obj, default=str))


_KWARGS = ("arch_kwargs", "student_kwargs")


def current(settings: Any) -> Any:
    """Settings as this version writes them: AirNet kwargs (under arch_kwargs/student_kwargs, at any depth) without
    the encoder_first an older d4ir wrote (derived from n_feats now), so a marker written before still matches."""
    if isinstance(settings, dict):
        return {k: without_encoder_first(v) if k in _KWARGS and isinstance(v, dict) else current(v)
                for k, v in settings.items()}
    return [current(v) for v in settings] if isinstance(settings, list) else settings


def marked(marker: Path, settings: dict, fn: Callable[[], dict | None], *, title: str,
           log: Callable[[str], None]) -> dict:
    """Run `fn` unless `marker` says it is done; returns the marker's record (settings, seconds, fn's result)."""
    settings = current(plain(settings))
    if marker.exists():
        record = json.loads(marker.read_text())
        if changed := changed_settings(current(record.get("settings")), settings):
            raise ValueError(f"{marker} was written with other settings ({', '.join(changed)}): delete it and "
                             "its outputs to redo the step, or use another experiments folder")
        return record
    log(f"== {title}")
    t0 = time.perf_counter()
    result = fn() or {}
    record = {"step": title, "settings": settings, "seconds": round(time.perf_counter() - t0, 1), **plain(result)}
    atomic_write_json(marker, record)
    log(f"   {title}: {record['seconds']} s")
    return record


def resume_flag(folder: Path) -> bool:
    """resume=True exactly when an interrupted stage left its state."""
    return (Path(folder) / STATE_FILE).exists()


@dataclass
class Context:
    """What every step needs: the config, the device, how to log."""

    config: ExperimentConfig
    device: str
    progress: bool = True
    log: Callable[[str], None] = print

    @property
    def sd(self) -> SDSource:
        return SDSource(self.config.sd, self.config.sd_config)

    @property
    def paths(self) -> ExperimentLayout:
        """Every folder of OUT (shards/layout.py)."""
        return ExperimentLayout(self.config.out)

    def root(self, task: str) -> Path:
        return self.paths.task(task)

    def layout(self, task: str) -> RunLayout:
        return self.paths.run(task)

    def folder(self, task: str, field: str) -> Path | None:
        """A task folder (web_degraded, web_clean, original) as the stages read it (mixed when it is a list)."""
        value = self.config.tasks[task].part(field)
        return resolve(value, self.paths.inputs(task, field), paired=field == "original")

    def test_dir(self, task: str, name: str) -> Path:
        value = self.config.tasks[task].test[name]
        return resolve(value, self.paths.inputs(task, f"test-{slug(name)}"), paired=True)

    def val_dir(self, task: str) -> Path | None:
        val = self.config.tasks[task].val
        return self.test_dir(task, val) if val else None

    def stage(self, name: str) -> Any:
        """The scale's config of a stage with the experiment's seed."""
        return replace(self.config.scale.stage(name), seed=self.config.seed)

    def marker(self, task: str, step: str) -> Path:
        return self.paths.step_marker(task, step)


# ------------------------------------------------------------------------------------------- teachers
def teacher_config(ctx: Context, spec: TeacherSpec):
    """SupervisedConfig of a teacher trained here: the scale's, the spec's overrides, its arch and width."""
    base = ctx.stage("teacher")
    kwargs = spec.kwargs if spec.kwargs is not None else (base.arch_kwargs if spec.arch == base.arch else None)
    return replace(apply_overrides(base, spec.overrides, "overrides"), arch=spec.arch, arch_kwargs=kwargs)


def teacher(ctx: Context, task: str, field: str) -> Path | str:
    """The teacher `field` (teacher, restormer_teacher) of a task: its checkpoint, or trained here once."""
    spec: TeacherSpec = getattr(ctx.config.tasks[task], field)
    if spec.checkpoint is not None:
        return spec.checkpoint
    name = TEACHER_NAMES[field]
    out = ctx.paths.teacher(task, name)
    pairs = resolve(spec.train, ctx.paths.inputs(task, f"{name}-teacher-pairs"), paired=True) \
        if spec.train is not None else ctx.folder(task, "original")
    cfg = teacher_config(ctx, spec)
    settings = {"config": asdict(cfg), "pairs": str(pairs), "val": str(ctx.val_dir(task))}
    marked(ctx.marker(task, f"{name}-teacher"), settings,
           lambda: {"params": stages.train_supervised(pairs, out, cfg, val_dir=ctx.val_dir(task), name="teacher",
                                                      resume=resume_flag(out), device=ctx.device,
                                                      progress=ctx.progress).params},
           title=f"{task}: {name} teacher ({cfg.arch})", log=ctx.log)
    return weights_file(out, TEACHER_STEM)


def teacher_seconds(ctx: Context, task: str, field: str) -> float | None:
    """Seconds the teacher took to train here (None for a given checkpoint or one not trained yet)."""
    marker = ctx.marker(task, f"{TEACHER_NAMES[field]}-teacher")
    return json.loads(marker.read_text())["seconds"] if marker.exists() else None


# ------------------------------------------------------------------------------------------- stages 1 and 2
def prompts(ctx: Context, task: str) -> Path:
    """Stage 1 on the task's web degraded photos (once per task: every teacher's D4IR and M2/M3 share it)."""
    layout, degraded = ctx.layout(task), ctx.folder(task, "web_degraded")
    cfg = ctx.stage("prompts")

    def run() -> dict:
        sd = stages.load_sd_cached(ctx.sd, ctx.device, "float32")
        r = stages.train_prompts(degraded, sd, layout.prompts, cfg, resume=resume_flag(layout.prompts),
                                 device=ctx.device, progress=ctx.progress)
        return {"images": r.num_images}

    marked(ctx.marker(task, "prompts"), {"config": asdict(cfg), "sd": str(ctx.sd), "degraded": str(degraded)}, run,
           title=f"{task}: stage 1 (prompts)", log=ctx.log)
    return layout.prompts


def _synth(ctx: Context, task: str, root: Path, cfg, step: str, title: str) -> Path:
    layout, clean = RunLayout(root), ctx.folder(task, "web_clean")
    prompts_dir = prompts(ctx, task) if cfg.prompt_mode in ("encoder", "content") else None

    def run() -> dict:
        r = stages.synthesize(clean, layout.shards, cfg, sd_source=ctx.sd, prompts_dir=prompts_dir,
                              device=ctx.device, progress=ctx.progress)
        return {"images": r.images, "failures": r.failures}

    settings = {"config": asdict(cfg), "sd": str(ctx.sd), "clean": str(clean), "prompts": str(prompts_dir)}
    marked(ctx.marker(task, step), settings, run, title=title, log=ctx.log)
    return root


def round0(ctx: Context, task: str) -> Path:
    """Stage 2's round 0 of D4IR (CCD + the prompt encoder) into OUT/TASK/shards."""
    return _synth(ctx, task, ctx.root(task), ctx.stage("synth"), round_name(0), f"{task}: stage 2 (round 0)")


def ablation_round(ctx: Context, task: str, row: RowDef) -> Path:
    """The round of an ablation row (its z0 and prompt switches) in its own run folder OUT/TASK/ablations/Mk."""
    base = ctx.stage("synth")
    cfg = replace(base, prompt_mode=row.prompt, ccd=dataclasses.replace(base.ccd, z0=row.z0))
    if row.prompt == "text":
        cfg = replace(cfg, text=WEATHER_TEXT[ctx.config.tasks[task].weather])
    return _synth(ctx, task, ctx.paths.ablation(task, row.key), cfg, f"ablation-{row.key}",
                  f"{task}: {row.key} round (z0 {row.z0}, prompt {row.prompt})")


def inputs_settings(ctx: Context, task: str) -> dict:
    """The task's folders as the stages read them (part of a row's settings)."""
    return {f: str(ctx.folder(task, f)) for f in FOLDER_FIELDS}
