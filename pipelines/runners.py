"""Distributors: run a stage's per-shard jobs. Every distributor has the signature of
`synth.worker.Distributor`: (fn, jobs, on_done) -> None; `on_done(job, result)` is called once per job.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Callable, Sequence

from d4ir.shards.errors import StageFailedError
from d4ir.shards.io import OutputFolderError
from d4ir.synth.worker import Distributor, ShardJob, attempt_error, local_distributor

__all__ = ["dask_distributor", "local_distributor", "make_distributor"]


def _on_worker(fn: Callable[[ShardJob], dict]) -> Callable[[ShardJob], dict]:
    """Pin a "cuda" job to the worker's own GPU: LocalCluster names its workers 0..n-1, one per GPU."""

    def run(job: ShardJob) -> dict:
        if job.device == "cuda":
            import torch
            from dask.distributed import get_worker

            name = get_worker().name
            index = int(name) if str(name).isdigit() else 0
            job = dataclasses.replace(job, device=f"cuda:{index % max(torch.cuda.device_count(), 1)}")
        return fn(job)

    return run


def dask_distributor(
    scheduler: str | None = None, workers: int = 1, max_in_flight: int | None = None, retries: int = 2
) -> Distributor:
    """Run jobs on dask.distributed: an existing scheduler address, or a LocalCluster of `workers` processes.

    Each job is submitted with pure=False and a unique key (so dask never merges two shards), `retries`
    retries, and at most `max_in_flight` jobs queued at once (default 2 per worker). The SD model is loaded
    once per worker process (`synth.sd.load_sd_cached`). A shard that still fails after its retries stops
    the run with its index named; finished shards stay on disk and a rerun skips them.
    """

    def run(fn: Callable[[ShardJob], dict], jobs: Sequence[ShardJob], on_done: Callable[[ShardJob, dict], None]):
        from dask.distributed import Client, LocalCluster, as_completed

        if not jobs:
            return
        cluster = None
        if scheduler is None:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
            )
        client = Client(scheduler or cluster)
        remote = _on_worker(fn)
        window = max_in_flight or 2 * max(len(client.scheduler_info()["workers"]), 1)
        pending = iter(jobs)
        owner = {}
        tag = uuid.uuid4().hex[:8]

        def submit(job: ShardJob):
            # retried here rather than by dask's own `retries`, so that the attempt knows the earlier errors and
            # its stats record them (ShardJob.retried)
            key = f"d4ir-shard-{job.index:06d}-{tag}-{len(job.retried)}"
            fut = client.submit(remote, job, pure=False, key=key)
            owner[fut.key] = job
            return fut

        try:
            queue = as_completed([submit(j) for j in itertools.islice(pending, window)], with_results=False)
            for fut in queue:
                job = owner.pop(fut.key)
                if fut.status != "finished":
                    err = fut.exception()
                    if isinstance(err, OutputFolderError):
                        raise err  # a full or unwritable folder: its own error, as in the local run
                    if len(job.retried) < retries:
                        queue.add(submit(dataclasses.replace(job, retried=(*job.retried, attempt_error(err)))))
                        continue
                    raise StageFailedError(f"shard {job.index} failed after {retries} retries: {err}") from err
                on_done(job, fut.result())
                nxt = next(pending, None)
                if nxt is not None:
                    queue.add(submit(nxt))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    return run


def make_distributor(scheduler: str | None, workers: int | None) -> Distributor:
    """The CLI's choice: no scheduler and no workers runs locally in this process."""
    if scheduler is None and not workers:
        return local_distributor
    return dask_distributor(scheduler=scheduler, workers=workers or 1)
