"""`d4ir report RUN`: the report of a run made stage by stage (make teacher/prompts/synth/distill/eval), from
its eval.json files, with the restorations, the rounds grid and the training curves beside it.

The demo and the paper's tables are `d4ir experiments` configs, reported by pipelines/experiments/report.py;
this one only tabulates whatever eval.json files a hand-made run holds.
"""

from __future__ import annotations

from pathlib import Path

from d4ir.shards.images import read_rgb
from d4ir.shards.io import atomic_write_text
from d4ir.shards.layout import EVAL_FILE, RunLayout
from d4ir.shards.writer import read_manifest

from .figures import curves_png
from .grid import sample_grid
from .rounds import rounds_grid

# ------------------------------------------------------------------------------------------------- the report
ROW_ORDER = ("Input", "Teacher", "Untrained", "Student", "KD")


def collect_evals(run: Path) -> list[dict]:
    """Every eval.json under RUN that names its row (type, method), in the paper's row order."""
    import json

    found = []
    for path in sorted(Path(run).rglob(EVAL_FILE)):
        data = json.loads(path.read_text())
        if "type" in data and "method" in data:
            found.append({**data, "path": str(path.relative_to(run))})
    rank = {k: i for i, k in enumerate(ROW_ORDER)}
    return sorted(found, key=lambda d: (rank.get(d["type"], len(rank)), d.get("order", 0), d["path"]))


def results_table(evals: list[dict], *, y_channel: bool = False, reference: bool = True) -> str:
    """Type | Method | Params (M) | PSNR | SSIM (| vs teacher), from eval.json files."""
    p, s = ("psnr_y", "ssim_y") if y_channel else ("psnr", "ssim")
    head = "| Type | Method | Params (M) | PSNR (dB) | SSIM |" + (
        " PSNR vs teacher | SSIM vs teacher |" if reference else ""
    )
    lines = [head, "|" + "---|" * (7 if reference else 5)]
    for e in evals:
        m = e["mean"]
        params = f"{e['params'] / 1e6:.2f}" if e.get("params") else "-"
        row = f"| {e['type']} | {e['method']} | {params} | {m[p]:.2f} | {m[s]:.3f} |"
        if reference:
            row += (
                f" {m['ref_' + p]:.2f} | {m['ref_' + s]:.3f} |"
                if "ref_" + p in m and e["type"] != "Teacher"
                else " - | - |"
            )
        lines.append(row)
    return "\n".join(lines)


def restoration_grid(run: Path, test: Path, out: Path, *, student: str = "d4ir", num: int = 4) -> Path:
    """degraded | teacher | student | ground truth for the first `num` test pairs."""
    import torch
    from d4ir.distill.inference import restore
    from d4ir.distill.registry import load_model
    from d4ir.shards.images import to_tensor, to_uint8
    from d4ir.shards.pairs import find_pairs

    layout = RunLayout(run)
    teacher = load_model(layout.teacher_weights)[0].eval()
    student = load_model(layout.student_weights(student))[0].eval()
    rows = []
    for p in find_pairs(test)[:num]:
        deg, cln = read_rgb(p.degraded, min_side=1), read_rgb(p.clean, min_side=1)
        x = to_tensor(deg)[None]
        with torch.no_grad():
            rows.append([deg, to_uint8(restore(teacher, x)[0]), to_uint8(restore(student, x)[0]), cln])
    return sample_grid(rows, out, labels=["degraded", "teacher", "D4IR student", "ground truth"], cell=128)


def sd_note(run: Path) -> str:
    """The caveat for the SD that synthesized the run's round 0 (its manifest's "sd"): the experiments report's
    (pipelines/experiments/report_rows.sd_caveat), or a generic line without a round."""
    from .experiments.report_rows import sd_caveat

    try:
        spec = read_manifest(RunLayout(run).round_shards(0)).provenance.sd
    except (OSError, ValueError):
        return ("Every number above comes from an `eval.json` written in this run; how far they carry depends on "
                "the SD the shards were synthesized with, the data and the training budget of this run.")
    return sd_caveat(spec)


def build_report(run: Path, test: Path | None = None) -> Path:
    """RUN/report.md from the eval.json files of the run, with the grids and curves beside it."""

    run = Path(run)
    evals = collect_evals(run)
    if not evals:
        raise FileNotFoundError(f"no eval.json with a type and method under {run}: run the evaluations first")
    layout = RunLayout(run)
    samples = layout.samples
    pairs_dir = Path(test or evals[0].get("pairs", ""))
    parts = [
        f"# D4IR run report: `{run}`",
        "",
        "## Results on the test pairs (RGB)",
        "",
        results_table(evals),
        "",
        "Y channel (BT.601):",
        "",
        results_table(evals, y_channel=True, reference=False),
        "",
    ]
    from d4ir.distill.evaluate import AUTHORS_CAPTION, authors_table

    authors = authors_table([(e["type"], e["method"], e) for e in evals])
    if authors:
        parts += [AUTHORS_CAPTION, "", authors, ""]
    parts += ["Every row is read from the `eval.json` named below (written by this run):", ""]
    parts += [f"- {e['type']} / {e['method']}: `{e['path']}` ({e['count']} images)" for e in evals] + [""]
    figures = []
    if layout.student_weights("d4ir").exists() and pairs_dir.is_dir():
        figures.append(("Restorations", restoration_grid(run, pairs_dir, samples / "restorations.png")))
    grid = rounds_grid(run, samples / "rounds.png")
    if grid:
        figures.append(("Synthesized samples of each round (clean source, then round 0, 1, ...)", grid))
    figures.append(("Training curves", curves_png(run, layout.curves)))
    for title, path in figures:
        parts += [f"## {title}", "", f"![{title}]({Path(path).relative_to(run)})", ""]
    parts += ["## Caveat", "", sd_note(run), ""]
    out = layout.report
    atomic_write_text(out, "\n".join(parts))
    return out
