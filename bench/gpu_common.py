"""Shared pieces of bench/gpu_bench.py: the time budget, device timers, the FLOP ceiling, the sampler variants.

Budget: the run has one deadline (start + --budget seconds); each section gets min(its own limit, time left).
Inside a section every unit of work (one sampler variant, one distill run) first asks `Clock.fits(estimate)`
with an estimate from what was already measured, and is recorded as skipped when it would not fit; a
SIGALRM timer (`hard_limit`) interrupts a section that overruns anyway (a torch.compile that takes too long).

Share of the FLOP ceiling: achieved = images/s x FLOPs per image (`synth.ccd.ccd_flops`, 2 FLOPs per
multiply-add), share = achieved / peak, the peak being the device's dense fp16/bf16 tensor rate from
`PEAK_TFLOPS` (keyed by a substring of the GPU name) unless --peak-tflops overrides it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

import torch

# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPILED = ("", "unet", "unet+decoder")


class SectionTimeout(Exception):
    """A section ran past its hard time limit."""


class Clock:
    """Seconds left to one section: its own limit, capped by the run's global deadline.

    Args:
        limit_s: the section's own limit.
        deadline: the run's global deadline (time.monotonic() value).
    """

    def __init__(self, limit_s: float, deadline: float) -> None:
        self.start = time.monotonic()
        self.deadline = min(self.start + limit_s, deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM); a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise SectionTimeout(f"hard limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Marks:
    """Points in time on the device's stream: CUDA events on a GPU, perf_counter on the CPU (synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """Elapsed seconds between two marks (call `sync` first on a GPU)."""
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The FLOP ceiling in TFLOP/s: the override, else the table entry matching the GPU name, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated in GiB since the last reset; None on the CPU (no allocator counter)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def generators(start: int, count: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded generator per image (seeds start .. start+count-1)."""
    return [torch.Generator(device=device).manual_seed(start + i) for i in range(count)]


@dataclass(frozen=True)
class Variant:
    """One sampler configuration.

    Args:
        dtype: weight dtype (a key of DTYPES).
        channels_last: UNet and VAE in channels-last memory format.
        batch: images per ccd_sample call.
        compiled: what is torch.compiled: "" (nothing), "unet", or "unet+decoder" (the VAE decoder too).
    """

    dtype: str
    channels_last: bool
    batch: int
    compiled: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.compiled not in COMPILED:
            raise ValueError(f"compiled must be one of {COMPILED}, got {self.compiled!r}")

    @property
    def label(self) -> str:
        memory = "cl" if self.channels_last else "contig"
        return f"{self.dtype}/{memory}/b{self.batch}" + (f"/compiled-{self.compiled}" if self.compiled else "")

    def as_dict(self) -> dict:
        return asdict(self) | {"label": self.label}


class Tee:
    """A text stream writing to several streams (the console and the log file)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.streams[0].fileno()
