"""Reading shards: the finished shards of a round, and a webdataset pipeline for training.

`shard_dataset` yields {"key": str, "degraded": uint8 ndarray [H, W, 3], "meta": dict} from the samples'
`degraded.png` and `json` members (shards.writer). The shard list is
shuffled with one permutation seeded by seed + epoch (the same on every rank and worker), then split by
node (rank/world) and by DataLoader worker, so each shard is read by exactly one worker in the job.
A truncated or corrupt shard is counted and warned about, and reading goes on with the next one.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from d4ir.shards.layout import parse_shard, shard_name
from d4ir.shards.writer import DEGRADED_FIELD, META_FIELD, shard_done
from PIL import Image


def shard_urls(directory: str | Path) -> list[str]:
    """Paths of the finished shards in `directory` (stats file present, tar size as recorded), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"shard folder {directory} does not exist")
    found = []
    for path in directory.iterdir():
        index = parse_shard(path.name)
        if index is not None and shard_done(directory, index):
            found.append(str(path))
    return sorted(found)


def decode_sample(raw: dict) -> dict:
    """Raw webdataset sample ({"__key__", "degraded.png": bytes, "json": bytes}) -> key, degraded, meta."""
    key = raw.get("__key__")
    missing = [f for f in (DEGRADED_FIELD, META_FIELD) if f not in raw]
    if missing:
        raise ValueError(f"sample {key!r} in {raw.get('__url__', '?')} lacks {missing}")
    with Image.open(io.BytesIO(raw[DEGRADED_FIELD])) as img:
        degraded = np.array(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3], writable copy
    meta = json.loads(raw[META_FIELD])
    return {"key": key, "degraded": degraded, "meta": meta}


def decode_or_report(raw: dict) -> dict:
    """`decode_sample`, or {"key", "error"} for a sample that cannot be decoded: the consumer counts it in its
    own process (a DataLoader worker's handler count would stay in the worker)."""
    try:
        return decode_sample(raw)
    except Exception as err:  # noqa: BLE001 - any undecodable sample is reported, not raised
        return {"key": raw.get("__key__"), "error": f"{raw.get('__url__', '?')}: {type(err).__name__}: {err}"}


class CountingHandler:
    """Error handler for webdataset stages: warns, counts, and tells the pipeline to go on.

    Unlike webdataset's warn_and_continue it does not sleep. The count lives in the process that reads
    (each DataLoader worker has its own copy).
    """

    def __init__(self) -> None:
        self.errors = 0

    def __call__(self, exn: BaseException) -> bool:
        self.errors += 1
        warnings.warn(f"skipped unreadable shard data: {exn!r}", RuntimeWarning, stacklevel=2)
        return True


def _node_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if rank is not None or world_size is not None:
        raise ValueError("pass both rank and world_size, or neither")
    # webdataset's lookup covers RANK/WORLD_SIZE (torchrun) and an initialised torch.distributed.
    node_rank, node_world, _, _ = wds.utils.pytorch_worker_info()
    return node_rank, node_world


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardList(torch.utils.data.IterableDataset):
    """First pipeline stage: yields {"url": ...} for this rank's and this worker's shards.

    Args:
        urls: shard paths or URLs.
        shuffle: shuffle the shard order with random.Random(seed + epoch) before splitting.
        seed, epoch: the shuffle seed is seed + epoch, so every epoch has its own order.
        split_by_node, split_by_worker: take every world_size-th / num_workers-th shard.
        rank, world_size: explicit node split; None reads RANK/WORLD_SIZE or torch.distributed.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        split_by_node: bool = True,
        split_by_worker: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.urls = [str(u) for u in urls]
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.rank, self.world_size = rank, world_size

    def ordered(self) -> list[str]:
        """This process's shards for the current epoch, in reading order."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(urls)
        if self.split_by_node:
            rank, world = _node_info(self.rank, self.world_size)
            if not 0 <= rank < world:
                raise ValueError(f"rank {rank} is outside world_size {world}")
            urls = urls[rank::world]
        if self.split_by_worker:
            worker, num_workers = _worker_info()
            urls = urls[worker::num_workers]
        return urls

    def __iter__(self) -> Iterator[dict]:
        for url in self.ordered():
            yield {"url": url}


class _SampleShuffle:
    """Buffer shuffle of samples, seeded by seed, epoch, rank and worker (reproducible, distinct)."""

    def __init__(self, bufsize: int, shard_list: ShardList):
        self.bufsize, self.shard_list = bufsize, shard_list

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        sl = self.shard_list
        rank, world = _node_info(sl.rank, sl.world_size) if sl.split_by_node else (0, 1)
        worker, _ = _worker_info()
        rng = random.Random(f"{sl.seed}:{sl.epoch}:{rank}:{world}:{worker}")
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= self.bufsize:
                # Swap a random element to the end and pop it: O(1) per sample.
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class ShardDataset(wds.DataPipeline):
    """The webdataset pipeline returned by `shard_dataset`, with `set_epoch` for a new shard order."""

    def __init__(self, shard_list: ShardList, *stages, handler: Callable[[BaseException], bool]):
        super().__init__(shard_list, *stages)
        self.shard_list = shard_list
        self.handler = handler

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (takes effect at the next iter; DataLoader workers must not persist)."""
        self.shard_list.epoch = epoch


def shard_dataset(
    urls: list[str],
    *,
    shuffle_shards: bool = True,
    seed: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    shuffle_buffer: int = 0,
    handler: Callable[[BaseException], bool] | None = None,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    report_errors: bool = False,
) -> ShardDataset:
    """A webdataset pipeline over `urls` yielding {"key", "degraded": uint8 [H,W,3], "meta": dict}.

    Args:
        urls: shard paths or URLs (e.g. `shard_urls(round_dir)`).
        shuffle_shards: shuffle the shard order (seed + epoch) before the node/worker split.
        seed, epoch: shuffle seeds; `set_epoch` on the result changes the epoch later.
        split_by_node: give each rank every world_size-th shard (rank/world_size, or from the env).
        split_by_worker: give each DataLoader worker every num_workers-th shard of its rank.
        shuffle_buffer: samples held for an in-stream shuffle; 0 keeps shard order.
        handler: called with each read/decode error; return True to go on. Default: `CountingHandler`.
        rank, world_size: explicit node split (tests, custom launchers).
        report_errors: yield {"key", "error"} for a sample that fails to decode instead of skipping it.
    """
    if not urls:
        raise ValueError("shard_dataset needs at least one shard url")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    handler = handler if handler is not None else CountingHandler()
    shard_list = ShardList(
        urls,
        shuffle=shuffle_shards,
        seed=seed,
        epoch=epoch,
        split_by_node=split_by_node,
        split_by_worker=split_by_worker,
        rank=rank,
        world_size=world_size,
    )
    stages = [wds.tarfile_to_samples(handler=handler)]
    if shuffle_buffer > 0:
        stages.append(_SampleShuffle(shuffle_buffer, shard_list))
    stages.append(wds.map(decode_or_report) if report_errors else wds.map(decode_sample, handler=handler))
    return ShardDataset(shard_list, *stages, handler=handler)


def _read_tar(path: Path) -> Iterator[dict]:
    """Group a tar's members into raw samples by the text before the first dot of their names."""
    current: dict | None = None
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _, field = info.name.partition(".")
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": str(path)}
            current[field] = tar.extractfile(info).read()
    if current is not None:
        yield current


def iter_raw_metas(directory: str | Path, index: int) -> Iterator[tuple[str, dict]]:
    """(key, provenance JSON) of every sample of shard `index`, without decoding its images."""
    with tarfile.open(Path(directory) / shard_name(index), "r") as tar:
        for info in tar:
            key, _, field = info.name.partition(".")
            if info.isreg() and field == META_FIELD:
                yield key, json.loads(tar.extractfile(info).read())


def iter_samples(directory: str | Path) -> Iterator[dict]:
    """Every sample of the finished shards in `directory`, in shard and tar order; errors are raised."""
    for url in shard_urls(directory):
        for raw in _read_tar(Path(url)):
            yield decode_sample(raw)
