"""OUT/report.md: every table as the paper prints it, with the paper's numbers beside ours.

The first paragraph places D4IR against M0 and Data (and says what the demo can and cannot show). Per table and
test set: Type | Method | Params (M) | CPU ms (report_rows.latency_ms) | PSNR | SSIM (RGB) | PSNR | SSIM (Y,
BT.601) | gap to the teacher | (with vs_teacher: PSNR | SSIM against the teacher's outputs) | the paper's PSNR |
SSIM | Params | the seconds the row took, every score read from the row's eval.json; below it the Y scores in the
authors' convention (uint8 as the official test script saves, ssim.m on Y*255; distill.evaluate.authors_table); a
sample grid (degraded | teacher | each row | ground truth on central crops of the first test images,
OUT/samples/table-NAME.png); for each row that synthesizes, its rounds grid and colour statistics
(report_rows.synth_section); the training curves of each task (pipelines/figures.py); the time of every shared
step; what was skipped and why; the notes of the prepared datasets. The report is rebuilt from the files on disk,
so a partial run reports the rows it finished and names the others "not run yet".
"""

from __future__ import annotations

import json
from pathlib import Path

from d4ir.distill.evaluate import AUTHORS_CAPTION, authors_table
from d4ir.shards.io import atomic_write_json, atomic_write_text
from d4ir.shards.layout import DONE_FILE, LOG_FILE, ExperimentLayout

from ..demo_export import latency_lines
from ..figures import curves_png
from ..grid import sample_grid
from .inputs import slug
from .published import CONTEXT_NOTE, NOT_PUBLISHED, published
from .report_rows import DEMO_SCOPE, LATENCY_SIDE, SYNTH_ROWS, d4ir_sentence, latency_ms, sd_caveat, synth_section
from .rows import row_dir, student_name
from .runner import PlannedTable
from .steps import Context, teacher_seconds
from .tables import ROWS, TEACHER_NAMES

GRID_IMAGES = 3  # test images per sample grid
GRID_SIDE = 192  # central crop of each, restored by every model

def _record(ctx: Context, table: PlannedTable, key: str) -> dict | None:
    marker = row_dir(ctx, table.task, table.teacher, key) / DONE_FILE
    return json.loads(marker.read_text()) if marker.exists() else None


def _scores(record: dict | None, test: str) -> dict | None:
    entry = (record or {}).get("evals", {}).get(test)
    if not entry or not Path(entry["eval"]).exists():
        return None
    return json.loads(Path(entry["eval"]).read_text())


def _seconds(ctx: Context, table: PlannedTable, key: str, record: dict) -> float:
    extra = teacher_seconds(ctx, table.task, table.teacher) if key == "Teacher" else None
    return record["seconds"] + (extra or 0.0)


def results_table(ctx: Context, table: PlannedTable, test: str) -> str:
    """The markdown table of one test set of a planned table."""
    paper = table.name not in NOT_PUBLISHED
    teacher = _scores(_record(ctx, table, "Teacher"), test)
    head = "| Type | Method | Params (M) | CPU ms | PSNR (dB) | SSIM | PSNR Y (dB) | SSIM Y | gap to teacher (dB) |"
    ref = ctx.config.vs_teacher
    head += " PSNR vs teacher | SSIM vs teacher |" if ref else ""
    head += " paper PSNR | paper SSIM | paper Params (M) |" if paper else ""
    lines = [head + " time (s) |", "|" + "---|" * head.count("|")]
    for key in table.rows:
        row, record = ROWS[key], _record(ctx, table, key)
        scores = _scores(record, test)
        named = scores and key in ("Teacher", "Student") and scores.get("name")
        cells = [row.type, f"{row.label} ({scores['name']})" if named else row.label]
        if scores is None:
            cells += ["not run yet"] + ["-"] * (8 if ref else 6)
        else:
            m, ms = scores["mean"], latency_ms(ctx.config.out, record["model"])
            gap = f"{m['psnr'] - teacher['mean']['psnr']:+.2f}" if teacher and key != "Teacher" else "-"
            cells += [f"{scores['params'] / 1e6:.3f}" if scores.get("params") else "-",
                      "-" if ms is None else f"{ms:.1f}", f"{m['psnr']:.2f}", f"{m['ssim']:.3f}",
                      f"{m['psnr_y']:.2f}", f"{m['ssim_y']:.3f}", gap]
            if ref:
                cells += [f"{m['ref_psnr']:.2f}", f"{m['ref_ssim']:.3f}"] if "ref_psnr" in m else ["-", "-"]
        if paper:
            p = published(table.name, key, table.task)
            cells += [f"{p[0]:.2f}", f"{p[1]:.3f}", f"{p[2]:.2f}" if p[2] else "-"] if p else ["-"] * 3
        cells.append(f"{_seconds(ctx, table, key, record):.0f}" if record else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _center(img, side: int):
    """The central side x side window of an image [H, W, 3] (the whole image when smaller)."""
    top, left = max(0, (img.shape[0] - side) // 2), max(0, (img.shape[1] - side) // 2)
    return img[top : top + side, left : left + side]


def table_grid(ctx: Context, table: PlannedTable, out: Path) -> Path | None:
    """degraded | teacher | each finished row | ground truth on central GRID_SIDE crops of the first test images
    of the table; kept while no model is newer than it."""
    import torch
    from d4ir.distill.inference import restore
    from d4ir.distill.teachers import load_teacher, spec_file
    from d4ir.shards.images import read_rgb, to_tensor, to_uint8
    from d4ir.shards.pairs import find_pairs

    models = []
    for key in ["Teacher"] + [k for k in table.rows if k not in ("Teacher", "Input")]:
        record = _record(ctx, table, key)
        if record and spec_file(record["model"]).exists():  # a teacher may be package.module:callable@WEIGHTS
            models.append((key, record["model"]))
    if not models:
        return None
    labels = ["degraded"] + [k for k, _ in models] + ["ground truth"]
    stamp = out.with_suffix(".json")  # what the grid shows; a grid of other models is redrawn
    shown = {"labels": labels, "models": [str(p) for _, p in models]}
    newest = max(spec_file(p).stat().st_mtime_ns for _, p in models)
    if out.exists() and stamp.exists() and json.loads(stamp.read_text()) == shown and out.stat().st_mtime_ns > newest:
        return out
    nets = [load_teacher(p, probe=False)[0].eval() for _, p in models]
    rows = []
    for pair in find_pairs(ctx.test_dir(table.task, table.tests[0]))[:GRID_IMAGES]:
        degraded = _center(read_rgb(pair.degraded, min_side=1), GRID_SIDE)
        x = to_tensor(degraded)[None]  # [1, 3, S, S]
        with torch.no_grad():
            restored = [to_uint8(restore(net, x)[0]) for net in nets]
        rows.append([degraded] + restored + [_center(read_rgb(pair.clean, min_side=1), GRID_SIDE)])
    sample_grid(rows, out, labels=labels, cell=112)
    atomic_write_json(stamp, shown)
    return out


def teacher_and_student(ctx: Context, table: PlannedTable, test: str) -> list[str]:
    """One line: the teacher's gain over its input, and its students' parameter and CPU latency ratios."""
    recs = {k: _record(ctx, table, k) for k in table.rows}
    scores = {k: _scores(r, test) for k, r in recs.items()}
    teacher, words = scores.get("Teacher"), []
    if teacher and scores.get("Input"):
        words.append(f"the teacher gains {teacher['mean']['psnr'] - scores['Input']['mean']['psnr']:+.2f} dB over "
                     "its degraded input")
    student = next((k for k in table.rows if k not in ("Input", "Teacher") and scores.get(k)), None)
    if teacher and student and teacher.get("params") and scores[student].get("params"):
        t_ms, s_ms = (latency_ms(ctx.config.out, recs[k]["model"]) for k in ("Teacher", student))
        words.append(f"each student has {scores[student]['params'] / teacher['params']:.2f}x its parameters" +
                     (f" and {s_ms / t_ms:.2f}x its CPU latency" if t_ms and s_ms else ""))
    return [f"On {test}, " + "; ".join(words) + ".", ""] if words else []


def _teacher_line(ctx: Context, table: PlannedTable) -> str:
    spec = getattr(ctx.config.tasks[table.task], table.teacher)
    if spec.checkpoint is not None:
        made = f"the checkpoint `{spec.checkpoint}`"
    else:
        made = f"{spec.arch} trained here ({spec.kwargs or 'the scale width'})"
    student = f"{spec.student} ({spec.student_kwargs or 'its default width'})" if spec.student else \
        "the teacher's architecture at half width"
    return (f"Task `{table.task}` (weather {ctx.config.tasks[table.task].weather}), teacher: {made}; every student "
            f"is {student} ({TEACHER_NAMES[table.teacher]} teacher).")


def _table_section(ctx: Context, table: PlannedTable) -> list[str]:
    parts = [f"## {table.title}", ""]
    if table.skipped:
        return parts + [f"Skipped: {table.skipped}.", ""]
    parts += [_teacher_line(ctx, table), ""]
    if table.name in NOT_PUBLISHED:
        parts += [f"Published numbers: {NOT_PUBLISHED[table.name]}.", ""]
    if table.name == "real":
        parts += [CONTEXT_NOTE.format(tables="1 (and 3 for M0-M5)" if table.task == "derain" else "2"), ""]
    for test in table.tests:
        count = next((s["count"] for k in table.rows if (s := _scores(_record(ctx, table, k), test))), None)
        parts += [f"### {test}" + (f" ({count} images)" if count else ""), "", results_table(ctx, table, test), ""]
        parts += teacher_and_student(ctx, table, test)
        authors = authors_table([(ROWS[k].type, ROWS[k].label, _scores(_record(ctx, table, k), test))
                                 for k in table.rows])
        parts += [AUTHORS_CAPTION, "", authors, ""] if authors else []
    parts += [f"- {note}" for note in table.notes]
    parts += [f"- row {k} skipped: {reason}" for k, reason in table.skipped_rows.items()]
    grid = table_grid(ctx, table, ctx.paths.samples / f"table-{slug(table.name)}.png")
    if grid:
        parts += ["", f"![samples of table {table.name}]({grid.relative_to(ctx.config.out)})", ""]
    for key in (k for k in table.rows if k in SYNTH_ROWS and _record(ctx, table, k)):
        run = Path(_record(ctx, table, key)["settings"]["run"])
        parts += synth_section(ctx, table, key, run, student_name(table.teacher, key))
    return parts + [""]


def summary(ctx: Context, tables: list[PlannedTable]) -> list[str]:
    """The first paragraph: where D4IR stands against M0 and Data in each table that has the three (and, for the
    demo, what it can and cannot show)."""
    parts = []
    for table in tables:
        if table.skipped or not table.tests:
            continue
        sentence = d4ir_sentence({k: _scores(_record(ctx, table, k), table.tests[0]) for k in table.rows})
        if sentence:
            parts.append(f"{table.title} ({table.tests[0]}): {sentence}")
        if table.name == "demo":
            parts.append(DEMO_SCOPE)
    return [" ".join(parts), ""] if parts else []


def _steps(ctx: Context, tasks: list[str]) -> list[dict]:
    """Every shared step's and row's marker of the tasks, in the order they finished."""
    paths = []
    for task in tasks:
        paths += ctx.paths.markers(task)
    return [json.loads(p.read_text()) for p in sorted(paths, key=lambda p: (p.stat().st_mtime_ns, str(p)))]


def _datasets(paths: ExperimentLayout) -> list[str]:
    parts = []
    for path in paths.datasets:
        info = json.loads(path.read_text())
        parts += [f"- `{path.parent.name}` (from {info.get('source')}, seed {info.get('seed')}): counts "
                  f"{info.get('counts')}; {len(info.get('excluded', []))} images left out (listed in {path})"]
        parts += [f"  - {note}" for note in info.get("notes", [])]
    return parts


def build_report(ctx: Context, tables: list[PlannedTable]) -> Path:
    """Write OUT/report.md (and OUT/timings.json) from the finished rows on disk."""
    out, cfg = ctx.config.out, ctx.config
    parts = [f"# D4IR experiments: `{out}`", "", *summary(ctx, tables),
             f"SD `{cfg.sd}`, scale `{cfg.scale.preset}` (with the config's overrides), seed {cfg.seed}, "
             f"device {ctx.device}. PSNR/SSIM on RGB and on Y (BT.601), no border crop; Params count every "
             "parameter (AirNet's two MoCo encoders included, as its published 8.93M); CPU ms is the model's time per "
             f"{LATENCY_SIDE}x{LATENCY_SIDE} image (batch 1, one thread, PyTorch, measured once per architecture); the "
             "gap to the teacher is the row's RGB PSNR minus the teacher's. The paper does not say "
             "whether it scores RGB or Y; its numbers stand beside our RGB columns. A row's time is its own "
             "training and scoring (the Teacher row includes the teacher's training); the steps that rows share "
             "are listed below.", ""]
    if cfg.eval_limit:
        parts += [f"**Smoke scale: every row is scored on only the first {cfg.eval_limit} pairs of each test set "
                  "(`eval_limit`); these numbers are not comparable with the full test sets'.**", ""]
    for table in tables:
        parts += _table_section(ctx, table)
    tasks = list(dict.fromkeys(t.task for t in tables if not t.skipped))
    curves = []
    for task in tasks:
        if any(p.parent.name != "prompts" for p in ctx.root(task).rglob(LOG_FILE)):
            curves.append((task, curves_png(ctx.root(task), ctx.paths.figures / f"curves-{slug(task)}.png")))
    if curves:
        parts += ["## Training curves", ""]
        parts += [f"### {task}\n\n![curves of {task}]({path.relative_to(out)})\n" for task, path in curves]
    steps = _steps(ctx, tasks)
    if steps:
        parts += ["## Time per step (this machine)", "", "| step | seconds |", "|---|---|"]
        parts += [f"| {s['step']} | {s['seconds']} |" for s in steps]
        parts += [f"| total | {sum(s['seconds'] for s in steps):.1f} |", ""]
        atomic_write_json(out / "timings.json", [{"step": s["step"], "seconds": s["seconds"]} for s in steps])
    skipped = [f"- table {t.name}: {t.skipped}" for t in tables if t.skipped]
    skipped += [f"- table {t.name}, row {k}: {r}" for t in tables for k, r in t.skipped_rows.items()]
    parts += ["## Skipped, and why", ""] + (skipped or ["Nothing was skipped."]) + [""]
    data_notes = _datasets(ctx.paths)
    if data_notes:
        parts += ["## Data", ""] + data_notes + [""]
    for task in tasks:
        exported = latency_lines(ctx.layout(task))
        if exported:
            parts += [f"## The {task} student on the device: ONNX and onnxruntime", "", *exported, ""]
    parts += ["## Caveat", "", sd_caveat(cfg.sd), ""]
    path = ctx.paths.report
    atomic_write_text(path, "\n".join(parts))
    return path
