"""The `d4ir` helper commands: data, models, eval, probe, shards, report, demo, export, experiments and
status (pipelines/cli.py adds them)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from d4ir.shards.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE

from .experiments.tables import TABLES
from .options import weights_key_option

_path = click.Path(path_type=Path)
_existing = click.Path(exists=True, path_type=Path)
_device_option = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")


def _device(device: str | None) -> str:
    from d4ir.synth.sd import default_device

    return default_device(device)


@click.group()
def data() -> None:
    """Inspect image folders and build the embedded demo data.

    `data check` says what a stage would read from a folder and what it would skip; `data demo` builds the
    demo's rainy, hazy and snowy images from photos that ship inside scikit-image.
    """


@data.command("check")
@click.argument("folder", type=_path)
@click.option("--min-side", default=DEFAULT_MIN_SIDE, show_default=True, help="Skip images with a shorter side.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, help="Skip images with more pixels.")
@click.option("-v", "--verbose", is_flag=True, help="List every skipped file with its reason.")
def data_check(folder: Path, min_side: int, max_pixels: int, verbose: bool) -> None:
    """Decode every image under FOLDER (recursively) and count usable and skipped files.

    Odd files are converted by a stated rule (grayscale, palette, alpha over white, 16-bit, CMYK, EXIF
    orientation) or skipped with a reason (zero bytes, not an image, truncated, corrupt, too small, too
    large). Exits non-zero only when nothing usable is left.
    """

    from d4ir.shards.folders import scan_images

    try:
        scan = scan_images(folder, min_side=min_side, max_pixels=max_pixels)
    except FileNotFoundError as err:
        raise click.ClickException(str(err)) from err
    for reason, n in scan.counts().items():
        click.echo(f"{reason:>14}: {n}")
    if verbose:
        for path, reason in scan.skipped:
            click.echo(f"skipped {path}: {reason}")
    if not scan.paths:
        click.echo(f"no usable image in {folder}", err=True)
        sys.exit(1)


@data.command("demo")
@click.option("--out", type=_path, default=Path("data/demo"), show_default=True, help="Where the demo data goes.")
@click.option("--seed", default=0, show_default=True, help="Seed of the crops and of the rain, haze and snow.")
@click.option("--force", is_flag=True, help="Rebuild even when a complete demo set exists.")
def data_demo(out: Path, seed: int, force: bool) -> None:
    """Build the embedded demo data from the photos that ship inside scikit-image (no download).

    \b
    Per task (derain, dehaze, desnow) under OUT/<task>/:
      web_degraded/   unpaired "web" degraded images (physical rain, haze or snow)
      web_clean/      unpaired "web" clean images, from photos disjoint from the degraded ones
      original/       paired degraded/ + clean/ set that trains the demo teacher
      test/           paired degraded/ + clean/ test set
    """
    from d4ir.pipelines.demo_data import build_demo_data

    click.echo(f"demo data in {build_demo_data(out, seed=seed, force=force)}")


@click.command()
def models() -> None:
    """List every registered restoration network with its parameter count.

    Any of these names is a valid --arch (teacher) or --student (distill); `half` in distill means the
    teacher's own architecture at half width.
    """
    from d4ir.distill.registry import ARCHITECTURES, build, count_parameters

    wn = max(len(n) for n in ARCHITECTURES)
    wc = max(len(cls.__name__) for cls, _ in ARCHITECTURES.values())
    click.echo(f"{'name':<{wn}} {'class':<{wc}} {'params':>12}  kwargs")
    for name, (cls, kwargs) in ARCHITECTURES.items():
        click.echo(f"{name:<{wn}} {cls.__name__:<{wc}} {count_parameters(build(name)):>12,}  {kwargs}")


@click.command("eval")
@click.option("--model", "model_path",
              help="A network (ours .safetensors, official .pth, TorchScript, torch.export .pt2, or "
                   "package.module:callable@WEIGHTS) or `identity` to score the degraded inputs.")
@click.option("--run-dir", "run", type=_path,
              help="With --student: score the run's student against the teacher it recorded (else RUN/teacher).")
@click.option("--student", help="With --run-dir: the student (as given to `d4ir distill --student`, or its --name).")
@click.option("--pairs", type=_existing, required=True, help="Paired test set.")
@click.option("--reference", help="Also score against this network's outputs (e.g. the teacher; any --model form).")
@click.option("--arch", help="Architecture of an official .pth when it cannot be inferred.")
@weights_key_option
@click.option("--out", type=_path,
              help="eval.json path (default: beside our checkpoint; ./eval.json for identity, an official file or "
                   "any other teacher form).")
@click.option("--method", help="Name of the row in the printed table (default: the model's name).")
@click.option("--tile", type=int, help="Run images in overlapping tiles of this side (default: whole images up to "
              "1 Mpx, larger ones in 512-px tiles).")
@click.option("--border", default=0, show_default=True, help="Pixels cropped from each border before scoring.")
@click.option("--limit", type=int, help="Score only the first N pairs.")
@_device_option
def eval_cmd(model_path, run, student, pairs, reference, arch, weights_key, out, method, tile, border, limit,
             device) -> None:
    """Score a model on a paired set: PSNR/SSIM (RGB and Y) per image and mean, into eval.json; Y also in the
    authors' convention (the output saved as uint8 as their test script does, ssim.m on Y*255).

    Prints a table shaped like the paper's (Params (M), PSNR, SSIM).
    """
    from d4ir.distill.evaluate import IDENTITY, convention_note, evaluate, format_table
    from d4ir.distill.teachers import is_foreign, recorded_teacher
    from d4ir.distill.trainer import student_name
    from d4ir.shards.layout import EVAL_FILE, RunLayout

    device = _device(device)
    if (model_path is None) == (run is None or student is None):
        raise click.UsageError("give --model, or --run-dir with --student")
    if model_path is None:
        layout = RunLayout(run)
        name = student if layout.student(student).is_dir() else student_name(student)
        model_path = layout.student_weights(name)
        # the teacher the student was distilled from (its config.json), else the run's own
        reference = reference or recorded_teacher(layout.student(name)) or (
            layout.teacher_weights if layout.teacher_weights.exists() else None)
    if out is None:  # beside our checkpoints; never into the folder of an official file or a foreign teacher
        ours = Path(str(model_path)).suffix in ("", ".safetensors", ".json") and not is_foreign(model_path)
        out = Path(model_path).with_name(EVAL_FILE) if model_path != IDENTITY and ours else Path(EVAL_FILE)
    result = evaluate(model_path, pairs, out, reference=reference, arch=arch, weights_key=weights_key, device=device,
                      tile=tile,
                      border=border, limit=limit)
    label = method or result["name"]
    click.echo(format_table([("RGB", label, result)]))
    click.echo(format_table([("Y", label, result)], y_channel=True).split("\n", 2)[2])
    click.echo(format_table([("Y (authors)", label, result)], authors=True).split("\n", 2)[2])
    click.echo(convention_note(result["authors_quantize"]))
    if reference:
        m = result["mean"]
        click.echo(f"against the reference: PSNR {m['ref_psnr']:.2f} dB, SSIM {m['ref_ssim']:.4f}")
    if result["skipped"]:
        from d4ir.shards.pairs import describe_skipped

        click.echo(f"skipped: {describe_skipped(pairs, len(result['images']), result['skipped'])}")
    if result["cropped"]:
        shown = "; ".join(f"{name}: {how}" for name, how in result["cropped"])
        click.echo(f"cropped: {pairs}: {len(result['cropped'])} pair(s) of unequal sizes scored on their centre "
                   f"crops ({shown})")
    click.echo(f"{result['count']} images, {result['seconds_per_image']:.3f} s/image on {device}; wrote {out}")


@click.command()
@click.option("--prompts", "prompts_dir", type=_existing, required=True,
              help="A prompts folder (RUN/prompts) or prompt_encoder.safetensors.")
@click.option("--images", type=_existing, required=True,
              help="Held-out images, one sub-folder per degradation type (e.g. rain/, haze/, snow/).")
@click.option("--out", type=_path, default=Path("probe.png"), show_default=True, help="The PCA plot PNG.")
@click.option("--crop", default=64, show_default=True, help="Side of the random crops (use the training crop).")
@click.option("--json-out", type=_path, help="Also write the probe result as JSON.")
@_device_option
def probe(prompts_dir, images, out, crop, json_out, device) -> None:
    """Do the prompt encoder's features see degradation? Nearest-neighbour probe accuracy and a PCA plot.

    Each crop is labelled by its most similar crop of another image; chance is 1 / number of types.
    """
    import json

    from d4ir.pipelines.figures import probe_plot
    from d4ir.synth.embed import load_prompt_encoder
    from d4ir.synth.probe import images_by_subfolder
    from d4ir.synth.probe import probe as run_probe

    device = _device(device)
    result = run_probe(load_prompt_encoder(prompts_dir, device=device), images_by_subfolder(images), crop=crop,
                       device=device)
    probe_plot(result, out)
    click.echo(f"nearest-neighbour accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}); plot {out}")
    if json_out:
        shown = {k: v for k, v in result.items() if k not in ("points", "labels")}
        json_out.write_text(json.dumps(shown, indent=2, default=str))


@click.group("shards")
def shards_group() -> None:
    """Check and look at shard folders.

    `verify` names every problem of a round; `show` prints its counts and writes a sample grid.
    """


@shards_group.command("verify")
@click.argument("directory", type=_existing)
def shards_verify(directory: Path) -> None:
    """Name every missing, truncated, altered or unfinished shard in DIRECTORY (a round folder, or a shards root:
    every round in it, and any folder there that holds shards but is not named round-NNN)."""
    from d4ir.shards.verify import verify_shards

    problems = verify_shards(directory)
    for p in problems:
        click.echo(p)
    if problems:
        sys.exit(1)
    click.echo(f"{directory}: all shards verified")


@shards_group.command("show")
@click.argument("directory", type=_existing)
@click.option("--out", type=_path, help="Grid PNG (default: DIRECTORY/samples.png).")
@click.option("-n", "--num", default=8, show_default=True, help="Samples in the grid.")
def shards_show(directory: Path, out: Path | None, num: int) -> None:
    """Print counts and write a sample grid: clean source | prompt source | synthesized."""
    from d4ir.pipelines.rounds import shard_grid
    from d4ir.shards.writer import read_manifest

    manifest = read_manifest(directory)
    images = "?" if manifest.images is None else manifest.images
    click.echo(f"{directory}: {images} images in {manifest.num_shards} shards, sd {manifest.provenance.sd}, "
               f"round {manifest.round}")
    click.echo(f"grid: {shard_grid(directory, out or directory / 'samples.png', num=num)}")


@click.command()
@click.argument("run", type=_existing)
@click.option("--test", type=_existing, help="Paired test set for the restoration grid (default: from eval.json).")
def report(run: Path, test: Path | None) -> None:
    """Build RUN/report.md from the eval.json files of a run (tables), with sample grids and curves.

    Every row of the tables is read from an eval.json written by `d4ir eval`, `d4ir distill --val` or the demo.
    """
    from d4ir.pipelines.report import build_report

    click.echo(f"report: {build_report(run, test)}")


@click.command()
@click.option("--out", type=_path, default=Path("runs/demo"), show_default=True, help="The demo's folder.")
@click.option("--report-only", is_flag=True, help="Rebuild OUT/report.md from the finished rows; train nothing.")
def demo(out: Path, report_only: bool) -> None:
    """The embedded demo, offline, on the CPU, in minutes: `d4ir experiments demo` (configs/demo.json).

    demo data (scikit-image photos) -> the shipped demo teacher -> prompts -> synth -> the rows Input, Teacher,
    Student, Data, M0, D4IR (with regeneration rounds) -> ONNX export and latency -> OUT/report.md. A rerun
    resumes: finished rows are skipped.
    """
    from d4ir.pipelines.experiments import load_config, run_experiments
    from d4ir.pipelines.experiments.shipped import find_config

    cfg = load_config(find_config("demo")[0], out, base=Path.cwd())
    run_experiments(cfg, report_only=report_only, log=click.echo)


@click.command("export")
@click.option("--model", "model_path", type=_existing, required=True, help="A checkpoint (ours or an official .pth).")
@click.option("--out", type=_path, required=True, help="The .onnx file to write.")
@click.option("--images", type=_existing, help="Images to check the export on (default: a few bundled photos).")
@click.option("--deform-op", type=click.Choice(["deformconv", "gridsample"]), default="deformconv",
              show_default=True, help="AirNet's deformable conv as ONNX DeformConv (fast in onnxruntime) or as "
              "GridSample + MatMul (portable to runtimes without DeformConv).")
@click.option("--int8", "int8_out", type=_path, help="Also write a dynamically INT8-quantized copy here.")
@weights_key_option
def export_cmd(model_path, out, images, deform_op, int8_out, weights_key) -> None:
    """Export a restoration network to ONNX (dynamic batch, height and width) for the device it is made for.

    After export, onnxruntime runs the file on a few real images at their own sizes and the largest difference
    from PyTorch is printed (it must be at most 1e-4 in fp32). Needs the `export` extra (onnx, onnxruntime).
    """
    from d4ir.distill.export import export_model, quantize_dynamic_int8
    from d4ir.shards.folders import scan_images
    from d4ir.shards.images import read_rgb

    checks = [read_rgb(p) for p in scan_images(images).paths[:4]] if images else None
    r = export_model(model_path, out, checks, deform_op=deform_op, weights_key=weights_key)
    click.echo(f"{r.name}: {r.params:,} parameters, {r.bytes / 2**20:.1f} MiB ONNX (opset {r.opset}, "
               f"{r.deform_op}); largest difference from PyTorch {r.max_diff:.2e}; wrote {r.path}")
    if int8_out:
        q = quantize_dynamic_int8(r.path, int8_out)
        click.echo(f"INT8: {q.stat().st_size / 2**20:.1f} MiB; wrote {q}")


@click.command()
@click.argument("config", required=False)
@click.option("--list", "list_", is_flag=True, help="List the configs shipped with d4ir (usable by name) and exit.")
@click.option("--out", type=_path, help="The experiments folder (default: the config's `out`).")
@click.option("--data", multiple=True, metavar="DIR|NAME=DIR",
              help="Source folder of the config's `prepare` datasets (repeatable: NAME=DIR sets one), e.g. "
              "../shared/data from a clone. Relative paths of a shipped config otherwise resolve against the "
              "current folder.")
@click.option("--table", "tables", multiple=True, help=f"Run only this table (repeatable): {', '.join(TABLES)}.")
@click.option("--report-only", is_flag=True, help="Rebuild OUT/report.md from the finished rows; train nothing.")
def experiments(config: str | None, list_: bool, out: Path | None, data: tuple[str, ...], tables: tuple[str, ...],
                report_only: bool) -> None:
    """The paper's tables from one JSON config, resumable: every row once, its eval.json per test set.

    \b
    CONFIG is a config file, or the name of one shipped with d4ir (`--list`; e.g. `cpu-matrix`: the whole matrix
    on the CPU). The config names the SD, the scale (a preset with per-stage overrides), the seed and device, the
    datasets to prepare, the tasks (teachers, web folders, original pairs, named test sets) and the tables: 1
    deraining, 2 dehazing, 3 ablation (M0-M5), 4 SPA, 5 Restormer, desnow, all (all-in-one), real (a published
    teacher on real data, every baseline). A rerun skips
    finished rows and resumes an interrupted one; OUT/report.md puts the paper's numbers beside ours. A file's
    relative paths are relative to the file; a shipped config's to the current folder, and `--data` names its
    datasets' source folder (`d4ir experiments cpu-matrix --data ../shared/data` from a clone). See README.md.
    """
    from d4ir.pipelines.experiments import load_config, run_experiments
    from d4ir.pipelines.experiments.datasets import GENERATED
    from d4ir.pipelines.experiments.shipped import describe, find_config, shipped_configs

    if list_:
        for name, path in shipped_configs().items():
            click.echo(f"{name:<16} {describe(path)}")
        return
    if config is None:
        raise click.UsageError("give a CONFIG file or the name of a shipped config (d4ir experiments --list)")
    path, shipped = find_config(config)
    cfg = load_config(path, out, base=Path.cwd() if shipped else None, data=data)
    missing = [f"{name}: {src}" for name, src in cfg.prepare.items() if not src.exists() and name not in GENERATED]
    if missing and not report_only:
        raise FileNotFoundError(f"the config's datasets have no source folder ({'; '.join(missing)}): give --data DIR "
                                "(or NAME=DIR), e.g. --data ../shared/data from a clone")
    run_experiments(cfg, only=list(tables) or None, report_only=report_only, log=click.echo)


@click.command()
@click.option("--run-dir", "run", type=_path, required=True, help="The run folder.")
@click.option("--done", "stage", type=click.Choice(["teacher", "prompts", "synth"]),
              help="Print nothing; exit 0 when this stage has written its output, 1 otherwise (for scripts).")
def status(run: Path, stage: str | None) -> None:
    """What RUN holds, stage by stage: the teacher trained here, stage 1's prompts, the shard rounds, the students.

    A stage is done when its hand-over file exists (written last); run its command with --resume to continue it.
    The Makefile runs a prerequisite stage only when `d4ir status --done STAGE` says it is missing.
    """
    from d4ir.shards.status import run_status, stage_done

    if stage is not None:
        sys.exit(0 if stage_done(run, stage) else 1)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder at {run}")
    for s in run_status(run):
        click.echo(f"{s.stage:<16} {'done' if s.done else 'missing':<8} {s.detail}")


COMMANDS = [data, models, eval_cmd, probe, shards_group, report, demo, export_cmd, experiments, status]
