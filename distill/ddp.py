"""Stage 3 under torchrun: the process group, the DDP wrapper, and the prompt encoder's gradient average.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process and every helper
here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

# A long timeout: the other ranks wait in a barrier while rank 0 regenerates a whole shard round, which can
# take far longer than the default (10 minutes for NCCL).
DIST_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, and the device it trains on."""

    rank: int
    world: int
    device: str

    @classmethod
    def start(cls, device: str) -> DistContext:
        """Join the torchrun process group when there is one; a CUDA run takes the GPU of its local rank."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)
        if device.startswith("cuda") and world > 1:
            device = f"cuda:{local_rank}"
        return cls(rank, world, device)

    def wrap(self, model: nn.Module) -> nn.Module:
        # find_unused_parameters: the KD forward `student(x)` leaves parameters without a gradient (AirNet runs
        # only E_pre of its MoCo encoders); plain DDP would wait for them and fail at the next step.
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def average_gradients(module: nn.Module, ctx: DistContext) -> None:
    """All-reduce the gradients of a module DDP does not wrap (the prompt encoder) to their mean."""
    if ctx.world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(ctx.world)
