"""The `d4ir` command line: one sub-command per stage, each a thin wrapper over the stage's entry function.

Every stage option comes from its config dataclass (pipelines/options.py): the flag, its help and its paper
default are declared once, on the config field. The commands only name the inputs, pick the preset and call
the library.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import click
from d4ir.distill.config import DATAFREE_DERIVED, DistillConfig
from d4ir.distill.teacher import SupervisedConfig
from d4ir.shards.progress import process_rank, set_quiet
from d4ir.synth.plan import WEATHER_TEXT, SynthConfig
from d4ir.synth.prompts import PromptsConfig

from .errors import OneLineErrors, no_empty_folders
from .options import config_from, config_options, given_options, weights_key_option
from .presets import preset as preset_config

_path = click.Path(path_type=Path)
_existing = click.Path(exists=True, path_type=Path)


def _device(device: str | None) -> str:
    from d4ir.synth.sd import default_device

    return default_device(device)


def _config(stage: str, scale: str, given: dict):
    return config_from(preset_config(scale, stage), given)


def _say(*parts: str) -> None:
    """A command's report: its non-empty parts joined by '; ' (no stray '; ;'), from rank 0 of torchrun only."""
    if process_rank() == 0:
        click.echo("; ".join(p for p in parts if p))


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        set_quiet(True)
    return value


_QUIET_HELP = ("No progress bars or lines and no per-epoch lines (TQDM_DISABLE=1 and D4IR_QUIET=1 do the same); "
               "warnings, errors and the final summary stay.")


def quiet_option() -> click.Option:
    """--quiet / -q after a command (`d4ir synth -q`, `make synth ARGS=-q`); `d4ir -q synth` is the group's."""
    return click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, callback=_quiet, help=_QUIET_HELP)


_TENSORBOARD_HELP = ("Also write TensorBoard event files under DIR (every stage's losses, learning rates, validation "
                     "PSNR and sample images of each round; `tensorboard --logdir DIR`); train.jsonl stays. Needs "
                     "the track extra: pip install 'd4ir[track]'.")


def _tensorboard(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        from d4ir.shards.tracking import set_tracking

        set_tracking(value)
    return value


def tensorboard_option() -> click.Option:
    """--tensorboard DIR after a command (`d4ir distill ... --tensorboard tb`); `d4ir --tensorboard tb distill`
    is the group's."""
    return click.Option(["--tensorboard", "tensorboard_dir"], type=_path, metavar="DIR", expose_value=False,
                        callback=_tensorboard, help=_TENSORBOARD_HELP)


def _with(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


run_option = click.option("--run-dir", "run", type=_path, required=True,
                          help="The run folder every stage reads and writes.")


def sd_options(default: str | None):
    """--sd and --sd-config, combined into a synth.sd.SDSource (None when neither is given and no default)."""
    shown = f" [default: {default}]" if default else " [default: the SD the shards were made with]"
    return _with([
        click.option("--sd", "sd_spec", default=default,
                     help="The frozen SD: a diffusers folder, a single .safetensors/.ckpt file, a hub id in the "
                     "local cache, `weather` (the shipped 64x64 weather LDM) or `tiny` (random, for tests)." + shown),
        click.option("--sd-config", help="For a single-file SD: a diffusers folder or cached hub id with its configs "
                     "(needed for SD2.x files)."),
    ])


def _sd_source(spec: str | None, config: str | None):
    from d4ir.synth.sd import SDSource

    if spec is None:
        if config is not None:
            raise click.UsageError("--sd-config needs --sd")
        return None
    return SDSource(spec, config)

preset_option = click.option(
    "--preset", type=click.Choice(["paper", "demo"]), default="paper", show_default=True,
    help="Defaults for every option not given: the paper's settings, or the CPU demo scale.",
)
device_option = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
resume_option = click.option("--resume", is_flag=True, help="Continue the run's saved state (state.pt).")
dask_options = [
    click.option("--scheduler", help="dask scheduler address: run the shard jobs on that cluster."),
    click.option("--workers", type=int, help="Start a local dask cluster of N workers (one per GPU)."),
]


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, envvar="D4IR_DEBUG", help="Show the traceback of an expected failure too.")
@click.option("--quiet", "-q", is_flag=True, help=_QUIET_HELP)
@click.option("--tensorboard", "tensorboard_dir", type=_path, metavar="DIR", envvar="D4IR_TENSORBOARD",
              help=_TENSORBOARD_HELP)
def main(debug: bool, quiet: bool, tensorboard_dir: Path | None) -> None:
    """D4IR: distil a weather-restoration network into a smaller one without its training data.

    \b
    Stages (each writes files of the run folder the next one reads, see docs/design.md):
      prompts   learn degradation-aware prompts from web degraded photos
      synth     synthesize degraded images from web clean photos with a frozen Stable Diffusion
      distill   train a small student to mimic the teacher on the synthesized images
    Around them:
      teacher      train a teacher here from paired data (the demo and the benchmarks)
      eval         score a model on a paired set;  export  write a student as ONNX, checked by onnxruntime
      experiments  the paper's tables from one JSON config;  demo  every stage on the embedded demo data
      status       what a run folder holds;  report  RUN/report.md;  shards  check and look at shards
      data         check image folders, build the demo data;  models  the registered networks;  probe  see features
    An expected failure (a missing file, a full disk, a bad value) ends with one line and exit status 2.
    Progress: a bar on a terminal, a plain line every 30 s otherwise (D4IR_PROGRESS_INTERVAL); none with
    --quiet or TQDM_DISABLE=1. Under torchrun only rank 0 reports (warnings, progress, the summary).
    Tracking: --tensorboard DIR writes TensorBoard event files of every stage beside train.jsonl.
    """
    set_quiet(quiet)  # this invocation's own (a command's --quiet, parsed after this, may still set it)
    from d4ir.shards.tracking import set_tracking

    set_tracking(tensorboard_dir)  # likewise: a command's --tensorboard may still set it
    if process_rank() != 0:  # the other ranks would repeat rank 0's warnings and print a summary of nothing
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")


@main.command()
@click.option("--pairs", type=_existing, required=True, help="Paired training set (any layout `shards.pairs` knows).")
@click.option("--val", type=_existing, help="Paired validation set, scored after every epoch.")
@click.option("--run-dir", "run", type=_path, help="Write the teacher into RUN/teacher (or give --out).")
@click.option("--out", type=_path, help="Output folder (instead of RUN/teacher): NAME.safetensors/.json, state.")
@click.option("--name", default="teacher", show_default=True, help="Stem of the written model files.")
@config_options(SupervisedConfig)
@_with([preset_option, device_option, resume_option])
def teacher(pairs, val, run, out, name, preset, device, resume, **kwargs) -> None:
    """Train a restoration network on paired data (L1, plus AirNet's contrastive term; crops, flips, Adam).

    This is how the demo and the benchmarks get a teacher; with a student architecture it is also the
    paper's "Student" baseline (trained on the teacher's pairs with ground truth).
    """
    from d4ir.distill.teacher import train_supervised
    from d4ir.shards.layout import RunLayout

    if (run is None) == (out is None):
        raise click.UsageError("give exactly one of --run-dir (writes RUN/teacher) or --out")
    given = given_options(kwargs)
    if given.get(("arch",), "airnet") != "airnet":
        given.setdefault(("arch_kwargs",), None)  # a preset's arch_kwargs are AirNet's
    config = _config("teacher", preset, given)
    out = out or RunLayout(run).teacher_dir
    with no_empty_folders(out):
        r = train_supervised(pairs, out, config, val_dir=val, name=name, resume=resume, device=_device(device))
    shown = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
    for line in r.skipped:
        _say(f"skipped: {line}")
    _say(f"{name}: {r.params:,} parameters, {r.epochs} epochs", shown, f"wrote {r.weights}")


@main.command()
@run_option
@click.option("--degraded", type=_existing, required=True, help="Web-collected degraded images (searched recursively).")
@sd_options("weather")
@config_options(PromptsConfig)
@_with([preset_option, device_option, resume_option])
def prompts(run, degraded, sd_spec, sd_config, preset, device, resume, **kwargs) -> None:
    """Stage 1: train the prompt encoder (MoCo, Eq. 3) and embed every degraded image.

    \b
    Writes RUN/prompts/: prompt_encoder.safetensors + .json, embeddings.safetensors (prompt_embeds
    [N, L, D] fp16, D = the UNet's cross_attention_dim), index.jsonl (row -> source path, sha256),
    train.jsonl (per-step losses) and state.pt.
    """
    from d4ir.shards.layout import RunLayout
    from d4ir.synth.prompts import train_prompts
    from d4ir.synth.sd import load_sd_cached

    device = _device(device)
    config = _config("prompts", preset, given_options(kwargs))
    sd = load_sd_cached(_sd_source(sd_spec, sd_config), device, "float32")
    with no_empty_folders(RunLayout(run).prompts):
        r = train_prompts(degraded, sd, RunLayout(run).prompts, config, resume=resume, device=device)
    _say(f"prompts: {r.num_images} images embedded ({r.counts}), final loss {r.final_loss}, "
         f"prompt encoder {r.encoder_sha256[:12]}; wrote {r.out_dir}")


@main.command()
@run_option
@click.option("--clean", type=_existing, required=True, help="Web-collected clean images (any size).")
@sd_options("weather")
@click.option("--task", type=click.Choice(sorted(WEATHER_TEXT)), default="derain", show_default=True,
              help="The weather, for the default --text of --prompt-mode text.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Default: float16 on GPU.")
@config_options(SynthConfig)
@_with([preset_option, device_option, *dask_options])
def synth(run, clean, sd_spec, sd_config, task, dtype, preset, device, scheduler, workers, **kwargs) -> None:
    """Stage 2: content-driven conditional diffusion (Eq. 6-7) into WebDataset shards.

    \b
    Each clean photo is encoded by the frozen VAE, noised to step int(T*lambda), denoised by DDIM with the
    prompt embedding in place of the text encoder's output, and decoded. Writes RUN/shards/round-NNN/:
      NNNNNN.tar          samples <key>.degraded.png (synthesized image) + <key>.json (provenance)
      NNNNNN.stats.json   written last: a shard without it does not exist (reruns redo it, skip the rest)
      manifest.json       SD, prompt encoder hash, config;  sizes.json  images per shard
    """
    from d4ir.pipelines.runners import make_distributor
    from d4ir.shards.layout import RunLayout
    from d4ir.synth.worker import synthesize

    given = given_options(kwargs)
    given.setdefault(("text",), WEATHER_TEXT[task])
    config = _config("synth", preset, given)
    layout = RunLayout(run)
    with no_empty_folders(layout.round_shards(config.round)):
        r = synthesize(clean, layout.shards, config, sd_source=_sd_source(sd_spec, sd_config),
                       prompts_dir=layout.prompts, device=_device(device), dtype=dtype,
                       distributor=make_distributor(scheduler, workers))
    retried = f" ({r.retried} shard(s) retried: see their stats' retries)" if r.retried else ""
    _say(f"synth: {r.shards} shards ({r.already_done} already done), {r.images} images written, "
         f"{r.failures} failures{retried}, {r.seconds:.1f} s; clean photos: {r.clean}; {r.round_dir}")


@main.command("distill")
@run_option
@click.option("--teacher", "teacher_path",
              help="Teacher: our checkpoint, an official .pth, a TorchScript or torch.export (.pt2) file, or "
                   "package.module:callable@WEIGHTS (a factory on PYTHONPATH with its safetensors/state-dict "
                   "weights); default: RUN/teacher's. A teacher from outside the registry needs --student NAME.")
@click.option("--teacher-arch", help="Registry name of an official teacher .pth whose keys cannot tell its variant, "
              "e.g. gcanet-derain (GCANet's files are read as dehazing otherwise, with a warning).")
@weights_key_option
@sd_options(None)
@click.option("--name", help="Student folder name under RUN/students (default: the student name).")
@click.option("--degraded", type=_existing, help="Web degraded images (L_cl and the feedback; --data web).")
@click.option("--clean", type=_existing, help="Web clean images (the feedback surrogate).")
@click.option("--original", type=_existing, help="The teacher's paired set (--data original: degraded side only).")
@click.option("--val", type=_existing, help="Paired validation set (PSNR/SSIM vs ground truth and vs teacher).")
@config_options(DistillConfig, exclude=DATAFREE_DERIVED)
@_with([preset_option, device_option, resume_option, *dask_options])
def distill_cmd(run, teacher_path, teacher_arch, weights_key, sd_spec, sd_config, name, degraded, clean, original, val,
                preset, device, resume, scheduler, workers, **kwargs) -> None:
    """Stage 3: distil a student from the teacher on the synthesized shards (Eq. 8), with the joint phase
    (Eq. 9) and regeneration rounds that close the prompt-encoder feedback loop.

    \b
    Writes RUN/students/NAME/: student.safetensors + .json, prompt_encoder.safetensors (KD-updated),
    train.jsonl, state.pt, eval.json (with --val), config.json; its regeneration rounds go to
    RUN/students/NAME/prompts/round-NNN and RUN/students/NAME/shards/round-NNN.
    """
    from d4ir.distill.trainer import distill, student_name
    from d4ir.pipelines.runners import make_distributor
    from d4ir.shards.layout import RunLayout

    config = _config("distill", preset, given_options(kwargs))
    with no_empty_folders(RunLayout(run).student(name or student_name(config.student))):
        r = distill(run, teacher_path or RunLayout(run).teacher_weights, config,
                    sd_source=_sd_source(sd_spec, sd_config), degraded_dir=degraded, clean_dir=clean,
                    original_dir=original, val_dir=val, name=name, resume=resume, device=_device(device),
                    distributor=make_distributor(scheduler, workers), teacher_key=weights_key,
                    teacher_arch=teacher_arch)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
    for line in r.skipped:
        _say(f"skipped: {line}")
    _say(f"distill: {r.params:,} parameters, last round {r.round}", shown, f"wrote {r.student_dir}")


def _register_tools() -> None:
    from . import cli_tools

    for command in cli_tools.COMMANDS:
        main.add_command(command)
    todo = list(main.commands.values())
    while todo:  # every command and sub-command takes --quiet too (e.g. `make synth ARGS=--quiet`)
        command = todo.pop()
        command.params.append(quiet_option())
        if not getattr(command, "commands", None):
            command.params.append(tensorboard_option())
        todo.extend(getattr(command, "commands", {}).values())


_register_tools()

if __name__ == "__main__":
    main()
