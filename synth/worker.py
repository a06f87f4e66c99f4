"""Stage 2 (`d4ir synth`): synthesize the shards of one round, one shard per job.

A shard whose stats file exists is done and skipped, so a killed run resumes where it stopped. Jobs are
handed to a *distributor* (`local_distributor` here; the dask one lives in `pipelines/runners.py`); every
distributor has the same signature, see `Distributor`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from shards.embeddings import load_embeddings
from shards.images import encode_png, read_rgb, scan_images
from shards.io import OutputFolderError, sha256_file
from shards.layout import MANIFEST_FILE, round_dir
from shards.writer import (
    DEGRADED_FIELD,
    SHARD_FORMAT,
    check_manifest,
    shard_done,
    write_manifest,
    write_shard,
    write_sizes,
)

from .ccd import ccd_sample, prepare_clean
from .embed import load_prompt_encoder, prompt_encoder_file
from .plan import ShardJob, SynthConfig, config_hash, plan_hash, plan_jobs
from .sd import default_dtype, load_sd_cached
from .sd_parts import SDParts

# Built-in SD specs that have no text encoder: prompt mode "text" on them is refused before any shard starts.
_NO_TEXT_ENCODER = ("tiny", "sd15-layout")

Distributor = Callable[[Callable[[ShardJob], dict], Sequence[ShardJob], Callable[[ShardJob, dict], None]], None]


def local_distributor(
    fn: Callable[[ShardJob], dict],
    jobs: Sequence[ShardJob],
    on_done: Callable[[ShardJob, dict], None],
    retries: int = 2,
) -> None:
    """Run jobs one after another in this process; a failing shard is retried, then re-raised (never lost).

    An `OutputFolderError` (unwritable or full folder) is raised at once and as it is: retrying cannot help.
    """
    for job in jobs:
        for attempt in range(retries + 1):
            try:
                on_done(job, fn(job))
                break
            except OutputFolderError:
                raise
            except Exception as err:  # noqa: BLE001 - retried, then surfaced with the shard named
                if attempt == retries:
                    raise RuntimeError(f"shard {job.index} failed after {retries + 1} attempts: {err}") from err


def _prompt_source(job: ShardJob, parts: SDParts) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """Returns f(prompt rows, clean batch [B,3,S,S]) -> prompt_embeds [B,L,D] for the job's prompt mode."""
    cfg, device = job.config, torch.device(job.device)
    dtype = getattr(torch, job.dtype)
    if cfg.prompt_mode == "encoder":
        table = load_embeddings(job.prompts_dir).prompt_embeds
        return lambda rows, clean: table[rows].to(device, dtype)
    if cfg.prompt_mode == "text":
        emb = parts.encode_text([cfg.text]).to(device, dtype)
        return lambda rows, clean: emb.expand(len(rows), -1, -1)
    if cfg.prompt_mode == "none":
        empty = parts.empty_prompt()
        emb = empty if empty is not None else torch.zeros(1, 1, parts.cross_attention_dim)
        emb = emb.to(device, dtype)
        return lambda rows, clean: emb.expand(len(rows), -1, -1)
    enc = load_prompt_encoder(job.prompts_dir).to(device).eval()  # "content": the encoder on the clean photo
    return lambda rows, clean: enc.prompt(clean.float()).to(dtype)


def synthesize_shard(job: ShardJob) -> dict:
    """Synthesize one shard and write it (tar, then stats last); returns the stats."""
    previous = torch.get_num_threads()
    if job.threads and job.threads != previous:
        torch.set_num_threads(job.threads)
    try:
        return _synthesize_shard(job)
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _synthesize_shard(job: ShardJob) -> dict:
    t0 = time.perf_counter()
    parts = load_sd_cached(job.sd_spec, job.device, job.dtype)
    prompts_for = _prompt_source(job, parts)
    cfg = job.config
    device = torch.device(job.device)

    def samples():
        for start in range(0, len(job.items), cfg.batch_size):
            batch, images = [], []
            for key, path, row, seed in job.items[start : start + cfg.batch_size]:
                try:
                    images.append(prepare_clean(read_rgb(path), cfg.ccd.size))
                    batch.append((key, path, row, seed))
                except Exception as err:  # noqa: BLE001 - counted in the shard's failures
                    yield {"__key__": key, "__error__": f"{type(err).__name__}: {err}"}
            if not batch:
                continue
            clean = torch.stack(images).to(device, getattr(torch, job.dtype))
            rows = [b[2] for b in batch]
            gens = [torch.Generator(device=device).manual_seed(b[3]) for b in batch]
            out = ccd_sample(parts, clean, prompts_for(rows, clean), gens, cfg.ccd)
            out = out.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for (key, path, row, seed), img in zip(batch, out):
                meta = {
                    "clean": path,
                    "prompt_row": row,
                    "seed": seed,
                    "lambda": cfg.ccd.strength,
                    "steps": cfg.ccd.steps,
                    "round": cfg.round,
                    "prompt_mode": cfg.prompt_mode,
                    "z0": cfg.ccd.z0,
                    **job.hashes,
                }
                yield {"__key__": key, DEGRADED_FIELD: encode_png(np.ascontiguousarray(img)), "json": meta}

    stats = {"seconds": time.perf_counter() - t0}
    return write_shard(Path(job.round_dir), job.index, samples(), extra_stats=stats)


@dataclass
class SynthResult:
    round_dir: Path
    shards: int
    skipped: int  # shards already finished by an earlier run
    images: int
    failures: int
    seconds: float


def _provenance(config: SynthConfig, sd_spec: str, prompts_dir: Path | None) -> tuple[int, dict]:
    """(number of prompt rows, hashes recorded in the manifest and every sample) for the prompt mode."""
    hashes: dict = {"sd": sd_spec}
    if config.prompt_mode not in ("encoder", "content"):
        return 1, hashes
    if prompts_dir is None:
        raise ValueError(f"prompt mode {config.prompt_mode!r} needs the prompts folder of `d4ir prompts`")
    if config.prompt_mode == "content":
        hashes["prompt_encoder_file_sha256"] = sha256_file(prompt_encoder_file(prompts_dir))
        return 1, hashes
    emb = load_embeddings(prompts_dir)
    hashes["encoder_sha256"] = emb.metadata.get("encoder_sha256", "")
    hashes["sd_fingerprint"] = emb.metadata.get("sd_fingerprint", "")
    return emb.prompt_embeds.shape[0], hashes


def synthesize(
    clean_dir: Path,
    shards_root: Path,
    config: SynthConfig,
    *,
    sd_spec: str = "tiny",
    prompts_dir: Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    distributor: Distributor | None = None,
    progress: bool = True,
) -> SynthResult:
    """Stage 2: write the shards of round `config.round` into shards_root/round-NNN (finished ones are skipped).

    Args:
        clean_dir: web-collected clean photos (any size: see `prepare_clean` for the crop rule).
        shards_root: RUN/shards, or a student's shards root for its regeneration rounds.
        config: see `SynthConfig`.
        sd_spec: the frozen SD (`load_sd` spec).
        prompts_dir: stage 1's folder (prompt modes encoder and content).
        device, dtype: where the SD runs and its weights' dtype (default: float16 on a GPU, else float32).
        distributor: runs the shard jobs; `local_distributor` when None.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    dtype = dtype or default_dtype(device)
    out_dir = round_dir(shards_root, config.round)
    # Settings errors are raised here, once, instead of failing (and being retried) in every shard job.
    if config.prompt_mode == "text" and sd_spec in _NO_TEXT_ENCODER:
        raise ValueError(f"prompt mode 'text' needs an SD with a text encoder; the {sd_spec!r} model has none")
    scan = scan_images(clean_dir, min_side=32)
    num_prompts, hashes = _provenance(config, sd_spec, prompts_dir)
    jobs = plan_jobs(scan.paths, num_prompts, config, round_dir=out_dir, sd_spec=sd_spec, prompts_dir=prompts_dir,
                     device=device, dtype=dtype, hashes=hashes)
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 0
    manifest = {
        "format_version": SHARD_FORMAT,
        "sd": sd_spec,
        "dtype": dtype,
        "config": asdict(config),
        "config_hash": config_hash(config),
        "plan_hash": plan_hash(jobs),
        "num_shards": len(jobs),
        "clean_dir": str(Path(clean_dir).resolve()),
        "prompts_dir": str(Path(prompts_dir).resolve()) if prompts_dir else None,
        "clean_scan": scan.counts(),
        **hashes,
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(err.errno, f"cannot create the output folder {out_dir}: {err.strerror}") from err
    if (out_dir / MANIFEST_FILE).exists():
        # resuming: the shards already there must come from the same model, prompts and config
        old = check_manifest(out_dir, {k: manifest[k] for k in ("sd", "config_hash", "plan_hash", *hashes)})
        # A resumed CPU round keeps the thread count its first shards were computed with (see ShardJob.threads).
        threads = int(old.get("cpu_threads") or threads) if threads else 0
    jobs = [replace(j, threads=threads) for j in jobs]
    manifest["cpu_threads"] = threads
    write_manifest(out_dir, manifest | {"complete": False})
    todo = [j for j in jobs if not shard_done(out_dir, j.index)]
    bar = tqdm(total=config.num_samples, desc=f"synth {out_dir.name}", unit="img", disable=not progress)
    bar.update(config.num_samples - sum(len(j.items) for j in todo))
    totals = {"images": 0, "failures": 0}

    def on_done(job: ShardJob, stats: dict) -> None:
        totals["images"] += stats.get("count", 0)
        totals["failures"] += len(stats.get("failures", []))
        bar.update(len(job.items))

    (distributor or local_distributor)(synthesize_shard, todo, on_done)
    bar.close()
    sizes = write_sizes(out_dir)
    write_manifest(out_dir, manifest | {"complete": True, "images": sum(sizes.values())})
    return SynthResult(
        out_dir, len(jobs), len(jobs) - len(todo), totals["images"], totals["failures"], time.perf_counter() - t0
    )
