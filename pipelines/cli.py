"""The `d4ir` command line: one sub-command per stage, each a thin wrapper over the stage's entry function."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from shards.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, scan_images


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """D4IR: distil a weather-restoration network into a smaller one without its training data.

    \b
    Stages (each writes files the next one reads, see `docs/architecture.md`):
      prompts   learn degradation-aware prompts from web degraded photos
      synth     synthesize degraded images from web clean photos with a frozen Stable Diffusion
      distill   train a small student to mimic the teacher on the synthesized images
    Helpers: data (check folders, build the demo data), teacher, eval, models, shards, report, demo.
    """


@main.group()
def data() -> None:
    """Inspect image folders and build the embedded demo data."""


@data.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--min-side", default=DEFAULT_MIN_SIDE, show_default=True, help="Skip images whose shorter side is below."
)
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, help="Skip images with more pixels.")
@click.option("-v", "--verbose", is_flag=True, help="List every skipped file with its reason.")
def data_check(folder: Path, min_side: int, max_pixels: int, verbose: bool) -> None:
    """Decode every image under FOLDER (recursively) and count usable and skipped files.

    Odd files are converted by a stated rule (grayscale, palette, alpha over white, 16-bit, CMYK, EXIF
    orientation) or skipped with a reason (zero bytes, not an image, truncated, corrupt, too small, too
    large). Exits non-zero only when nothing usable is left.
    """
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
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/demo"), show_default=True)
@click.option("--seed", default=0, show_default=True)
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
    from pipelines.demo_data import build_demo_data

    path = build_demo_data(out, seed=seed, force=force)
    click.echo(f"demo data in {path}")


# ------------------------------------------------------------------------------------------------- options
def _kv(ctx, param, value: str | None) -> dict | None:
    """Parse "k=v,k=v" into a dict with int/float/bool values where they parse."""
    if not value:
        return None
    out = {}
    for item in value.split(","):
        if "=" not in item:
            raise click.BadParameter(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                continue
        out[k.strip()] = {"true": True, "false": False}.get(v, v) if isinstance(v, str) else v
    return out


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


preset_option = click.option(
    "--preset",
    type=click.Choice(["paper", "demo"]),
    default="paper",
    show_default=True,
    help="Defaults for every option not given: the paper's settings, or the CPU demo scale.",
)
device_option = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
seed_option = click.option("--seed", default=0, show_default=True, help="Seed: CPU runs repeat exactly.")
path = click.Path(path_type=Path)
existing = click.Path(exists=True, path_type=Path)


# ------------------------------------------------------------------------------------------------- networks
@main.command()
def models() -> None:
    """List every registered restoration network with its parameter count."""
    from distill.registry import ARCHITECTURES, build, count_parameters

    click.echo(f"{'name':<14} {'class':<10} {'params':>12}  kwargs")
    for name, (cls, kwargs) in ARCHITECTURES.items():
        click.echo(f"{name:<14} {cls.__name__:<10} {count_parameters(build(name)):>12,}  {kwargs}")


@main.command()
@click.option("--arch", default="airnet", show_default=True, help="Registry name (see `d4ir models`).")
@click.option("--arch-kwargs", callback=_kv, help="Constructor overrides, e.g. n_feats=16,n_groups=2.")
@click.option("--pairs", type=existing, required=True, help="Paired training set (any layout `shards.pairs` knows).")
@click.option("--val", type=existing, help="Paired validation set, scored after every epoch.")
@click.option(
    "--out", type=path, required=True, help="Output folder: teacher.safetensors/.json, train.jsonl, state.pt."
)
@click.option("--epochs", type=int)
@click.option("--iters-per-epoch", type=int, help="Batches per epoch (default: one pass over the pairs).")
@click.option("--batch-size", type=int)
@click.option("--crop", type=int, help="Side of the random training crops.")
@click.option("--lr", type=float)
@click.option("--name", default="teacher", show_default=True, help="Stem of the written model files.")
@click.option("--resume", is_flag=True, help="Continue after the last finished epoch in OUT/state.pt.")
@preset_option
@device_option
@seed_option
def teacher(
    arch,
    arch_kwargs,
    pairs,
    val,
    out,
    epochs,
    iters_per_epoch,
    batch_size,
    crop,
    lr,
    name,
    resume,
    preset,
    device,
    seed,
) -> None:
    """Train a restoration network on paired data (L1, plus AirNet's contrastive term; crops, flips, Adam).

    This is how the demo and the benchmarks get a teacher; with a student architecture it is also the
    paper's "Student" baseline (trained on the teacher's pairs with ground truth).
    """
    from distill.teacher import SupervisedConfig, train_supervised
    from pipelines.presets import merge
    from pipelines.presets import preset as get

    defaults = get(preset, "teacher")
    if arch_kwargs is None and arch != "airnet":
        defaults.pop("arch_kwargs", None)
    cfg = merge(
        defaults,
        arch_kwargs=arch_kwargs,
        epochs=epochs,
        iters_per_epoch=iters_per_epoch,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
    )
    result = train_supervised(
        pairs,
        out,
        SupervisedConfig(arch=arch, seed=seed, **cfg),
        val_dir=val,
        name=name,
        resume=resume,
        device=_device(device),
    )
    click.echo(f"{name} written to {out}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


@main.command("eval")
@click.option(
    "--model",
    "model_path",
    required=True,
    help="A checkpoint (ours .safetensors, official .pth) or `identity` to score the degraded inputs.",
)
@click.option("--pairs", type=existing, required=True, help="Paired test set.")
@click.option("--reference", type=existing, help="Also score against this model's outputs (e.g. the teacher).")
@click.option("--arch", help="Architecture of an official .pth when it cannot be inferred.")
@click.option("--out", type=path, help="eval.json path (default: beside the model, or ./eval.json).")
@click.option("--method", help="Name of the row in the printed table (default: the model's name).")
@click.option("--tile", type=int, help="Run large images in overlapping tiles of this side.")
@click.option("--border", default=0, show_default=True, help="Pixels cropped from each border before scoring.")
@click.option("--limit", type=int, help="Score only the first N pairs.")
@device_option
def eval_cmd(model_path, pairs, reference, arch, out, method, tile, border, limit, device) -> None:
    """Score a model on a paired set: PSNR/SSIM (RGB and Y) per image and mean, into eval.json.

    Prints a table shaped like the paper's (Params (M), PSNR, SSIM).
    """
    from distill.evaluate import evaluate_model, format_table, write_eval
    from distill.registry import load_model
    from shards.pairs import find_pairs

    device = _device(device)
    model, info = (None, {"name": "identity"}) if model_path == "identity" else load_model(model_path, arch=arch)
    if model is not None:
        model = model.to(device).eval()
    ref = load_model(reference)[0].to(device).eval() if reference else None
    result = evaluate_model(
        model, find_pairs(pairs), device=device, reference=ref, tile=tile, border=border, limit=limit
    )
    if out is None:
        out = Path(model_path).with_name("eval.json") if model is not None else Path("eval.json")
    write_eval(out, result, model=str(model_path), pairs=str(pairs), reference=str(reference or ""))
    label = method or info.get("name", Path(model_path).stem)
    click.echo(format_table([("RGB", label, result)]))
    click.echo(format_table([("Y", label, result)], y_channel=True).split("\n", 2)[2])
    if ref is not None:
        m = result["mean"]
        click.echo(f"against the reference: PSNR {m['ref_psnr']:.2f} dB, SSIM {m['ref_ssim']:.4f}")
    click.echo(f"{result['count']} images, {result['seconds_per_image']:.3f} s/image on {device}; wrote {out}")


# ------------------------------------------------------------------------------------------------- stage 1
@main.command()
@click.option("--degraded", type=existing, required=True, help="Web-collected degraded images (searched recursively).")
@click.option("--sd", default="tiny", show_default=True, help="The frozen SD whose UNet the prompts condition.")
@click.option("--out", type=path, required=True, help="Output folder, e.g. RUN/prompts.")
@click.option("--steps", type=int, help="Contrastive training steps.")
@click.option("--batch-size", type=int)
@click.option("--crop", type=int, help="Side of the query/positive crops.")
@click.option("--queue-size", type=int, help="K, the number of negative keys in the MoCo queue.")
@click.option("--prompt-tokens", type=int, help="L, tokens per prompt (77 matches SD's text length).")
@click.option("--embed-side", type=int, help="Side of the central square each image's prompt is computed from.")
@click.option("--lr", type=float)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint: ends with the same weights as one run.")
@preset_option
@device_option
@seed_option
def prompts(
    degraded, sd, out, steps, batch_size, crop, queue_size, prompt_tokens, embed_side, lr, resume, preset, device, seed
) -> None:
    """Stage 1: train the degradation-aware prompt adapter (MoCo, Eq. 3) and embed every degraded image.

    \b
    Writes to OUT: encoder.safetensors + encoder.json (the adapter), embeddings.safetensors (prompt_embeds
    [N, L, D] fp16, D = the UNet's cross_attention_dim), index.jsonl (row -> source path, sha256),
    train.jsonl (per-step losses) and a resumable checkpoint.
    """
    from pipelines.presets import merge
    from pipelines.presets import preset as get
    from synth.prompts import train_prompts

    cfg = merge(
        get(preset, "prompts"),
        steps=steps,
        batch_size=batch_size,
        crop=crop,
        queue_size=queue_size,
        prompt_tokens=prompt_tokens,
        embed_side=embed_side,
        lr=lr,
    )
    r = train_prompts(degraded, sd, out, seed=seed, resume=resume, device=_device(device), **cfg)
    click.echo(
        f"prompts: {r.num_images} images embedded ({r.counts}), final loss {r.final_loss}, "
        f"encoder {r.encoder_sha256[:12]}; wrote {r.out_dir}"
    )


@main.command()
@click.option("--encoder", type=existing, required=True, help="A prompts folder or encoder.safetensors.")
@click.option(
    "--images",
    type=existing,
    required=True,
    help="Held-out images, one sub-folder per degradation type (e.g. rain/, haze/, snow/).",
)
@click.option("--out", type=path, default=Path("probe.png"), show_default=True, help="The PCA plot PNG.")
@click.option("--crop", default=64, show_default=True)
@click.option("--json-out", type=path, help="Also write the probe result as JSON.")
@device_option
def probe(encoder, images, out, crop, json_out, device) -> None:
    """Show that the adapter's features see degradation: nearest-neighbour probe accuracy and a PCA plot."""
    import json

    from synth.probe import images_by_subfolder
    from synth.probe import probe as run_probe
    from synth.prompts import load_prompt_encoder

    device = _device(device)
    result = run_probe(
        load_prompt_encoder(encoder, device=device),
        images_by_subfolder(images),
        crop=crop,
        plot_path=out,
        device=device,
    )
    click.echo(f"nearest-neighbour accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}); plot {out}")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, default=str))


# ------------------------------------------------------------------------------------------------- stage 2
@main.command()
@click.option("--clean", type=existing, required=True, help="Web-collected clean images (any size).")
@click.option("--prompts", "prompts_dir", type=existing, help="Stage 1's folder (needed for --prompt-mode dpa).")
@click.option(
    "--sd",
    default="tiny",
    show_default=True,
    help="A diffusers folder, a .safetensors/.ckpt file, a hub id in the local cache, or `tiny`.",
)
@click.option("--out", type=path, required=True, help="Shard root, e.g. RUN/shards; the round goes to round-NNN.")
@click.option("--round", "round_", default=0, show_default=True, help="Round number (regenerations count up).")
@click.option("--num-samples", type=int, help="Images to synthesize.")
@click.option("--shard-size", type=int, help="Images per shard (the unit of work and of resume).")
@click.option("--batch-size", type=int, help="Images per UNet call.")
@click.option("--steps", type=int, help="T, DDIM steps of the full schedule (paper: 70).")
@click.option("--strength", type=float, help="lambda of Eq. (6): int(T*lambda) steps are run (paper: 0.5).")
@click.option("--size", type=int, help="Side of the synthesized images (paper: 256).")
@click.option("--guidance-scale", type=float, help="Classifier-free guidance; 1 disables it (paper).")
@click.option(
    "--z0",
    type=click.Choice(["ccd", "noise"]),
    default="ccd",
    show_default=True,
    help="Table 3: start from the noised clean latent (ccd) or from pure noise.",
)
@click.option(
    "--prompt-mode",
    type=click.Choice(["dpa", "none", "text", "content"]),
    default="dpa",
    show_default=True,
    help="Table 3: the adapter's prompts, none, a text prompt, or the adapter on the clean image.",
)
@click.option("--text", help="Text for --prompt-mode text (default: the task's preset text).")
@click.option("--task", type=click.Choice(["derain", "dehaze", "desnow"]), default="derain", show_default=True)
@click.option("--encoder", type=existing, help="Prompt encoder for --prompt-mode content (default: --prompts).")
@click.option("--scheduler", help="dask scheduler address: run the shards on that cluster.")
@click.option("--workers", type=int, help="Start a local dask cluster of N workers (one per GPU).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Default: float16 on GPU.")
@preset_option
@device_option
@seed_option
def synth(
    clean,
    prompts_dir,
    sd,
    out,
    round_,
    num_samples,
    shard_size,
    batch_size,
    steps,
    strength,
    size,
    guidance_scale,
    z0,
    prompt_mode,
    text,
    task,
    encoder,
    scheduler,
    workers,
    dtype,
    preset,
    device,
    seed,
):
    """Stage 2: content-driven conditional diffusion (Eq. 6-7) into WebDataset shards.

    \b
    Each clean photo is encoded by the frozen VAE, noised to step int(T*lambda), denoised by DDIM with the
    prompt embedding in place of the text encoder's output, and decoded. Writes OUT/round-NNN/:
      NNNNNN.tar          samples <key>.input.png (synthesized degraded image) + <key>.json (provenance)
      NNNNNN.stats.json   written last: a shard without it does not exist (reruns redo it, skip the rest)
      manifest.json       SD id and fingerprint, encoder hash, config;  sizes.json  images per shard
    """
    from pipelines.presets import TASK_TEXT, merge
    from pipelines.presets import preset as get
    from pipelines.runners import make_distributor
    from shards.reader import round_dir
    from synth.worker import SynthConfig, synthesize

    device = _device(device)
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    cfg = merge(
        get(preset, "synth"),
        num_samples=num_samples,
        shard_size=shard_size,
        batch_size=batch_size,
        steps=steps,
        strength=strength,
        size=size,
        guidance_scale=guidance_scale,
    )
    config = SynthConfig(**cfg, z0=z0, prompt_mode=prompt_mode, text=text or TASK_TEXT[task], seed=seed, round=round_)
    r = synthesize(
        clean,
        round_dir(out, round_),
        sd=sd,
        prompts_dir=prompts_dir,
        encoder=encoder or prompts_dir,
        config=config,
        device=device,
        dtype=dtype,
        distributor=make_distributor(scheduler, workers),
    )
    click.echo(
        f"synth: {r.shards} shards ({r.skipped} already done), {r.images} images written, "
        f"{r.failures} failures, {r.seconds:.1f} s; {r.out_dir}"
    )


@main.group("shards")
def shards_group() -> None:
    """Check and look at shard folders."""


@shards_group.command("verify")
@click.argument("directory", type=existing)
def shards_verify(directory: Path) -> None:
    """Name every missing, truncated, altered or unfinished shard in DIRECTORY (a round folder)."""
    from shards.verify import verify_shards

    problems = verify_shards(directory)
    for p in problems:
        click.echo(p)
    if problems:
        sys.exit(1)
    click.echo(f"{directory}: all shards verified")


@shards_group.command("show")
@click.argument("directory", type=existing)
@click.option("--out", type=path, help="Grid PNG (default: DIRECTORY/samples.png).")
@click.option("-n", "--num", default=8, show_default=True, help="Samples in the grid.")
def shards_show(directory: Path, out: Path | None, num: int) -> None:
    """Print counts and write a sample grid: clean source | prompt source | synthesized."""
    from pipelines.report import shard_grid
    from shards.writer import read_manifest

    manifest = read_manifest(directory)
    click.echo(
        f"{directory}: {manifest.get('images', '?')} images in {manifest.get('num_shards', '?')} shards, "
        f"sd {manifest.get('sd')}, round {manifest.get('config', {}).get('round')}"
    )
    path = shard_grid(directory, out or directory / "samples.png", num=num)
    click.echo(f"grid: {path}")


# ------------------------------------------------------------------------------------------------- stage 3
@main.command("distill")
@click.option("--run", type=path, required=True, help="Run folder: RUN/prompts and RUN/shards are read from it.")
@click.option("--teacher", type=existing, required=True, help="Teacher checkpoint (ours or an official .pth).")
@click.option(
    "--student",
    default="half",
    show_default=True,
    help="Registry name (`d4ir models`) or `half`: the teacher's architecture at half width.",
)
@click.option("--student-kwargs", callback=_kv, help="Student constructor overrides, e.g. n_feats=24,encoder_first=24.")
@click.option("--name", help="Student folder name under RUN/students (default: the student name).")
@click.option(
    "--data",
    type=click.Choice(["shards", "original", "web"]),
    default="shards",
    show_default=True,
    help="shards: D4IR; original: the teacher's own degraded inputs (paper's 'Data'); web: the web "
    "degraded images directly (M0).",
)
@click.option("--sd", default="tiny", show_default=True, help="The SD the shards must have been made with.")
@click.option("--degraded", type=existing, help="Web degraded images (L_cl and the feedback; --data web).")
@click.option("--clean", type=existing, help="Web clean images (the feedback surrogate).")
@click.option("--original", type=existing, help="The teacher's paired set (--data original: degraded side only).")
@click.option("--val", type=existing, help="Paired validation set (PSNR/SSIM vs ground truth and vs teacher).")
@click.option(
    "--round",
    "round_",
    type=int,
    help="Train on this existing round and regenerate nothing (reuse shards for another student).",
)
@click.option("--epochs", type=int)
@click.option("--joint-epochs", type=int, help="Epochs of the joint phase (L_kd + gamma L_cl, encoder trained).")
@click.option("--regen-every", type=int, help="Regenerate the shards every R epochs of the joint phase; 0: never.")
@click.option("--iters-per-epoch", type=int)
@click.option("--batch-size", type=int)
@click.option("--crop", type=int)
@click.option("--lr", type=float)
@click.option("--encoder-lr", type=float)
@click.option("--gamma", type=float, help="Weight of L_cl in the joint phase (Eq. 9).")
@click.option("--loss", help="KD terms with weights, e.g. l2 (Eq. 8, default) or l1=1,ssim=0.1.")
@click.option("--feedback-batch", type=int, help="Images per step through the differentiable surrogate.")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader workers decoding shards.")
@click.option("--scheduler", help="dask scheduler address for regeneration rounds.")
@click.option("--workers", type=int, help="Local dask cluster of N workers for regeneration rounds.")
@click.option("--resume", is_flag=True, help="Continue after the last finished epoch.")
@preset_option
@device_option
@seed_option
def distill_cmd(
    run,
    teacher,
    student,
    student_kwargs,
    name,
    data,
    sd,
    degraded,
    clean,
    original,
    val,
    round_,
    epochs,
    joint_epochs,
    regen_every,
    iters_per_epoch,
    batch_size,
    crop,
    lr,
    encoder_lr,
    gamma,
    loss,
    feedback_batch,
    num_workers,
    scheduler,
    workers,
    resume,
    preset,
    device,
    seed,
) -> None:
    """Stage 3: distil a student from the teacher on the synthesized shards (Eq. 8), with the joint phase
    (Eq. 9) and regeneration rounds that close the prompt-encoder feedback loop.

    \b
    Writes RUN/students/NAME/: student.safetensors + student.json, encoder.safetensors (the KD-updated
    prompt encoder), train.jsonl, state.pt (resume), eval.json (with --val), config.json.
    Regeneration rounds go to RUN/prompts/rounds/round-NNN and RUN/shards/round-NNN.
    """
    from distill.losses import parse_weights
    from distill.trainer import DistillConfig
    from distill.trainer import distill as run_distill
    from pipelines.presets import merge
    from pipelines.presets import preset as get
    from pipelines.runners import make_distributor

    cfg = merge(
        get(preset, "distill"),
        epochs=epochs,
        joint_epochs=joint_epochs,
        regen_every=regen_every,
        iters_per_epoch=iters_per_epoch,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        encoder_lr=encoder_lr,
        gamma=gamma,
        feedback_batch=feedback_batch,
    )
    config = DistillConfig(
        student=student,
        student_kwargs=student_kwargs,
        data=data,
        round=round_,
        seed=seed,
        loss=parse_weights(loss),
        num_workers=num_workers,
        **cfg,
    )
    if data == "shards" and round_ is None and config.joint_epochs and (degraded is None or clean is None):
        raise click.UsageError("the joint phase needs --degraded and --clean (web folders); or pass --round N")
    result = run_distill(
        run,
        teacher,
        config,
        sd=sd,
        degraded_dir=degraded,
        clean_dir=clean,
        original_dir=original,
        val_dir=val,
        name=name,
        resume=resume,
        device=_device(device),
        distributor=make_distributor(scheduler, workers),
    )
    click.echo(
        "distill: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
    )


# ------------------------------------------------------------------------------------------------- whole runs
@main.command()
@click.argument("run", type=existing)
@click.option("--test", type=existing, help="Paired test set for the restoration grid (default: from eval.json).")
def report(run: Path, test: Path | None) -> None:
    """Build RUN/report.md from the eval.json files of a run (tables), with sample grids and curves."""
    from pipelines.report import build_report

    click.echo(f"report: {build_report(run, test)}")


@main.command()
@click.option("--data", type=path, default=Path("data/demo"), show_default=True, help="Demo data folder.")
@click.option("--run", type=path, default=Path("runs/demo"), show_default=True, help="Run folder.")
@click.option("--task", type=click.Choice(["derain", "dehaze", "desnow"]), default="derain", show_default=True)
@device_option
@seed_option
def demo(data: Path, run: Path, task: str, device: str | None, seed: int) -> None:
    """The whole pipeline on the embedded demo data, offline, on the CPU, in minutes.

    demo data -> teacher -> prompts -> synth -> distill (D4IR with regeneration rounds) -> the paper's
    baselines (Student, Data, M0) -> eval -> RUN/report.md. A rerun resumes: finished steps are skipped.
    """
    from pipelines.demo import run_demo

    run_demo(data, run, task=task, seed=seed, device=device or "cpu")


if __name__ == "__main__":
    main()
