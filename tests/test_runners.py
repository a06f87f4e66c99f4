"""pipelines/runners.py: the dask distributor (every job once, windowed submission, retries, failures named,
a full disk passed through) and a LocalCluster of 2 worker processes writing the local run's shards."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from d4ir.pipelines.runners import dask_distributor, make_distributor
from d4ir.shards.embeddings import save_embeddings
from d4ir.shards.io import OutputFolderError
from d4ir.shards.verify import verify_shards
from d4ir.synth.ccd import CCDConfig
from d4ir.synth.plan import ShardJob, SynthConfig, plan_jobs
from d4ir.synth.sd import SDSource, build_tiny_sd
from d4ir.synth.worker import local_distributor, synthesize
from PIL import Image

CFG = SynthConfig(num_samples=8, shard_size=2, batch_size=2, ccd=CCDConfig(steps=4, strength=0.5, size=32), seed=1)


def fake_jobs(tmp_path: Path, n: int = 5) -> list[ShardJob]:
    """n one-sample shard jobs; the distributor tests run stand-in functions on them, not the SD."""
    config = SynthConfig(num_samples=n, shard_size=1)
    clean = [tmp_path / "a.png", tmp_path / "b.png"]
    return plan_jobs(clean, 3, config, round_dir=tmp_path, sd_source=SDSource("tiny"), prompts_dir=None)


@pytest.fixture(scope="module")
def scheduler():
    """A threads-only cluster inside this process (starts in a second): the `scheduler=` address path."""
    from dask.distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None, silence_logs=40
    ) as cluster:
        yield cluster.scheduler_address


def attempt(log: Path, index: int) -> int:
    """Record one attempt at job `index` in `log` and return how many there were. Dask pickles the task
    functions even for an in-process worker, so a counter in memory would count in a copy: count on disk."""
    with open(log, "a") as f:  # one short O_APPEND write per attempt: safe across threads and processes
        f.write(f"{index}\n")
    return log.read_text().split().count(str(index))


def attempts(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def collect(distributor, fn, jobs) -> list[tuple[int, dict]]:
    done = []
    distributor(fn, jobs, lambda job, result: done.append((job.index, result)))
    return done


def test_make_distributor_runs_locally_without_a_cluster():
    assert make_distributor(None, None) is local_distributor
    assert make_distributor(None, 0) is local_distributor
    for scheduler, workers in (("tcp://127.0.0.1:8786", None), (None, 2)):
        chosen = make_distributor(scheduler, workers)
        assert callable(chosen) and chosen is not local_distributor


def test_every_job_runs_once_and_the_window_keeps_the_order(scheduler, tmp_path):
    jobs = fake_jobs(tmp_path)
    done = collect(dask_distributor(scheduler=scheduler), lambda job: {"n": len(job.items)}, jobs)
    assert sorted(i for i, _ in done) == [0, 1, 2, 3, 4]
    assert all(result == {"n": 1} for _, result in done)
    # One job in flight at a time: they finish in submission order.
    done = collect(dask_distributor(scheduler=scheduler, max_in_flight=1), lambda job: job.index, jobs)
    assert done == [(i, i) for i in range(5)]
    assert collect(dask_distributor(scheduler=scheduler), lambda job: 0, []) == []


def test_a_flaky_shard_is_retried(scheduler, tmp_path):
    log = tmp_path / "attempts.txt"

    def flaky(job):
        if attempt(log, job.index) == 1 and job.index == 2:
            raise RuntimeError("worker lost")
        return job.index, job.retried  # the attempt knows the earlier errors (they go into its stats)

    done = collect(dask_distributor(scheduler=scheduler, retries=2), flaky, fake_jobs(tmp_path))
    assert sorted(done) == [(i, (i, ("RuntimeError: worker lost",) if i == 2 else ())) for i in range(5)]
    assert sorted(attempts(log)) == [0, 1, 2, 2, 3, 4]


def test_a_shard_that_keeps_failing_is_named(scheduler, tmp_path):
    log = tmp_path / "attempts.txt"

    def broken(job):
        attempt(log, job.index)
        if job.index == 3:
            raise RuntimeError("device lost")
        return job.index

    with pytest.raises(RuntimeError, match=r"shard 3 failed after 2 retries: device lost"):
        collect(dask_distributor(scheduler=scheduler, retries=2), broken, fake_jobs(tmp_path))
    assert attempts(log).count(3) == 3


def test_a_full_disk_on_a_worker_is_an_output_folder_error(scheduler, tmp_path):
    def full(job):
        raise OutputFolderError(errno.ENOSPC, f"cannot write to {job.round_dir}: No space left on device")

    with pytest.raises(OutputFolderError, match="No space left") as err:
        collect(dask_distributor(scheduler=scheduler, retries=0), full, fake_jobs(tmp_path, 1))
    assert err.value.errno == errno.ENOSPC


@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_two_worker_processes_write_the_local_shards(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (64, 36), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(clean / f"clean{i}.png")
    embeds = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(0))
    sources = [{"path": f"degraded{i}.png", "sha256": "0" * 64} for i in range(4)]
    meta = {"encoder_sha256": "e" * 64, "sd_fingerprint": build_tiny_sd(0).fingerprint}
    save_embeddings(tmp_path / "prompts", embeds, sources, meta)

    kw = {"sd_source": "tiny", "prompts_dir": tmp_path / "prompts", "progress": False}
    local = synthesize(clean, tmp_path / "local", CFG, **kw)
    dask = synthesize(clean, tmp_path / "dask", CFG, distributor=dask_distributor(workers=2), **kw)
    assert (dask.shards, dask.already_done, dask.images, dask.failures) == (4, 0, 8, 0) == (
        local.shards, local.already_done, local.images, local.failures)
    assert verify_shards(dask.round_dir) == []
    names = sorted(p.name for p in local.round_dir.iterdir())
    assert names == sorted(p.name for p in dask.round_dir.iterdir())
    for name in names:
        a, b = (local.round_dir / name).read_bytes(), (dask.round_dir / name).read_bytes()
        if name.endswith(".stats.json"):  # stats carry wall-clock seconds
            a, b = ({k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (a, b))
        assert a == b, name
