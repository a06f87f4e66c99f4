"""Stage 2's plan: what decides the pixels of a round, and how its samples are cut into shard jobs.

A shard is a pure function of its job: the clean photos, the prompt rows and the per-sample noise seeds are
all drawn up front from the run seed (`plan_jobs`), and every sample's noise comes from its own generator,
so a rerun writes byte-equal shards and a killed run resumes shard by shard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from d4ir.shards.checks import check_choice, check_positive_ints
from d4ir.shards.records import PlannedSample

from .ccd import CCDConfig
from .sd import SDSource

# Where each sample's prompt comes from (the paper's Table 3 "Prompt" column): the prompt encoder's
# embedding of a web degraded image (D4IR), none (the empty text), a text prompt, or the prompt encoder
# applied to the clean photo itself ("content").
PromptMode = Literal["encoder", "none", "text", "content"]
PROMPT_MODES: tuple[str, ...] = get_args(PromptMode)
# The text prompt of each weather, for prompt mode "text" (Table 3's M1/M5) and the embedded model's captions.
WEATHER_TEXT = {
    "derain": "a photo taken in the rain, rain streaks",
    "dehaze": "a hazy photo, thick fog",
    "desnow": "a photo taken in snowfall, snowflakes",
}
# The weathers (restoration tasks) the project knows, in this order everywhere: the one list of them.
WEATHERS: tuple[str, ...] = tuple(WEATHER_TEXT)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that decides the pixels of a round (hashed into its manifest).

    Args:
        num_samples: images in the round.
        shard_size: images per shard (the unit of work and of resume).
        batch_size: images per UNet call.
        ccd: the sampler (T, lambda, image size, guidance, z0; paper: 70, 0.5, 256, 1, ccd).
        prompt_mode: encoder (the prompt encoder's embeddings of web degraded images), none, text or content.
        text: the text prompt for prompt mode text.
        seed: draws the (clean photo, prompt row) pairs and every sample's noise seed.
        round: the round these shards are (0 from stage 2; regeneration rounds count up).
    """

    num_samples: int = 4096
    shard_size: int = 256
    batch_size: int = 64
    ccd: CCDConfig = field(default_factory=CCDConfig)
    prompt_mode: PromptMode = "encoder"
    text: str = WEATHER_TEXT["derain"]
    seed: int = 0
    round: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(self, ("num_samples", "shard_size", "batch_size"), owner="SynthConfig.")
        check_choice("prompt_mode", self.prompt_mode, PROMPT_MODES, owner="SynthConfig.")
        if not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"SynthConfig.round must be a non-negative int, got {self.round!r}")
        if self.prompt_mode == "text" and not self.text.strip():
            raise ValueError("prompt_mode 'text' needs a non-empty text")


@dataclass(frozen=True)
class ShardJob:
    """One shard's work; picklable so that dask can ship it to a worker.

    Every path a job carries is absolute (`plan_jobs`): a dask worker runs in a folder of its own, where a
    relative `--run-dir` would name another folder (and the worker would write a stray round there).

    Args:
        index: shard number in the round.
        round_dir: the round folder the shard is written to.
        sd_source: where the frozen SD comes from (`synth.sd.SDSource`), loaded once per process.
        prompts_dir: the prompts folder (prompt modes encoder and content).
        config: the round's settings.
        items: the samples it plans (`shards.records.PlannedSample`: key, clean photo, prompt row, noise seed).
        device, dtype: where and in which dtype the SD runs.
        provenance: `shards.records.Provenance.to_json()` of the round, stored in every sample's JSON.
        threads: torch's intra-op CPU threads for this job (0: leave the process's setting). CPU float sums
            depend on the thread count (about 1 value in 5000 moves by one grey level), so the run's count
            travels with the job and a dask worker (started with 1 thread) writes the same bytes.
        encode_threads: threads encoding PNGs while the next batch samples (0: in the sampling thread).
        retried: the errors of this shard's earlier failed attempts in this run (set by the distributor that
            retries it); recorded in the shard's stats as `retries`.
    """

    index: int
    round_dir: str
    sd_source: SDSource
    prompts_dir: str | None
    config: SynthConfig
    items: tuple[PlannedSample, ...]
    device: str = "cpu"
    dtype: str = "float32"
    provenance: dict = field(default_factory=dict)
    threads: int = 0
    encode_threads: int = 0
    retried: tuple[str, ...] = ()


def plan_jobs(
    clean_paths: Sequence[Path],
    num_prompts: int,
    config: SynthConfig,
    *,
    round_dir: Path,
    sd_source: SDSource,
    prompts_dir: Path | None,
    device: str = "cpu",
    dtype: str = "float32",
    provenance: dict | None = None,
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
            PlannedSample(f"r{config.round:03d}-{i:07d}", os.path.abspath(clean_paths[clean_idx[i]]),
                          int(prompt_idx[i]), int(noise_seeds[i]))
            for i in range(start, stop)
        )
        jobs.append(
            ShardJob(
                index=start // config.shard_size,
                round_dir=str(Path(round_dir).resolve()),
                sd_source=sd_source,
                prompts_dir=str(Path(prompts_dir).resolve()) if prompts_dir else None,
                config=config,
                items=items,
                device=device,
                dtype=dtype,
                provenance=dict(provenance or {}),
            )
        )
    return jobs


def config_hash(config: SynthConfig) -> str:
    return hashlib.sha256(repr(sorted(asdict(config).items())).encode()).hexdigest()[:16]


def plan_hash(jobs: Sequence[ShardJob]) -> str:
    """Hash of every sample's (key, clean path, prompt row, seed): a resumed round must keep its plan, or
    its finished shards would be mixed with shards of another draw (e.g. after the clean folder changed)."""
    h = hashlib.sha256()
    for job in jobs:
        h.update(repr((job.index, tuple(map(tuple, job.items)))).encode())  # plain tuples: stable across versions
    return h.hexdigest()[:16]
