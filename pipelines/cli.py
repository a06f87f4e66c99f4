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
@click.option(
    "--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, help="Skip images with more pixels."
)
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


if __name__ == "__main__":
    main()
