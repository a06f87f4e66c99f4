"""Stage 3 under torchrun-style DDP on the CPU: two gloo processes run `distill` on the tiny run (2 shards,
joint phase and one regeneration round on) and must end with equal students and encoders, having read
disjoint shards."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from shards.io import load_weights, read_jsonl

WORLD = 2
CONFIG = dict(student="half", batch_size=2, crop=16, iters_per_epoch=2, feedback_batch=1, num_workers=0,
              epochs=2, joint_epochs=1, round_every=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, run: str, teacher: str, degraded: str, clean: str, port: int, out: str) -> None:
    """One rank: the env a torchrun launch would give, then `distill`; dumps what the rank ended with."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import distill.trainer as trainer_mod

    seen: dict = {"shards": [], "student": None, "loop": None}
    real_build, real_batches, real_loop = trainer_mod.build, trainer_mod.ShardBatches, trainer_mod.FeedbackLoop

    def build(*a, **kw):
        seen["student"] = real_build(*a, **kw)
        return seen["student"]

    class Batches(real_batches):
        def set_epoch(self, epoch: int) -> None:
            super().set_epoch(epoch)
            seen["shards"].append([Path(u).relative_to(run).as_posix() for u in self.dataset.shard_list.ordered()])

    class Loop(real_loop):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["loop"] = self

    trainer_mod.build, trainer_mod.ShardBatches, trainer_mod.FeedbackLoop = build, Batches, Loop
    trainer_mod.distill(Path(run), Path(teacher), trainer_mod.DistillConfig(**CONFIG), degraded_dir=Path(degraded),
                        clean_dir=Path(clean), name="ddp", progress=False)
    student = seen["student"]
    torch.save({"student": student.state_dict(), "params": {k: v.detach() for k, v in student.named_parameters()},
                "encoder": dict(seen["loop"].encoder.named_parameters()), "shards": seen["shards"]},
               Path(out) / f"rank{rank}.pt")


def test_two_gloo_ranks_end_equal(run_copy, tmp_path):
    r = run_copy
    args = (str(r.root), str(r.teacher), str(r.degraded), str(r.clean), _free_port(), str(tmp_path))
    ctx = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the DDP run did not finish in 120 s")
    dumps = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]

    # each epoch the two ranks read disjoint shards that together are the whole round
    for epoch, (a, b) in enumerate(zip(dumps[0]["shards"], dumps[1]["shards"])):
        assert len(a) == len(b) == 1 and a != b, f"epoch {epoch}: ranks read {a} and {b}"
        assert Path(a[0]).parent == Path(b[0]).parent
    assert [Path(s[0]).parent.name for s in dumps[0]["shards"]] == ["round-000", "round-001"]

    # DDP: rank 0's init is broadcast and gradients are averaged, so both ranks hold the same student
    p0, p1 = dumps[0]["params"], dumps[1]["params"]
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    # BatchNorm running statistics are per rank (DDP broadcasts rank 0's before each forward, and rank 0's
    # are the ones saved): they are the only state entries allowed to differ
    s0, s1 = dumps[0]["student"], dumps[1]["student"]
    assert all(k.endswith(("running_mean", "running_var")) for k in s0 if not torch.equal(s0[k], s1[k]))
    e0, e1 = dumps[0]["encoder"], dumps[1]["encoder"]
    assert all(torch.equal(e0[k], e1[k]) for k in e0)

    # only rank 0 wrote: one log line per epoch, and its student file is what both ranks ended with
    out = r.root / "students" / "ddp"
    assert [rec["epoch"] for rec in read_jsonl(out / "train.jsonl")] == [1, 2]
    saved, _ = load_weights(out / "student")
    assert all(torch.equal(saved[k], s0[k]) for k in s0)
    assert json.loads((out / "shards" / "round-001" / "manifest.json").read_text())["complete"]
