"""Observes one rank of a real `torchrun ... -m d4ir.pipelines.cli distill` run for tests/test_distill_ddp.py.

The test puts a `sitecustomize.py` on the workers' PYTHONPATH that calls `install` when D4IR_DDP_DUMP names a
folder and torchrun's RANK is set. `install` wraps (never changes) what `distill.trainer.distill` builds (the
student) and opens through `distill.sources` (the shard batches of each epoch) and `distill.feedback` (the feedback
loop); at exit the rank writes what it ended with to D4IR_DDP_DUMP/rank<RANK>.pt (plain tensors and lists: read
back with weights_only=True).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path


def install(out: str) -> None:
    import d4ir.distill.feedback as feedback_mod
    import d4ir.distill.sources as sources_mod
    import d4ir.distill.trainer as trainer_mod
    import torch

    seen: dict = {"shards": [], "student": None, "loop": None}
    real_build, real_batches, real_loop = trainer_mod.build, sources_mod.ShardBatches, feedback_mod.FeedbackLoop

    def build(*args, **kwargs):
        seen["student"] = real_build(*args, **kwargs)
        return seen["student"]

    class Batches(real_batches):
        def set_epoch(self, epoch: int) -> None:
            super().set_epoch(epoch)
            seen["shards"].append([Path(u).as_posix() for u in self.dataset.shard_list.ordered()])

    class Loop(real_loop):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["loop"] = self

    trainer_mod.build = build
    sources_mod.ShardBatches, feedback_mod.FeedbackLoop = Batches, Loop

    def dump() -> None:
        student, loop = seen["student"], seen["loop"]
        if student is None:
            return
        torch.save({"student": student.state_dict(),
                    "params": {k: v.detach() for k, v in student.named_parameters()},
                    "encoder": {k: v.detach() for k, v in loop.encoder.named_parameters()} if loop else {},
                    "shards": seen["shards"], "world": int(os.environ["WORLD_SIZE"])},
                   Path(out) / f"rank{os.environ['RANK']}.pt")

    atexit.register(dump)
