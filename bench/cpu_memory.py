"""Peak CPU memory of one measurement in this process (Linux), shared by bench/models.py, deform.py and export.py.

Why not getrusage's ru_maxrss: on Linux it is inherited across fork + exec, so a measurement child started by a
parent that once held 2 GB (after importing diffusers, say) reports a peak of at least 2 GB and a growth of 0.
Instead `PeakMeter` resets the kernel's high-water mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0) and
reads VmHWM, the peak resident set since then; where that is not possible it falls back to ru_maxrss and says so.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int:
    """Current resident set size, KiB (ru_maxrss where /proc is missing)."""
    return _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> bool:
    """Reset this process's peak resident set to its current size; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMeter:
    """Peak resident memory growth, in MiB, from construction (the peak is reset to the resident set then) to
    `peak_mib()`."""

    def __init__(self) -> None:
        self.exact = reset_peak()
        self.base_kib = rss_kib()

    def peak_mib(self) -> float:
        peak = _status_kib("VmHWM") if self.exact else None
        if peak is None:  # ru_maxrss: may include a parent's peak (see the module docstring)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak - self.base_kib, 0) / 2**10
