"""Where stage 3's batches come from: a shard round, streamed through webdataset and a DataLoader.

Samples are decoded (PNG -> uint8) in DataLoader workers; the trainer's seeded generator picks the random
crop and flips in the main process, so a CPU run repeats exactly for a given worker count. Shards are
shuffled per epoch and split by rank and worker (`shards.reader.shard_dataset`); a sample buffer mixes
images across shards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from shards.reader import shard_dataset, shard_urls

from .data import random_crop, to_batch


def _as_is(sample: dict) -> dict:
    return sample


class ShardBatches:
    """Endless batches of random crops from the finished shards of one round.

    Args:
        directory: the round folder (RUN/shards/round-NNN).
        config: needs batch_size, crop, seed and num_workers (a `DistillConfig`).
        rank, world: this process's place in a torchrun job (shards are split between ranks).
    """

    def __init__(self, directory: Path, config, *, rank: int = 0, world: int = 1, shuffle_buffer: int = 256):
        self.directory = Path(directory)
        urls = shard_urls(self.directory)
        if not urls:
            raise FileNotFoundError(f"no finished shard in {self.directory}: run `d4ir synth` first")
        if len(urls) < world * max(config.num_workers, 1):
            raise ValueError(
                f"{len(urls)} shards cannot feed {world} ranks x {max(config.num_workers, 1)} "
                f"workers: synthesize more, smaller shards (--shard-size)"
            )
        sizes_path = self.directory / "sizes.json"
        self.total = sum(json.loads(sizes_path.read_text()).values()) if sizes_path.exists() else 0
        self.batch_size, self.crop, self.world = config.batch_size, config.crop, world
        self.dataset = shard_dataset(
            urls, seed=config.seed, rank=rank, world_size=world, shuffle_buffer=min(shuffle_buffer, max(self.total, 1))
        )
        # collate_fn keeps samples as they are (the default would turn the uint8 arrays into tensors)
        self.loader = DataLoader(
            self.dataset, batch_size=None, num_workers=config.num_workers, collate_fn=_as_is, persistent_workers=False
        )
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
        for _ in range(2):
            try:
                return next(self._iter)["degraded"]
            except StopIteration:
                self._iter = iter(self.loader)  # a new pass over this rank's shards
        raise RuntimeError(f"no readable sample in {self.directory} for this rank")

    def next(self, rng: np.random.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """A [B, 3, crop, crop] float batch in [0, 1] on `device` (moved there as uint8, a quarter of the
        bytes of float32, and converted on the device)."""
        crops = [random_crop(rng, self.crop, self._sample())[0] for _ in range(self.batch_size)]
        return to_batch(crops, device)
