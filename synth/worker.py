"""Stage 2: plan the shards of a round and synthesize them, one shard per job.

A shard is a pure function of its job: the clean photos, the prompt rows and the per-sample seeds are all
drawn up front from the run seed (`plan_jobs`), and every sample's noise comes from its own generator. A
shard whose stats file exists is done and skipped, so a killed run resumes where it stopped and a rerun
writes byte-equal shards. Jobs are handed to a *distributor* (`local_distributor` here; the dask one lives in
`pipelines/runners.py`); every distributor has the same signature, see `Distributor`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from shards.embeddings import load_embeddings
from shards.images import encode_png, read_rgb, scan_images
from shards.io import OutputFolderError, sha256_file
from shards.writer import check_manifest, shard_done, write_manifest, write_shard, write_sizes

from .ccd import CCDConfig, ccd_sample, prepare_clean
from .sd import SDParts, load_sd

PROMPT_MODES = ("dpa", "none", "text", "content")
# Built-in SD specs that have no text encoder: prompt_mode "text" on them is refused before any shard starts.
_NO_TEXT_ENCODER = ("tiny", "sd15-layout")


@dataclass(frozen=True)
class SynthConfig:
    """Everything that decides the pixels of a round (hashed into the manifest).

    Args:
        num_samples: images in the round.
        shard_size: images per shard (the unit of work and of resume).
        batch_size: images per UNet call.
        steps, strength, size, guidance_scale, z0: the CCD sampler's settings (paper: 70, 0.5, 256, 1, "ccd").
        prompt_mode: "dpa" (the adapter's embeddings), "none", "text" or "content" (Table 3 switches).
        text: the text prompt for prompt_mode "text".
        seed: draws the (clean photo, prompt row) pairs and every sample's noise seed.
        round: the regeneration round this config writes.
    """

    num_samples: int = 64
    shard_size: int = 16
    batch_size: int = 8
    steps: int = 70
    strength: float = 0.5
    size: int = 256
    guidance_scale: float = 1.0
    z0: str = "ccd"
    prompt_mode: str = "dpa"
    text: str = "a photo taken in the rain"
    seed: int = 0
    round: int = 0

    def ccd(self) -> CCDConfig:
        return CCDConfig(
            steps=self.steps, strength=self.strength, size=self.size, guidance_scale=self.guidance_scale, z0=self.z0
        )


@dataclass(frozen=True)
class ShardJob:
    """One shard's work; picklable so that dask can ship it to a worker."""

    index: int
    out_dir: str
    sd: str
    prompts_dir: str | None
    encoder: str | None  # encoder weights, for prompt_mode "content"
    config: SynthConfig
    items: tuple[tuple[str, str, int, int], ...]  # (key, clean path, prompt row, sample seed)
    device: str = "cpu"
    dtype: str = "float32"
    hashes: dict = field(default_factory=dict)
    # torch's intra-op CPU threads for this job (0: leave the process's setting). CPU float sums depend on
    # the thread count (about 1 value in 5000 moves by one grey level), so the run's count travels with the
    # job and a dask worker (started with 1 thread) writes the same bytes as the local run.
    threads: int = 0


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


def plan_jobs(
    clean_paths: Sequence[Path],
    num_prompts: int,
    config: SynthConfig,
    *,
    out_dir: Path,
    sd: str,
    prompts_dir: Path | None,
    encoder: Path | None,
    device: str = "cpu",
    dtype: str = "float32",
    hashes: dict | None = None,
) -> list[ShardJob]:
    """Draw the (clean photo, prompt row, noise seed) of every sample with the seed and cut them into shards."""
    if not clean_paths:
        raise ValueError("no usable clean image to synthesize from")
    rng = np.random.default_rng([config.seed, 0xD41])
    clean_idx = rng.integers(0, len(clean_paths), config.num_samples)
    prompt_idx = rng.integers(0, max(num_prompts, 1), config.num_samples)
    noise_seeds = rng.integers(0, 2**31 - 1, config.num_samples)
    jobs = []
    for start in range(0, config.num_samples, config.shard_size):
        stop = min(start + config.shard_size, config.num_samples)
        items = tuple(
            (f"r{config.round:03d}-{i:07d}", str(clean_paths[clean_idx[i]]), int(prompt_idx[i]), int(noise_seeds[i]))
            for i in range(start, stop)
        )
        jobs.append(
            ShardJob(
                start // config.shard_size,
                str(out_dir),
                sd,
                str(prompts_dir) if prompts_dir else None,
                str(encoder) if encoder else None,
                config,
                items,
                device,
                dtype,
                dict(hashes or {}),
            )
        )
    return jobs


_SD_CACHE: dict[tuple, SDParts] = {}


def cached_sd(spec: str, device: str, dtype: str) -> SDParts:
    """Load the frozen SD once per process (a dask worker keeps it across all its shards)."""
    key = (spec, device, dtype)
    if key not in _SD_CACHE:
        _SD_CACHE.clear()  # one model per worker: free the previous one first
        _SD_CACHE[key] = load_sd(spec, device=device, dtype=getattr(torch, dtype))
    return _SD_CACHE[key]


def _prompt_source(job: ShardJob, parts: SDParts) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """Returns f(prompt rows, clean batch [B,3,S,S]) -> prompt_embeds [B,L,D] for the job's prompt mode."""
    cfg, device = job.config, torch.device(job.device)
    dtype = getattr(torch, job.dtype)
    if cfg.prompt_mode == "dpa":
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
    if cfg.prompt_mode == "content":
        from .prompts import load_prompt_encoder

        if job.encoder is None:
            raise ValueError("prompt_mode 'content' needs the prompt encoder (--encoder)")
        enc = load_prompt_encoder(job.encoder).to(device).eval()
        return lambda rows, clean: enc.prompt(clean.float()).to(dtype)
    raise ValueError(f"unknown prompt_mode {cfg.prompt_mode!r}; choose from {PROMPT_MODES}")


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
    parts = cached_sd(job.sd, job.device, job.dtype)
    prompts_for = _prompt_source(job, parts)
    cfg, ccd = job.config, job.config.ccd()
    device = torch.device(job.device)

    def samples():
        for start in range(0, len(job.items), cfg.batch_size):
            batch, images = [], []
            for key, path, row, seed in job.items[start : start + cfg.batch_size]:
                try:
                    images.append(prepare_clean(read_rgb(path), cfg.size))
                    batch.append((key, path, row, seed))
                except Exception as err:  # noqa: BLE001 - counted in the shard's failures
                    yield {"__key__": key, "__error__": f"{type(err).__name__}: {err}"}
            if not batch:
                continue
            clean = torch.stack(images).to(device, getattr(torch, job.dtype))
            rows = [b[2] for b in batch]
            gens = [torch.Generator(device=device).manual_seed(b[3]) for b in batch]
            out = ccd_sample(parts, clean, prompts_for(rows, clean), gens, ccd)
            out = out.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for (key, path, row, seed), img in zip(batch, out):
                meta = {
                    "clean": path,
                    "prompt_row": row,
                    "seed": seed,
                    "lambda": cfg.strength,
                    "steps": cfg.steps,
                    "round": cfg.round,
                    "prompt_mode": cfg.prompt_mode,
                    "z0": cfg.z0,
                    **job.hashes,
                }
                yield {"__key__": key, "input.png": encode_png(np.ascontiguousarray(img)), "json": meta}

    return write_shard(Path(job.out_dir), job.index, samples(), extra_stats={"seconds": time.perf_counter() - t0})


def config_hash(config: SynthConfig) -> str:
    return hashlib.sha256(repr(sorted(asdict(config).items())).encode()).hexdigest()[:16]


def plan_hash(jobs: Sequence[ShardJob]) -> str:
    """Hash of every sample's (key, clean path, prompt row, seed): a resumed round must keep its plan, or
    its finished shards would be mixed with shards of another draw (e.g. after the clean folder changed)."""
    h = hashlib.sha256()
    for job in jobs:
        h.update(repr((job.index, job.items)).encode())
    return h.hexdigest()[:16]


@dataclass
class SynthResult:
    out_dir: Path
    shards: int
    skipped: int
    images: int
    failures: int
    seconds: float


def synthesize(
    clean_dir: Path,
    out_dir: Path,
    *,
    sd: str = "tiny",
    prompts_dir: Path | None = None,
    encoder: Path | None = None,
    config: SynthConfig = SynthConfig(),
    device: str = "cpu",
    dtype: str = "float32",
    distributor: Distributor | None = None,
    progress: bool = True,
) -> SynthResult:
    """Stage 2 entry: write the shards of one round into `out_dir` (finished shards are skipped).

    Args:
        clean_dir: web-collected clean photos (any size: see `prepare_clean` for the crop rule).
        out_dir: the round folder, e.g. RUN/shards/round-000.
        sd: the frozen SD (`load_sd` spec); prompts_dir: stage 1's output (prompt_mode "dpa").
        encoder: the prompt encoder (prompt_mode "content"); config: see `SynthConfig`.
        distributor: runs the shard jobs; `local_distributor` when None.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if config.prompt_mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt_mode {config.prompt_mode!r}; choose from {PROMPT_MODES}")
    # Settings errors are raised here, once, instead of failing (and being retried) in every shard job.
    if config.prompt_mode == "text" and sd in _NO_TEXT_ENCODER:
        raise ValueError(f"prompt_mode 'text' needs an SD with a text encoder; the {sd!r} model has none")
    if config.prompt_mode == "content" and encoder is None:
        raise ValueError("prompt_mode 'content' needs the prompt encoder (--encoder)")
    config.ccd()  # CCDConfig validates steps, strength, size, z0
    scan = scan_images(clean_dir, min_side=32)
    hashes: dict = {"sd": sd}
    num_prompts = 1
    if config.prompt_mode == "dpa":
        if prompts_dir is None:
            raise ValueError("prompt_mode 'dpa' needs --prompts (the folder `d4ir prompts` wrote)")
        emb = load_embeddings(prompts_dir)
        num_prompts = emb.prompt_embeds.shape[0]
        hashes["encoder_sha256"] = emb.metadata.get("encoder_sha256", "")
        hashes["sd_fingerprint"] = emb.metadata.get("sd_fingerprint", "")
    if encoder is not None and config.prompt_mode == "content":
        encoder = Path(encoder)
        encoder = encoder / "encoder.safetensors" if encoder.is_dir() else encoder.with_suffix(".safetensors")
        if not encoder.is_file():
            raise FileNotFoundError(f"no prompt encoder at {encoder} (prompt_mode 'content')")
        hashes["encoder_file_sha256"] = sha256_file(encoder)
    jobs = plan_jobs(
        scan.paths,
        num_prompts,
        config,
        out_dir=out_dir,
        sd=sd,
        prompts_dir=prompts_dir,
        encoder=encoder,
        device=device,
        dtype=dtype,
        hashes=hashes,
    )
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 0
    manifest = {
        "sd": sd,
        "config": asdict(config),
        "config_hash": config_hash(config),
        "plan_hash": plan_hash(jobs),
        "num_shards": len(jobs),
        "clean_dir": str(clean_dir),
        "prompts_dir": str(prompts_dir) if prompts_dir else None,
        "clean_scan": scan.counts(),
        **hashes,
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(err.errno, f"cannot create the output folder {out_dir}: {err.strerror}") from err
    if (out_dir / "manifest.json").exists():
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


def with_round(config: SynthConfig, round_: int) -> SynthConfig:
    return replace(config, round=round_)
