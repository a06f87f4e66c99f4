"""`make demo`: every stage on the embedded demo data, on the CPU, ending in RUN/report.md.

demo data -> teacher -> prompts -> synth (round 0) -> distill (D4IR, with regeneration rounds) -> the
paper's baselines (Student, Data, M0) -> eval of every model on the demo test pairs -> the teacher and the
student exported to ONNX and timed by onnxruntime -> report. Every step
skips or resumes what an earlier (possibly killed) run already finished, so a rerun is cheap.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from d4ir.distill.evaluate import IDENTITY, evaluate
from d4ir.distill.registry import build, half_of, load_model, save_model
from d4ir.distill.teacher import train_supervised
from d4ir.distill.trainer import distill
from d4ir.pipelines.demo_data import build_demo_data
from d4ir.pipelines.demo_export import export_and_time
from d4ir.pipelines.presets import preset
from d4ir.pipelines.report import build_report
from d4ir.shards.io import atomic_write_json
from d4ir.shards.layout import EVAL_FILE, STUDENT_STEM, RunLayout
from d4ir.synth.prompts import train_prompts
from d4ir.synth.sd import load_sd_cached
from d4ir.synth.worker import synthesize

# The shipped weather LDM (synth/weights/weather-ldm, trained at 64x64, the demo's synth size; "tiny" stays for
# unit tests): round 0 shows the clean web photos kept and the prompt's weather added.
SD_SPEC = "weather"


def _step(title: str, log: list, fn, *args, **kwargs):
    t0 = time.perf_counter()
    print(f"== {title}", flush=True)
    out = fn(*args, **kwargs)
    log.append({"step": title, "seconds": round(time.perf_counter() - t0, 1)})
    return out


def run_demo(
    data: Path, run: Path, *, task: str = "derain", seed: int = 0, device: str = "cpu", progress: bool = True
) -> Path:
    """Run the whole pipeline at the demo scale; returns the report path."""
    t_start, log = time.perf_counter(), []
    data, layout = Path(data), RunLayout(run)
    _step("demo data", log, build_demo_data, data, seed=seed, progress=progress)
    task_dir = data / task
    pairs, test, web_deg, web_clean = (task_dir / n for n in ("original", "test", "web_degraded", "web_clean"))

    # teacher: AirNet's architecture at the demo width, trained on the "private" pairs
    t_cfg = replace(preset("demo", "teacher"), arch="airnet", seed=seed)
    _step("teacher", log, train_supervised, pairs, layout.teacher_dir, t_cfg, val_dir=test, resume=True,
          device=device, progress=progress)

    # stage 1 and stage 2 (round 0)
    p_cfg = replace(preset("demo", "prompts"), seed=seed)
    sd = load_sd_cached(SD_SPEC, device, "float32")
    _step("prompts", log, train_prompts, web_deg, sd, layout.prompts, p_cfg, resume=True, device=device,
          progress=progress)
    s_cfg = replace(preset("demo", "synth"), seed=seed)
    _step("synth round 0", log, synthesize, web_clean, layout.shards, s_cfg, sd_source=SD_SPEC,
          prompts_dir=layout.prompts, device=device, progress=progress)

    # stage 3 and the paper's KD baselines: the same trainer, only the data differs
    d_cfg = replace(preset("demo", "distill"), student="half", seed=seed)
    common = dict(sd_source=SD_SPEC, degraded_dir=web_deg, clean_dir=web_clean, original_dir=pairs, val_dir=test,
                  resume=True, device=device, progress=progress)
    _step("distill D4IR", log, distill, layout.root, layout.teacher_weights, d_cfg, name="d4ir", **common)
    _step("distill Data", log, distill, layout.root, layout.teacher_weights, replace(d_cfg, data="original"),
          name="data", **common)
    _step("distill M0", log, distill, layout.root, layout.teacher_weights, replace(d_cfg, data="web"), name="m0",
          **common)

    # the "Student" baseline: the half-width network trained on the teacher's pairs with ground truth
    arch, kwargs = half_of(load_model(layout.teacher_weights)[1])
    st_cfg = replace(t_cfg, arch_kwargs=kwargs)
    _step("student (ground truth)", log, train_supervised, pairs, layout.student("student"), st_cfg,
          name=STUDENT_STEM, resume=True, device=device, progress=progress)

    # every row of the table is an eval.json written here, in this run
    _step("evaluate", log, evaluate_all, layout, test, arch, kwargs, seed, device)
    # the device check: teacher and D4IR student as ONNX, timed by onnxruntime on one thread
    exported = _step("export (ONNX)", log, export_and_time, layout,
                     {"teacher": layout.teacher_weights, "student": layout.student_weights("d4ir")})
    if "skipped" in exported:
        print(f"   export skipped: {exported['skipped']}", flush=True)
    atomic_write_json(layout.timings, log)  # the report shows the steps so far; the file is complete below
    report = _step("report", log, build_report, layout.root)
    log.append({"step": "total", "seconds": round(time.perf_counter() - t_start, 1)})
    atomic_write_json(layout.timings, log)
    print(f"report: {report} ({log[-1]['seconds']:.0f} s in all)", flush=True)
    return report


def evaluate_all(layout: RunLayout, test: Path, arch: str, kwargs: dict, seed: int, device: str) -> None:
    """eval.json for the input, the teacher, an untrained student and every trained student."""
    import torch

    torch.manual_seed(seed)
    save_model(layout.student("untrained") / STUDENT_STEM, build(arch, **kwargs), "untrained")
    rows = [
        ("Input", "Degraded input", IDENTITY, layout.input_scores),
        ("Teacher", "AirNet (demo width)", layout.teacher_weights, layout.teacher_dir),
        ("Untrained", "Half-AirNet, random init", layout.student_weights("untrained"), None),
        ("Student", "Half-AirNet on the teacher's pairs (GT)", layout.student_weights("student"), None),
        ("KD", "Data (teacher's degraded inputs)", layout.student_weights("data"), None),
        ("KD", "M0 (web degraded images)", layout.student_weights("m0"), None),
        ("KD", "D4IR (ours)", layout.student_weights("d4ir"), None),
    ]
    for order, (kind, method, model, folder) in enumerate(rows):
        folder = folder or Path(model).parent
        evaluate(model, test, folder / EVAL_FILE, reference=layout.teacher_weights, device=device, progress=False,
                 type=kind, method=method, order=order)
