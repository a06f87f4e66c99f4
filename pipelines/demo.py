"""`make demo`: every stage on the embedded demo data, on the CPU, ending in RUN/report.md.

demo data -> teacher -> prompts -> synth (round 0) -> distill (D4IR, with regeneration rounds) -> the
paper's baselines (Student, Data, M0) -> eval of every model on the demo test pairs -> report. Every step
skips or resumes what an earlier (possibly killed) run already finished, so a rerun is cheap.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from distill.evaluate import evaluate_model, write_eval
from distill.registry import build, load_model, save_model
from distill.teacher import SupervisedConfig, train_supervised
from distill.trainer import DistillConfig, distill, half_of
from pipelines.demo_data import build_demo_data
from pipelines.presets import preset
from pipelines.report import build_report
from shards.io import atomic_write_json
from shards.pairs import find_pairs
from shards.reader import round_dir
from synth.prompts import train_prompts
from synth.worker import SynthConfig, synthesize


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
    data, run = Path(data), Path(run)
    _step("demo data", log, build_demo_data, data, seed=seed, progress=progress)
    task_dir = data / task
    pairs, test, web_deg, web_clean = (
        task_dir / "original",
        task_dir / "test",
        task_dir / "web_degraded",
        task_dir / "web_clean",
    )

    # teacher: AirNet's architecture at the demo width, trained on the "private" pairs
    t_cfg = SupervisedConfig(arch="airnet", seed=seed, **preset("demo", "teacher"))
    _step(
        "teacher",
        log,
        train_supervised,
        pairs,
        run / "teacher",
        t_cfg,
        val_dir=test,
        resume=True,
        device=device,
        progress=progress,
    )
    teacher_path = run / "teacher" / "teacher.safetensors"

    # stage 1 and stage 2 (round 0)
    p_cfg = preset("demo", "prompts")
    _step(
        "prompts",
        log,
        train_prompts,
        web_deg,
        "tiny",
        run / "prompts",
        seed=seed,
        resume=True,
        device=device,
        progress=progress,
        **p_cfg,
    )
    s_cfg = SynthConfig(seed=seed, **preset("demo", "synth"))
    _step(
        "synth round 0",
        log,
        synthesize,
        web_clean,
        round_dir(run / "shards", 0),
        sd="tiny",
        prompts_dir=run / "prompts",
        config=s_cfg,
        device=device,
        progress=progress,
    )

    # stage 3 and the paper's KD baselines: the same trainer, only the data differs
    d_cfg = DistillConfig(student="half", seed=seed, **preset("demo", "distill"))
    common = dict(
        sd="tiny",
        degraded_dir=web_deg,
        clean_dir=web_clean,
        original_dir=pairs,
        val_dir=test,
        resume=True,
        device=device,
        progress=progress,
    )
    _step("distill D4IR", log, distill, run, teacher_path, d_cfg, name="d4ir", **common)
    _step("distill Data", log, distill, run, teacher_path, replace(d_cfg, data="original"), name="data", **common)
    _step("distill M0", log, distill, run, teacher_path, replace(d_cfg, data="web"), name="m0", **common)

    # the "Student" baseline: the half-width network trained on the teacher's pairs with ground truth
    teacher, info = load_model(teacher_path)
    arch, kwargs = half_of(teacher, info)
    st_cfg = replace(t_cfg, arch_kwargs=kwargs)
    _step(
        "student (ground truth)",
        log,
        train_supervised,
        pairs,
        run / "students" / "student",
        st_cfg,
        name="student",
        resume=True,
        device=device,
        progress=progress,
    )

    # every row of the table is an eval.json written here, in this run
    _step("evaluate", log, evaluate_all, run, teacher_path, test, arch, kwargs, seed, device)
    report = _step("report", log, build_report, run)
    log.append({"step": "total", "seconds": round(time.perf_counter() - t_start, 1)})
    atomic_write_json(run / "timings.json", log)
    print(f"report: {report} ({log[-1]['seconds']:.0f} s in all)", flush=True)
    return report


def evaluate_all(run: Path, teacher_path: Path, test: Path, arch: str, kwargs: dict, seed: int, device: str) -> None:
    """eval.json for the input, the teacher, an untrained student and every trained student."""
    import torch

    pairs = find_pairs(test)
    teacher = load_model(teacher_path)[0].to(device).eval()
    torch.manual_seed(seed)
    untrained = build(arch, **kwargs)
    save_model(run / "students" / "untrained" / "student", untrained, "untrained")
    rows = [
        ("Input", "Degraded input", None, run / "input"),
        ("Teacher", "AirNet (demo width)", teacher, run / "teacher"),
        ("Untrained", "Half-AirNet, random init", untrained, run / "students" / "untrained"),
        ("Student", "Half-AirNet on the teacher's pairs (GT)", run / "students/student/student.safetensors", None),
        ("KD", "Data (teacher's degraded inputs)", run / "students/data/student.safetensors", None),
        ("KD", "M0 (web degraded images)", run / "students/m0/student.safetensors", None),
        ("KD", "D4IR (ours)", run / "students/d4ir/student.safetensors", None),
    ]
    for order, (kind, method, model, folder) in enumerate(rows):
        if isinstance(model, Path):
            folder, model = model.parent, load_model(model)[0]
        model = model.to(device).eval() if model is not None else None
        result = evaluate_model(model, pairs, device=device, reference=teacher, progress=False)
        write_eval(
            folder / "eval.json",
            result,
            type=kind,
            method=method,
            order=order,
            pairs=str(test),
            reference=str(teacher_path),
        )
