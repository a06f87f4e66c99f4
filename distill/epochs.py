"""The epoch skeleton that the teacher's supervised training and stage 3's distillation share.

Per epoch: the learning rate is the base rate halved every `halve_every` epochs; after the epoch one record
goes to train.jsonl, the weights are written, then the resumable state (state.pt, plain data only: see
shards.state). A resumed run restores every registered object (models, optimizers, the feedback loop) and
both random generators from the state, drops the log records after the state's epoch, and continues with the
next epoch, so it ends with the weights and the log of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from d4ir.shards.io import append_jsonl
from d4ir.shards.layout import LOG_FILE, STATE_FILE
from d4ir.shards.state import (
    StateError,
    changed_settings,
    check_schema,
    load_state,
    restore_rng,
    restoring,
    rng_state,
    save_state,
    trim_log,
)
from d4ir.shards.tracking import track_record

# what `end_epoch` writes; a state without it (or with other types) is refused naming the file and the key
STATE_SCHEMA = {"epoch": int, "settings": dict, "objects": dict, "rng": dict, "torch_rng": torch.Tensor,
                "extra": dict}


def halved_lr(base: float, epoch: int, every: int) -> float:
    """base * 0.5 ** (epoch // every); `every` = 0 keeps the rate constant."""
    return base * 0.5 ** (epoch // every) if every else base


class EpochLoop:
    """Resume, log and save for an epoch-based training run in `out_dir`.

    Args:
        out_dir: the run's folder (holds state.pt and train.jsonl).
        epochs: epochs in all.
        settings: what decides the result, as plain data; a state written with other settings is refused.
        rng: the run's numpy generator (its state travels with the state file).
        resume: continue after the last finished epoch; without it, an existing state is an error (a fresh
            run would silently mix with the old one's files).
        upgrade: maps a resumed state (its settings and objects) to this version's form before its settings are
            compared and its objects restored.
        writer: False on the ranks of a distributed run that only read the state (rank 0 writes).
    """

    def __init__(self, out_dir: Path, *, epochs: int, settings: dict, rng: np.random.Generator,
                 resume: bool, writer: bool = True, upgrade: Callable[[dict], dict] | None = None) -> None:
        self.out_dir, self.epochs, self.settings, self.rng = Path(out_dir), int(epochs), settings, rng
        self.state_path, self.log_path = self.out_dir / STATE_FILE, self.out_dir / LOG_FILE
        self.state: dict[str, Any] | None = None
        self.start = 0
        if self.state_path.exists() and not resume and writer:
            raise StateError(f"{self.state_path} holds an earlier run's state: pass --resume to continue it, or "
                             "use another output folder")
        if resume and self.state_path.exists():
            self.state = load_state(self.state_path, schema=STATE_SCHEMA)
            if upgrade is not None:  # what an older d4ir recorded otherwise (e.g. a path now known by hash)
                self.state = upgrade(self.state)
            if changed := changed_settings(self.state.get("settings"), settings):
                raise StateError(f"cannot resume {self.state_path}: it was written with other settings "
                                 f"({', '.join(changed)}); drop --resume and use another output folder")
            self.start = self.state["epoch"]
            if self.start < 0:
                raise StateError(f"{self.state_path}: malformed training state: 'epoch' is {self.start}, below 0")
            if writer:
                trim_log(self.log_path, "epoch", self.start)
        elif writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log_path.unlink(missing_ok=True)

    @property
    def resumed(self) -> dict[str, Any]:
        """Plain values saved with the last state ({} for a fresh run)."""
        return dict(self.state.get("extra", {})) if self.state else {}

    def restore(self, **objects: Any) -> None:
        """Load each object's state dict from the resumed state (None entries are skipped), and the RNGs."""
        if self.state is None:
            return
        path, present = self.state_path, {name: obj for name, obj in objects.items() if obj is not None}
        check_schema(path, self.state["objects"], dict.fromkeys(present, dict), "objects.")
        for name, obj in present.items():
            with restoring(path, f"objects.{name}"):
                obj.load_state_dict(self.state["objects"][name])
        with restoring(path, "rng"):
            restore_rng(self.rng, self.state["rng"])
        with restoring(path, "torch_rng"):
            torch.set_rng_state(self.state["torch_rng"])

    def end_epoch(self, epoch: int, record: dict, save_weights: Callable[[], None], *, extra: dict | None = None,
                  **objects: Any) -> None:
        """Log `record` for epoch `epoch` (0-based), write the weights, then the state."""
        append_jsonl(self.log_path, {"epoch": epoch + 1, **record})
        track_record(self.out_dir, record, epoch + 1)  # TensorBoard, with --tensorboard (shards/tracking.py)
        save_weights()
        save_state(self.state_path, {
            "epoch": epoch + 1,
            "settings": self.settings,
            "objects": {k: v.state_dict() for k, v in objects.items() if v is not None},
            "rng": rng_state(self.rng),
            "torch_rng": torch.get_rng_state(),
            "extra": dict(extra or {}),
        })
