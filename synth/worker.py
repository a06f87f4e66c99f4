"""Stage 2 (`d4ir synth`): synthesize the shards of one round, one shard per job.

A shard whose stats file exists and whose tar matches it (size, sha256, planned count: `shard_done`) is done and
skipped, so a killed run resumes where it stopped and a damaged shard is redone. Jobs are handed to a
*distributor* (`local_distributor` here; the dask one lives in `pipelines/runners.py`); every distributor has the
same signature, see `Distributor`, and retries a failing shard, passing the earlier errors on (`ShardJob.retried`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from d4ir.shards.embeddings import load_embeddings
from d4ir.shards.errors import StageFailedError
from d4ir.shards.folders import check_files, file_records, scan_images
from d4ir.shards.images import encode_png, read_rgb
from d4ir.shards.io import OutputFolderError, folder_lock
from d4ir.shards.layout import (
    EMBEDDINGS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    PROMPT_ENCODER_STEM,
    parse_shard,
    parse_stats,
    round_dir,
    shard_name,
    weights_file,
)
from d4ir.shards.reader import iter_raw_metas, iter_samples
from d4ir.shards.records import PlannedSample, RoundManifest, ShardStats
from d4ir.shards.tracking import track_images, tracking_dir
from d4ir.shards.writer import (
    DEGRADED_FIELD,
    check_manifest,
    read_manifest,
    shard_done,
    write_manifest,
    write_shard,
    write_sizes,
)

from .ccd import ccd_sample, prepare_clean
from .embed import load_prompt_encoder
from .inputs import check_inputs, check_sd
from .plan import ShardJob, SynthConfig, config_hash, plan_hash, plan_jobs
from .sd import SDSource, default_dtype, load_sd_cached
from .sd_parts import SDParts

Distributor = Callable[[Callable[[ShardJob], ShardStats], Sequence[ShardJob],
                        Callable[[ShardJob, ShardStats], None]], None]


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
                    raise StageFailedError(f"shard {job.index} failed after {retries + 1} attempts: {err}") from err
                job = replace(job, retried=(*job.retried, attempt_error(err)))  # the next attempt records it


def attempt_error(err: BaseException) -> str:
    """How a failed attempt is recorded in its shard's stats (`retries`): the exception's type and first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


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


def check_job_files(job: ShardJob) -> None:
    """Every file the job reads, and its round folder (made by `synthesize`), exist where it runs (a dask worker may
    be another host, without the run's filesystem): a FileNotFoundError naming the host, before anything is loaded
    or written. A clean photo missing among others that are there stays a counted failure of its sample."""
    host = socket.gethostname()
    if not Path(job.round_dir).is_dir():
        raise FileNotFoundError(f"on host {host}: the round folder {job.round_dir} does not exist (the workers need "
                                "the run folder at the same path, e.g. on a shared filesystem)")
    prompts, reads = Path(job.prompts_dir) if job.prompts_dir else None, []
    if prompts is not None and job.config.prompt_mode == "encoder":
        reads.append(prompts if prompts.is_file() else prompts / EMBEDDINGS_FILE)
    if prompts is not None and job.config.prompt_mode == "content":
        reads.append(weights_file(prompts, PROMPT_ENCODER_STEM))
    sd_paths = [Path(v) for v in (job.sd_source.spec, job.sd_source.config) if v and Path(v).is_absolute()]
    missing = [str(p) for p in reads if not p.is_file()] + [str(p) for p in sd_paths if not p.exists()]
    photos = sorted({s.clean for s in job.items if not os.path.isfile(s.clean)})
    if photos and len(photos) == len({s.clean for s in job.items}):
        missing += photos  # none there: not this host's filesystem (one photo gone is a counted sample failure)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"on host {host}: shard {job.index} reads {len(missing)} missing file(s): {shown} "
                                "(the workers need the SD, the prompts and the clean photos at the same paths)")


def synthesize_shard(job: ShardJob) -> ShardStats:
    """Synthesize one shard and write it (tar, then stats last); returns the stats."""
    check_job_files(job)
    previous = torch.get_num_threads()
    if job.threads and job.threads != previous:
        torch.set_num_threads(job.threads)
    try:
        return _synthesize_shard(job)
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _sampled(job: ShardJob, parts: SDParts) -> Iterator[tuple[list[dict], list[PlannedSample], np.ndarray]]:
    """Per batch of the job: (failed-sample records, the batch's items, synthesized images [b,S,S,3] uint8)."""
    cfg, device = job.config, torch.device(job.device)
    prompts_for = _prompt_source(job, parts)
    for start in range(0, len(job.items), cfg.batch_size):
        failed, batch, images = [], [], []
        for item in job.items[start : start + cfg.batch_size]:
            try:
                images.append(prepare_clean(read_rgb(item.clean), cfg.ccd.size))
                batch.append(item)
            except Exception as err:  # noqa: BLE001 - counted in the shard's failures
                failed.append({"__key__": item.key, "__error__": f"{type(err).__name__}: {err}"})
        if not batch:
            yield failed, [], np.zeros((0, cfg.ccd.size, cfg.ccd.size, 3), np.uint8)
            continue
        clean = torch.stack(images).to(device, getattr(torch, job.dtype))
        gens = [torch.Generator(device=device).manual_seed(b.seed) for b in batch]
        out = ccd_sample(parts, clean, prompts_for([b.prompt_row for b in batch], clean), gens, cfg.ccd)
        yield failed, batch, out.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _synthesize_shard(job: ShardJob) -> ShardStats:
    """The shard's samples in plan order. With `job.encode_threads`, batch k's PNGs are encoded in threads
    (zlib releases the GIL) while batch k+1 is sampled, so the device does not wait on the encoder; the bytes
    and their order are the same either way."""
    t0 = time.perf_counter()
    parts = load_sd_cached(job.sd_source, job.device, job.dtype)
    cfg = job.config

    def record(item: PlannedSample, png: bytes) -> dict:
        meta = {"clean": item.clean, "prompt_row": item.prompt_row, "seed": item.seed, "lambda": cfg.ccd.strength,
                "steps": cfg.ccd.steps, "round": cfg.round, "prompt_mode": cfg.prompt_mode, "z0": cfg.ccd.z0,
                **job.provenance}
        return {"__key__": item.key, DEGRADED_FIELD: png, "json": meta}

    def samples() -> Iterator[dict]:
        pool = ThreadPoolExecutor(job.encode_threads) if job.encode_threads else None
        previous = None
        try:
            for failed, batch, out in _sampled(job, parts):
                images = [np.ascontiguousarray(img) for img in out]
                pngs = [pool.submit(encode_png, img) for img in images] if pool else [encode_png(i) for i in images]
                if previous is not None:
                    yield from _emit(*previous, record)
                previous = (failed, batch, pngs)
            if previous is not None:
                yield from _emit(*previous, record)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    return write_shard(Path(job.round_dir), job.index, samples(),
                       extra_stats=lambda: {"seconds": time.perf_counter() - t0, "retries": list(job.retried)})


def _track_samples(out_dir: Path, number: int, count: int = 4) -> None:
    """The round's first samples as a TensorBoard image grid (with --tensorboard: shards/tracking.py)."""
    if tracking_dir() is None:
        return
    images = [s["degraded"] for s, _ in zip(iter_samples(out_dir), range(count))]
    track_images(out_dir.parent, f"samples/{out_dir.name}", images, number)


def _emit(failed: list[dict], batch: list[tuple], pngs: list, record) -> Iterator[dict]:
    yield from failed
    for item, png in zip(batch, pngs):
        yield record(item, png.result() if isinstance(png, Future) else png)


@dataclass
class SynthResult:
    round_dir: Path
    shards: int
    already_done: int  # shards an earlier run had finished (not redone)
    images: int
    failures: int
    seconds: float
    retried: int = 0  # shards written by this run that needed more than one attempt (their stats say why)
    clean: str = ""  # the clean photos used and skipped ("8 usable, skipped: 1 zero bytes")


def _adopt(out_dir: Path, manifest: RoundManifest, jobs: list[ShardJob], sd: SDParts, source: SDSource,
           threads: int) -> int:
    """Resume only what this plan made: shards there without a manifest, or a manifest or samples that disagree
    with this run's plan, are refused. Returns the CPU thread count the round's shards are computed with."""
    names = [p.name for p in out_dir.iterdir()]
    shards_there = any(parse_shard(n) is not None or parse_stats(n) is not None for n in names)
    if MANIFEST_FILE not in names:
        if shards_there:
            raise ValueError(f"{out_dir} holds shards but no {MANIFEST_FILE}: the plan that made them is unknown, "
                             "so they cannot be resumed; restore the manifest or delete the shards")
        return threads
    old = read_manifest(out_dir)  # a round of another format is refused: resuming would mix two formats
    check_sd(old, sd, source, out_dir)
    check_manifest(out_dir, {"config_hash": manifest.config_hash, "plan_hash": manifest.plan_hash,
                             **manifest.provenance.identity()})
    for job in jobs:  # each finished shard's samples are the ones its job plans
        if not shard_done(out_dir, job.index, len(job.items)):
            continue
        planned = {s.key: (s.clean, s.prompt_row, s.seed) for s in job.items}
        for key, meta in iter_raw_metas(out_dir, job.index):
            if planned.get(key) != (meta.get("clean"), meta.get("prompt_row"), meta.get("seed")):
                raise ValueError(f"{out_dir}: shard {job.index} sample {key} does not match the manifest's plan "
                                 "(made by another run?); delete the round or use another one")
    # A resumed CPU round keeps the thread count its first shards were computed with (see ShardJob.threads).
    return int(old.cpu_threads or threads) if threads else 0


def synthesize(
    clean_dir: Path,
    shards_root: Path,
    config: SynthConfig,
    *,
    sd_source: SDSource | str = "tiny",
    prompts_dir: Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    distributor: Distributor | None = None,
    progress: bool = True,
    clean_files: list | None = None,
) -> SynthResult:
    """Stage 2: write the shards of round `config.round` into shards_root/round-NNN (finished ones are skipped).

    Args:
        clean_dir: web-collected clean photos (any size: see `prepare_clean` for the crop rule).
        shards_root: RUN/shards, or a student's shards root for its regeneration rounds.
        config: see `SynthConfig`.
        sd_source: the frozen SD (`SDSource` or its spec); loaded here once to check the inputs.
        prompts_dir: stage 1's folder (prompt modes encoder and content).
        device, dtype: where the SD runs and its weights' dtype (default: float16 on a GPU, else float32).
        distributor: runs the shard jobs; `local_distributor` when None.
        clean_files: draw the plan from exactly these photos ([name, bytes, sha256] under clean_dir, as a
            manifest's `clean_files` records them: a regeneration round passes round 0's), each checked to be there
            unchanged, instead of from what clean_dir holds now.
    """
    from d4ir.shards.progress import progress_bar

    t0 = time.perf_counter()
    dtype = dtype or default_dtype(device)
    out_dir = round_dir(shards_root, config.round)
    source = SDSource.of(sd_source)
    # Settings errors are raised here, once, instead of failing (and being retried) in every shard job. A local
    # run loads the SD where its shards will use it (the cache keeps it); a cluster's parent only checks it.
    local = distributor is None or distributor is local_distributor
    sd = load_sd_cached(source, device if local else "cpu", dtype)
    inputs = check_inputs(config, sd=sd, source=source, prompts_dir=prompts_dir)
    # absolute, as the manifest records it: every round names a photo alike (a regeneration round reads the
    # manifest's clean_dir; round 0 from `--clean data/x` named it relatively, and no sample matched across rounds)
    clean_dir = Path(clean_dir).resolve()
    if clean_files is None:
        scan = scan_images(clean_dir, min_side=32)
        paths, clean_scan, clean_summary = scan.paths, scan.counts(), scan.summary()
        clean_files = file_records(clean_dir, paths)  # so that a later round can be drawn from exactly these
    else:
        paths = check_files(clean_dir, clean_files, "the clean photos this round's plan names",
                            "a round drawn from a recorded plan needs them as they were")
        clean_scan = {"usable": len(paths)}
        clean_summary = f"{len(paths)} usable (the recorded plan's)"
    jobs = plan_jobs(paths, inputs.num_prompts, config, round_dir=out_dir, sd_source=source, prompts_dir=prompts_dir,
                     device=device, dtype=dtype, provenance=inputs.provenance.to_json())
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 0
    manifest = RoundManifest(
        config=asdict(config), config_hash=config_hash(config), plan_hash=plan_hash(jobs),
        shards={shard_name(j.index): len(j.items) for j in jobs},  # samples planned per shard
        clean_dir=str(clean_dir), prompts_dir=str(Path(prompts_dir).resolve()) if prompts_dir else None,
        clean_scan=clean_scan, clean_files=clean_files, provenance=inputs.provenance, dtype=dtype)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(err.errno, f"cannot create the output folder {out_dir}: {err.strerror}") from err
    with folder_lock(out_dir / LOCK_FILE):
        threads = _adopt(out_dir, manifest, jobs, sd, source, threads)
        encode_threads = 4 if torch.device(device).type == "cuda" else 0  # on a CPU the cores are the sampler's
        jobs = [replace(j, threads=threads, encode_threads=encode_threads) for j in jobs]
        manifest = replace(manifest, cpu_threads=threads)
        write_manifest(out_dir, manifest)
        # a shard is done only with every planned sample accounted for: one cut short is redone
        todo = [j for j in jobs if not shard_done(out_dir, j.index, len(j.items))]
        bar = progress_bar(total=config.num_samples, desc=f"synth {out_dir.name}", unit="img", enabled=progress)
        bar.update(config.num_samples - sum(len(j.items) for j in todo))
        totals = {"images": 0, "failures": 0, "retried": 0}

        def on_done(job: ShardJob, stats: ShardStats) -> None:
            totals["images"] += stats.count
            totals["failures"] += len(stats.failures)
            totals["retried"] += bool(stats.extra.get("retries"))
            bar.update(len(job.items))

        (distributor or local_distributor)(synthesize_shard, todo, on_done)
        bar.close()
        unfinished = [j.index for j in jobs if not shard_done(out_dir, j.index, len(j.items))]
        if unfinished:  # a distributor that returned without every shard: the round stays incomplete
            raise StageFailedError(f"{out_dir}: shards {unfinished} did not finish; rerun to redo them")
        sizes = write_sizes(out_dir)
        write_manifest(out_dir, replace(manifest, complete=True, images=sum(sizes.values())))
    _track_samples(out_dir, config.round)
    return SynthResult(
        out_dir, len(jobs), len(jobs) - len(todo), totals["images"], totals["failures"], time.perf_counter() - t0,
        totals["retried"], clean_summary,
    )
