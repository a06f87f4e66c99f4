"""Progress on stderr and per-epoch lines, one rule for every stage.

On a terminal a stage shows a tqdm bar. When stderr is not a terminal (a log file, a pipe, a batch job) a bar
would write one carriage-return frame per refresh, all on one line (about 100k for a paper-scale distill), so
a plain line is printed instead, at most every `PROGRESS_INTERVAL` seconds (D4IR_PROGRESS_INTERVAL, default
30) and once at the end. Nothing is shown when the run is quiet: `d4ir --quiet` / `d4ir STAGE --quiet`
(`set_quiet`), D4IR_QUIET=1, tqdm's own TQDM_DISABLE=1, or a rank other than 0 of a torchrun job (RANK).
Warnings, errors and each command's final summary line are not progress: quiet keeps them (rank 0 only).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_quiet = False


def set_quiet(flag: bool = True) -> None:
    """Silence progress bars and per-epoch lines for the rest of this process (the CLI's --quiet)."""
    global _quiet
    _quiet = bool(flag)


def process_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def quiet() -> bool:
    """True when progress is not shown: --quiet, D4IR_QUIET, TQDM_DISABLE, or a torchrun rank other than 0."""
    env = any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("D4IR_QUIET", "TQDM_DISABLE"))
    return _quiet or env or process_rank() != 0


def progress_interval() -> float:
    """Seconds between two plain progress lines (D4IR_PROGRESS_INTERVAL, default 30)."""
    try:
        return max(float(os.environ.get("D4IR_PROGRESS_INTERVAL", "30")), 0.0)
    except ValueError:
        return 30.0


class PlainProgress:
    """The parts of tqdm's interface the stages use (iterate, update, set_postfix, close), as plain lines:
    `desc: n/total (pct%), rate unit/s, postfix` every `interval` seconds and at the end."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, unit: str = "it", interval: float = 30.0, file: Any = None) -> None:
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.start_n = total, initial, initial
        self.file = file or sys.stderr
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._line(time.monotonic(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        elapsed = max(now - self.t0, 1e-9)
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {(self.n - self.start_n) / elapsed:.3g} {self.unit}/s"
        tail = f", {self.postfix}" if self.postfix else ""
        end = f", done in {elapsed:.0f} s" if done else ""
        print(f"{self.desc}: {count} {self.unit}{pct}{rate}{tail}{end}", file=self.file, flush=True)


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True, initial: int = 0, unit: str = "it", leave: bool = True):
    """A tqdm bar on a terminal, `PlainProgress` lines otherwise, a silent tqdm when disabled or quiet.

    Args:
        iterable, total, desc, initial, unit, leave: as tqdm's.
        enabled: the caller's own switch (e.g. a stage's `progress` argument); quiet() overrides it.
    """
    from tqdm import tqdm

    if not enabled or quiet():
        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=True)
    if not sys.stderr.isatty():
        return PlainProgress(iterable, total=total, desc=desc, initial=initial, unit=unit,
                             interval=progress_interval())
    return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, leave=leave, disable=False)


def report(line: str, enabled: bool = True) -> None:
    """A per-epoch line on stdout (above a running bar, as tqdm.write), unless disabled or quiet."""
    if enabled and not quiet():
        from tqdm import tqdm

        tqdm.write(line)
