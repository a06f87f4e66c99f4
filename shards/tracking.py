"""Experiment tracking: every stage's train.jsonl records also as TensorBoard scalars, and sample images of each
shard round, behind `d4ir --tensorboard DIR` (or `d4ir STAGE --tensorboard DIR`, or D4IR_TENSORBOARD=DIR).

train.jsonl stays the record of a run; the event files are a view of it for TensorBoard (`tensorboard --logdir
DIR`). Each stage's output folder writes under DIR/<label>, the label naming the run and the stage:
RUN/prompts -> `run/prompts`, RUN/teacher -> `run/teacher`, RUN/students/NAME -> `run/students/NAME`, a round's
samples RUN/shards -> `run/shards` (a student's regeneration rounds: `run/students/NAME/shards`). A record's
numeric fields are scalars under their own names (`loss`, `lr`, `val_psnr`, `loss_kd`, ...) at its step (the
prompt encoder's step, an epoch); images go under `samples/round-NNN` at step NNN. Only rank 0 of a torchrun job
writes. Needs the `track` extra (tensorboard): pip install 'd4ir[track]'.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import missing_extra
from .progress import process_rank

_dir: Path | None = None
_writers: dict[str, Any] = {}


def set_tracking(folder: str | Path | None) -> None:
    """Write TensorBoard event files under `folder` from now on (None: as D4IR_TENSORBOARD says)."""
    global _dir
    if folder is not None:
        check_tracking()
    close_tracking()
    _dir = Path(folder).resolve() if folder is not None else None


def check_tracking() -> None:
    """A MissingExtraError (one line, naming pip install 'd4ir[track]') when tensorboard does not import."""
    missing = missing_extra("track", ("tensorboard",), "--tensorboard")
    if missing is not None:
        raise missing


def tracking_dir() -> Path | None:
    """Where event files go (None: not tracking, or not rank 0)."""
    folder = _dir or (Path(os.environ["D4IR_TENSORBOARD"]).resolve() if os.environ.get("D4IR_TENSORBOARD") else None)
    return folder if process_rank() == 0 else None


def run_label(out_dir: str | Path) -> str:
    """The event-file folder of a stage's output folder: the run's name and the stage (see the module doc)."""
    parts = Path(out_dir).resolve().parts
    students = max((i for i, p in enumerate(parts) if p == "students"), default=None)
    start = students - 1 if students is not None and 0 < students < len(parts) - 1 else len(parts) - 2
    return "/".join(parts[max(start, 1):])


def _writer(out_dir: str | Path) -> Any | None:
    folder = tracking_dir()
    if folder is None:
        return None
    label = run_label(out_dir)
    key = str(folder / label)
    if key not in _writers:
        check_tracking()
        from torch.utils.tensorboard import SummaryWriter

        _writers[key] = SummaryWriter(log_dir=key)
    return _writers[key]


def track_record(out_dir: str | Path, record: dict, step: int) -> None:
    """The numeric fields of a train.jsonl record as scalars at `step` (no-op when not tracking)."""
    writer = _writer(out_dir)
    if writer is None:
        return
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            writer.add_scalar(key, float(value), int(step))
    writer.flush()


def track_images(out_dir: str | Path, tag: str, images: list[np.ndarray], step: int) -> None:
    """uint8 images [H, W, 3] (same size) as one image grid entry `tag` at `step` (no-op when not tracking)."""
    writer = _writer(out_dir)
    if writer is None or not images:
        return
    writer.add_images(tag, np.stack(images), int(step), dataformats="NHWC")
    writer.flush()


def close_tracking() -> None:
    """Close every open event file (also at exit)."""
    for writer in _writers.values():
        writer.close()
    _writers.clear()


atexit.register(close_tracking)
