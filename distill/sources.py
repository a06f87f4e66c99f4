"""Where stage 3's batches come from: a shard round (D4IR), images in memory (the Data and M0 baselines) or a
generator trained against the student (DFSR, DFMC); `open_source` picks one from the config, and every source
gives `next(rng, device) -> [B, 3, crop, crop]` and `set_epoch(epoch)`. D4IR's feedback loop, which trains the
prompt encoder through the frozen SD, is not a batch source: `distill.feedback.open_loop` opens it.

A shard round is checked whole and streamed through webdataset and a DataLoader.

Before a round is used, every shard is checked against its stats (present, size, sha256, sample count) and the
manifest's plan (`shards.verify.verify_shards`): a damaged round is an error naming the shard, unless the caller
opts in to skipping damaged shards, which is warned about with the count and shrinks the epoch to what is
left. Samples are decoded (PNG -> uint8) in DataLoader workers; one that fails to decode is counted here, in the
training process, and reported per epoch. The trainer's seeded generator picks the random crop and flips, so a
CPU run repeats exactly for a given worker count. Shards are shuffled per epoch and split by rank and worker
(`shards.reader.shard_dataset`); a sample buffer mixes images across shards. When a round has fewer shards than
ranks x workers, the DataLoader workers are reduced (with a message) so that every worker has a shard.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from d4ir.shards.embeddings import load_embeddings
from d4ir.shards.errors import StageFailedError
from d4ir.shards.folders import ImageScan, scan_images
from d4ir.shards.images import read_rgb
from d4ir.shards.layout import EMBEDDINGS_FILE, RunLayout, parse_shard
from d4ir.shards.pairs import find_pairs
from d4ir.shards.reader import shard_dataset, shard_urls
from d4ir.shards.records import RoundManifest
from d4ir.shards.verify import Finding, verify_shards
from d4ir.shards.writer import check_manifest, read_manifest, read_stats
from torch.utils.data import DataLoader

from .config import DistillConfig
from .data import random_crop, to_batch
from .datafree import AdversarialSource
from .ddp import DistContext

log = logging.getLogger(__name__)


def _as_is(sample: dict) -> dict:
    return sample


def _damaged(problems: list[Finding]) -> tuple[set[str], list[Finding]]:
    """(shard names the problems are about, the problems about no shard: those no skip can mend)."""
    return {p.shard for p in problems if p.shard}, [p for p in problems if not p.shard]


def image_source(folder: Path) -> tuple[list[np.ndarray], ImageScan]:
    """Every usable image of a folder in memory (for the "original" and "web" baselines), and the scan that
    counted the rest; none usable is an error naming the folder and what was skipped."""
    scan = scan_images(folder, min_side=1)
    if not scan.paths:
        raise ValueError(f"{folder}: no usable image to train on ({scan.summary()})")
    return [read_rgb(p, min_side=1) for p in scan.paths], scan


class ShardBatches:
    """Endless batches of random crops from the finished shards of one round.

    Args:
        directory: the round folder (RUN/shards/round-NNN or a student's round).
        config: needs batch_size, crop, seed and num_workers (a `DistillConfig`).
        rank, world: this process's place in a torchrun job (shards are split between ranks).
        skip_damaged: drop damaged shards with a warning instead of refusing the round.
    """

    def __init__(self, directory: Path, config, *, rank: int = 0, world: int = 1, shuffle_buffer: int = 256,
                 skip_damaged: bool = False):
        self.directory = Path(directory)
        problems = verify_shards(self.directory)
        damaged, unmendable = _damaged(problems)
        if problems and (not skip_damaged or unmendable):
            raise ValueError(f"shard round {self.directory} is damaged: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                             + ("" if skip_damaged else "; rerun `d4ir synth` to redo it, or pass "
                                "--skip-damaged-shards to train on the rest"))
        urls = [u for u in shard_urls(self.directory) if Path(u).name not in damaged]
        if damaged:
            log.warning("skipping %d damaged shard(s) of %s: %s", len(damaged), self.directory, sorted(damaged))
        if len(urls) < world:
            raise ValueError(f"{len(urls)} usable shards in {self.directory} cannot feed {world} ranks: synthesize "
                             "more, smaller shards (--shard-size)")
        workers = config.num_workers
        if len(urls) < world * max(workers, 1):
            workers = max(len(urls) // world, 1) if workers else 0
            log.warning("%d shards for %d ranks x %d DataLoader workers: using %d workers per rank",
                        len(urls), world, config.num_workers, workers)
        self.skipped = sorted(damaged)
        self.total = sum(read_stats(self.directory, parse_shard(Path(u).name)).count for u in urls)
        self.batch_size, self.crop, self.world = config.batch_size, config.crop, world
        self.decode_errors = 0  # samples that failed to decode, counted in this process
        self.dataset = shard_dataset(urls, seed=config.seed, rank=rank, world_size=world, report_errors=True,
                                     shuffle_buffer=min(shuffle_buffer, max(self.total, 1)))
        # collate_fn keeps samples as they are (the default would turn the uint8 arrays into tensors)
        # the loader's own generator: its workers' seeds never come from the global RNG (see FeedbackLoop)
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                 persistent_workers=False, generator=torch.Generator().manual_seed(config.seed + rank))
        self._iter = None

    def iters_per_epoch(self) -> int:
        return max(1, math.ceil(self.total / (self.batch_size * self.world)))

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order for `epoch` and start a new pass."""
        self.dataset.set_epoch(epoch)
        self._iter = iter(self.loader)

    def _sample(self) -> np.ndarray:
        if self._iter is None:
            self._iter = iter(self.loader)
        for _ in range(2 + 1000):
            try:
                sample = next(self._iter)
            except StopIteration:
                self._iter = iter(self.loader)  # a new pass over this rank's shards
                continue
            if "error" in sample:
                self.decode_errors += 1
                log.warning("skipped an undecodable sample: %s", sample["error"])
                continue
            return sample["degraded"]
        raise StageFailedError(f"no readable sample in {self.directory} for this rank")

    def next(self, rng: np.random.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """A [B, 3, crop, crop] float batch in [0, 1] on `device` (moved there as uint8, a quarter of the
        bytes of float32, and converted on the device)."""
        crops = [random_crop(rng, self.crop, self._sample())[0] for _ in range(self.batch_size)]
        return to_batch(crops, device)


class ImageBatches:
    """Endless batches of random crops (with flips) from images held in memory: the baselines' web degraded
    photos (M0) or the teacher's own degraded inputs (Data).

    Args:
        images: uint8 [H, W, 3] arrays.
        batch_size, crop: the batch of random crop x crop windows.
    """

    def __init__(self, images: list[np.ndarray], *, batch_size: int, crop: int) -> None:
        if not images:
            raise ValueError("no usable image to train on")
        self.images, self.batch_size, self.crop = images, batch_size, crop

    def iters_per_epoch(self) -> int:
        return max(len(self.images) // self.batch_size, 1)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle: every batch is drawn from the trainer's generator."""

    def next(self, rng: np.random.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        picks = rng.integers(0, len(self.images), self.batch_size)
        return to_batch([random_crop(rng, self.crop, self.images[i])[0] for i in picks], device)


@dataclass
class Opened:
    """What `open_source` opened: the batch source, the round it reads (D4IR; None for the baselines) and a line per
    input folder with skipped files. Training moves `source` and `round` to each regeneration round."""

    source: ShardBatches | ImageBatches | AdversarialSource
    round: int | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def adversarial(self) -> AdversarialSource | None:
        return self.source if isinstance(self.source, AdversarialSource) else None


def round_batches(layout: RunLayout, n: int, name: str, config: DistillConfig, ctx: DistContext) -> ShardBatches:
    """Round n's batches: round 0 and a pinned round from RUN/shards, regeneration rounds from the student's."""
    folder = layout.round_shards(n, None if n == 0 or config.round is not None else name)
    return ShardBatches(folder, config, rank=ctx.rank, world=ctx.world, skip_damaged=config.skip_damaged_shards)


def open_round(layout: RunLayout, config: DistillConfig) -> tuple[int, RoundManifest] | None:
    """The round D4IR starts on (the pinned one, else round 0) and its manifest, checked to be finished and made
    with the prompts of this run; None for the baselines, which read no shards."""
    if config.data != "shards":
        return None
    start = config.round if config.round is not None else 0
    folder = layout.round_shards(start)
    manifest = read_manifest(folder)  # a round of another format is refused here, naming its manifest
    if not manifest.complete:
        raise ValueError(f"shard round {start} ({folder}) is incomplete (its synthesis was interrupted): "
                         "rerun `d4ir synth` for it")
    if start == 0 and (layout.prompts / EMBEDDINGS_FILE).exists():
        check_manifest(folder, {"encoder_sha256": load_embeddings(layout.prompts).metadata.get("encoder_sha256", "")})
    return start, manifest


def open_source(layout: RunLayout, config: DistillConfig, name: str, ctx: DistContext, teacher, *,
                first_round: int | None = None, degraded_dir=None, original_dir=None) -> Opened:
    """The batch source of `config.data`: round `first_round` (D4IR: from `open_round`), the teacher's own degraded
    inputs or web degraded images (Data, M0), or a generator against the student (DFSR, DFMC)."""
    if config.data in ("dfsr", "dfmc"):
        datafree = replace(config.datafree, method=config.data, loss=config.loss, seed=config.seed)
        return Opened(AdversarialSource(config.crop, config.batch_size, datafree, ctx.device, teacher=teacher,
                                        rank=ctx.rank))
    if config.data in ("original", "web"):
        # "original" trains on the degraded side only: the folder's files are what is read and counted
        folder = degraded_dir if config.data == "web" else find_pairs(original_dir)[0].degraded.parent
        images, scan = image_source(folder)
        skipped = [f"{folder}: {scan.summary()}"] if scan.skipped else []
        for line in skipped:
            log.warning("%s", line)
        return Opened(ImageBatches(images, batch_size=config.batch_size, crop=config.crop), skipped=skipped)
    if first_round is None:
        raise ValueError("data 'shards' trains on a round: open it first (open_round)")
    return Opened(round_batches(layout, first_round, name, config, ctx), first_round)
