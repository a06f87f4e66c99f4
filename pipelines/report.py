"""Looking at results: shard sample grids, training curves and the run report (runs/<name>/report.md)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from d4ir.shards.embeddings import load_embeddings
from d4ir.shards.images import read_rgb
from d4ir.shards.io import atomic_write_text
from d4ir.shards.layout import EVAL_FILE, RunLayout, rounds_in
from d4ir.shards.reader import iter_samples
from d4ir.shards.writer import read_manifest

from .demo_export import latency_lines
from .figures import curves_png
from .grid import sample_grid


def _thumb(path: str | Path | None, size: int) -> np.ndarray:
    """A source image center-cropped square (gray when it cannot be read), for side-by-side grids."""
    try:
        img = read_rgb(path, min_side=1)
    except Exception:  # noqa: BLE001 - a grid shows a gray cell instead
        return np.full((size, size, 3), 128, np.uint8)
    s = min(img.shape[:2])
    top, left = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
    return img[top : top + s, left : left + s]


def shard_grid(directory: Path, out: Path, *, num: int = 8, cell: int = 128) -> Path:
    """Grid of `num` samples of a round: clean source | prompt source | synthesized."""
    manifest = read_manifest(directory)
    index = []
    if manifest.prompts_dir:
        try:
            index = load_embeddings(manifest.prompts_dir).index
        except FileNotFoundError:
            index = []
    rows = []
    for sample in itertools.islice(iter_samples(directory), num):
        meta = sample["meta"]
        row = meta.get("prompt_row")
        prompt_src = index[row]["path"] if index and row is not None and row < len(index) else None
        rows.append([_thumb(meta.get("clean"), cell), _thumb(prompt_src, cell), sample["degraded"]])
    if not rows:
        raise ValueError(f"no finished shard in {directory}")
    return sample_grid(rows, out, labels=["clean source", "prompt source", "synthesized"], cell=cell)


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


def rounds_grid(run: Path, out: Path, *, student: str = "d4ir", num: int = 4, cell: int = 96) -> Path | None:
    """clean source | round 0 | each later regeneration round of a student, one row per clean photo (rows are
    matched by the sample's clean source, so every row shows one photo: what the synthesis kept of it and the
    weather it added, and how the feedback rounds changed that)."""
    layout = RunLayout(run)
    rounds = [layout.round_shards(0)] if 0 in rounds_in(layout.shards) else []
    rounds += [layout.round_shards(n, student) for n in rounds_in(layout.shards_root(student)) if n > 0]
    first = list(itertools.islice(iter_samples(rounds[0]), num)) if rounds else []
    if not first:
        return None
    wanted = {s["meta"].get("clean") for s in first}
    later = []
    for r in rounds[1:]:
        by_clean: dict = {}
        for sample in iter_samples(r):
            key = sample["meta"].get("clean")
            if key in wanted and key not in by_clean:
                by_clean[key] = sample["degraded"]
            if len(by_clean) == len(wanted):
                break
        later.append(by_clean)
    empty = np.full((cell, cell, 3), 200, np.uint8)  # a round without this photo
    rows = [[_thumb(s["meta"].get("clean"), cell), s["degraded"]] + [c.get(s["meta"].get("clean"), empty)
                                                                      for c in later] for s in first]
    labels = ["clean source"] + [f"round {n}" for n in [0, *(_round_number(r) for r in rounds[1:])]]
    return sample_grid(rows, out, labels=labels, cell=cell)


def _round_number(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def d4ir_sentence(evals: list[dict]) -> str | None:
    """One sentence placing the D4IR row against M0 and Data (RGB PSNR against ground truth, and against the
    teacher when recorded), from the eval.json rows; None when one of the three rows is missing."""
    rows = {}
    for e in evals:
        for key, word in (("d4ir", "D4IR"), ("m0", "M0"), ("data", "Data")):
            if e.get("type") == "KD" and str(e.get("method", "")).startswith(word) and key not in rows:
                rows[key] = e
    if len(rows) < 3:
        return None
    d, m, o = (rows[k]["mean"]["psnr"] for k in ("d4ir", "m0", "data"))
    ref = ""
    if all("ref_psnr" in r["mean"] for r in rows.values()):
        ref = (f"; against the teacher's outputs {rows['d4ir']['mean']['ref_psnr']:.2f} vs "
               f"{rows['m0']['mean']['ref_psnr']:.2f} and {rows['data']['mean']['ref_psnr']:.2f} dB")
    than_web = "at least as well as" if d >= m else "less well than"
    return (f"D4IR scores {d:.2f} dB against ground truth, {d - m:+.2f} dB from M0 ({m:.2f} dB) and {d - o:+.2f} dB "
            f"from Data ({o:.2f} dB){ref}: in this run the synthesized images trained the student {than_web} the "
            f"web degraded photos themselves. That is all it shows: one seed, "
            f"{rows['d4ir'].get('count', '?')} test images and students trained for minutes on small images (see the "
            "caveat for the synthesis model): it neither confirms nor refutes the paper's ranking at full scale.")


TINY_SD_NOTE = """\
**What this demo can and cannot show.** Every stage here ran for real: a teacher was trained, the prompt
encoder learned from the web degraded images, a Stable-Diffusion-shaped model synthesized WebDataset
shards, the student was distilled with the joint phase and regeneration rounds, and every number above
comes from an `eval.json` written in this run. But the diffusion model is *tiny and randomly initialised*
(no weights can be downloaded here), so its "synthesized degraded images" are structured noise, not rainy
photos (see the round grid). The D4IR row therefore measures how well a student learns the teacher from
noise-like inputs; it says nothing about the quality the method reaches with a real Stable Diffusion, where
the paper reports D4IR above M0 and Data. The demo images are 96x96 crops and the networks are narrow
(AirNet at width 16, 2x2 blocks), so absolute PSNRs are far from benchmark numbers. Use it to check the
plumbing, the file contracts and the timings; use `bench/quality_rain100l.py` and a real SD for quality."""


WEATHER_SD_NOTE = """\
**What this demo can and cannot show.** Every stage here ran for real: a teacher was trained, the prompt
encoder learned from the web degraded images, a Stable-Diffusion-shaped model synthesized WebDataset shards,
the student was distilled with the joint phase and regeneration rounds, and every number above comes from an
`eval.json` written in this run. The diffusion model is the project's own *weather LDM*
(`synth/weights/weather-ldm`, its model card there): a 4x AutoencoderKL, a 3.2M-parameter UNet with
cross-attention and a frozen CLIP text encoder, trained for 48 minutes on one CPU thread on 64x64 crops of 11
redistributable photos in clean, rain, haze and snow renders. It keeps the layout of the clean photo (see the
round grid: clean source, round 0, later rounds; low-pass PSNR 23-24 dB on held-out crops at lambda 0.5) and
its rain caption adds rain streaks (on all 48 held-out crops, a quarter to a third of the physical render's
streak energy), but its haze and snow captions add almost nothing (3-4% and 1-3% of the physical change), and
it is not Stable Diffusion: its VAE reconstructs held-out photos at 25.4 dB PSNR and drops most snow flakes,
it works at 64x64 only, and it knows no other captions. The demo's prompts are stage 1's learned embeddings,
not captions, so how much weather they add is measured, not assumed (`bench/prompt_effect.py`,
docs/benchmarks.md). The demo images are 96x96 crops and the networks are narrow (AirNet at width 16, 2x2
blocks), so absolute PSNRs are far from benchmark numbers. Use it to check the pipeline end to end on
real-looking synthesized images; use `bench/quality_rain100l.py` and a real SD for quality claims."""

OTHER_SD_NOTE = """\
**Scale.** Every number above comes from an `eval.json` written in this run; how far they carry depends on
the SD the shards were synthesized with (named in RUN/shards/round-000/manifest.json), the data and the
training budget of this run."""


def sd_note(run: Path) -> str:
    """The caveat for the SD that synthesized the run's round 0 (its manifest's "sd")."""
    try:
        spec = read_manifest(RunLayout(run).round_shards(0)).provenance.sd
    except (OSError, ValueError):
        spec = None
    return {"tiny": TINY_SD_NOTE, "weather": WEATHER_SD_NOTE}.get(spec, OTHER_SD_NOTE)


def build_report(run: Path, test: Path | None = None) -> Path:
    """RUN/report.md from the eval.json files of the run, with the grids and curves beside it."""
    import json

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
    exported = latency_lines(layout)
    if exported:
        parts += ["## The student on the device: ONNX and onnxruntime", "", *exported, ""]
    timings = layout.timings
    if timings.exists():
        parts += ["## Time per step (this machine)", "", "| step | seconds |", "|---|---|"]
        parts += [f"| {t['step']} | {t['seconds']} |" for t in json.loads(timings.read_text())] + [""]
    sentence = d4ir_sentence(evals)
    if sentence:
        parts[parts.index("Y channel (BT.601):"):parts.index("Y channel (BT.601):")] = [sentence, ""]
    parts += ["## Caveat", "", sd_note(run), ""]
    out = layout.report
    atomic_write_text(out, "\n".join(parts))
    return out
