"""Stage 2 against faults: a SIGKILL mid-shard and a rerun equal to an uninterrupted run, the CPU thread count
that travels with each job, retries, a shard that keeps failing, unreadable clean photos, full disks and
unwritable folders (tiny SD, 32x32; inputs from tests/synth_fixtures.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import d4ir.synth.worker as worker
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from d4ir.pipelines.cli import main
from d4ir.shards import writer
from d4ir.shards.io import OutputFolderError
from d4ir.shards.verify import verify_shards
from d4ir.synth.sd import SDSource
from d4ir.synth.worker import plan_jobs, synthesize, synthesize_shard
from synth_fixtures import CFG, CLI_OVERRIDES, REPO, assert_same_shards, rounds, run, samples, stats

# Runs `d4ir synth` with every UNet batch slowed down, so that a SIGKILL lands in the middle of shard 1.
_SLOW_CLI = """
import sys, time
import d4ir.synth.worker as w
from d4ir.pipelines.cli import main
real = w.ccd_sample
def slow(*args, **kwargs):
    out = real(*args, **kwargs)
    time.sleep(0.5)
    return out
w.ccd_sample = slow
main(sys.argv[1:], prog_name="d4ir")
"""


def test_sigkill_mid_shard_then_rerun_equals_an_uninterrupted_run(synth_inputs, tmp_path):
    def args(run_dir: Path) -> list[str]:
        shutil.copytree(synth_inputs["prompts"], run_dir / "prompts", dirs_exist_ok=True)
        return ["synth", "--run-dir", str(run_dir), "--clean", str(synth_inputs["clean"]), "--sd", "tiny",
                "--preset", "demo", *CLI_OVERRIDES, "--device", "cpu"]

    killed = tmp_path / "killed"
    round_dir = killed / "shards" / "round-000"
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, *args(killed)],
        cwd=REPO,
        # CPU sums depend on torch's thread count: the child computes with this process's count.
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        deadline = time.monotonic() + 120
        # Shard 0 finished and shard 1 is being written: kill it now.
        while not ((round_dir / "000000.stats.json").exists() and (round_dir / "000001.tar.tmp").exists()):
            assert proc.poll() is None, f"synth ended before it could be killed: {log.read_text()}"
            assert time.monotonic() < deadline, "synth did not reach shard 1 in 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (round_dir / "000001.tar.tmp").exists() and not (round_dir / "000001.stats.json").exists()
    assert not (round_dir / "000003.stats.json").exists()
    assert json.loads((round_dir / "manifest.json").read_text())["complete"] is False
    assert verify_shards(round_dir)  # the interrupted round is reported, not taken for finished

    cli = CliRunner()
    resumed = cli.invoke(main, args(killed))
    assert resumed.exit_code == 0, resumed.output
    assert "4 shards (1 already done)" in resumed.output
    whole = cli.invoke(main, args(tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output

    assert_same_shards(round_dir, tmp_path / "whole" / "shards" / "round-000")
    assert not list(round_dir.glob("*.tmp"))
    assert verify_shards(round_dir) == []
    assert json.loads((round_dir / "manifest.json").read_text())["complete"] is True


def test_jobs_carry_the_thread_count_and_resume_keeps_the_first(synth_inputs, synth_reference, tmp_path, monkeypatch):
    # CPU float sums (so a few pixels) depend on torch's thread count: the run's count travels with each job.
    threads = torch.get_num_threads()
    assert json.loads((synth_reference / "manifest.json").read_text())["cpu_threads"] == threads
    seen, real = [], worker._synthesize_shard

    def record(job):
        seen.append((job.index, job.threads, torch.get_num_threads()))
        return real(job)

    monkeypatch.setattr(worker, "_synthesize_shard", record)
    clean = sorted(synth_inputs["clean"].iterdir())[:1]
    job = plan_jobs(clean, 1, replace(CFG, prompt_mode="none"), round_dir=tmp_path / "t", sd_source=SDSource("tiny"),
                    prompts_dir=None)[0]
    (tmp_path / "t").mkdir()  # the round folder `synthesize` makes before any job
    synthesize_shard(replace(job, threads=threads + 2))
    assert seen == [(0, threads + 2, threads + 2)] and torch.get_num_threads() == threads  # set, then restored

    # A round begun with another thread count is resumed with that count, not with this process's.
    out = shutil.copytree(synth_reference, rounds(tmp_path / "shards"))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "cpu_threads": threads + 2, "complete": False}))
    (out / "000002.stats.json").unlink()
    seen.clear()
    run(synth_inputs, out)
    assert seen == [(2, threads + 2, threads + 2)]
    assert json.loads((out / "manifest.json").read_text())["cpu_threads"] == threads + 2


# ------------------------------------------------------------------------------------------------ faults
def test_a_failing_shard_is_retried(synth_inputs, synth_reference, tmp_path, monkeypatch):
    attempts = []

    def flaky(job):
        attempts.append(job.index)
        if job.index == 1 and attempts.count(1) == 1:
            raise RuntimeError("worker lost")
        return synthesize_shard(job)

    monkeypatch.setattr(worker, "synthesize_shard", flaky)
    r = run(synth_inputs, rounds(tmp_path / "out"))
    assert attempts == [0, 1, 1, 2]
    assert (r.images, r.failures, r.retried) == (6, 0, 1)
    assert [json.loads((r.round_dir / f"00000{i}.stats.json").read_text())["retries"] for i in range(3)] == [
        [], ["RuntimeError: worker lost"], []]  # the retried shard says so in its stats
    assert json.loads((r.round_dir / "manifest.json").read_text())["complete"] is True
    assert_same_shards(synth_reference, r.round_dir)


def test_a_shard_that_keeps_failing_stops_the_run_with_its_index(synth_inputs, synth_reference, tmp_path, monkeypatch):
    attempts = []

    def broken(job):
        attempts.append(job.index)
        if job.index == 1:
            raise RuntimeError("device lost")
        return synthesize_shard(job)

    out = rounds(tmp_path / "out")
    monkeypatch.setattr(worker, "synthesize_shard", broken)
    with pytest.raises(RuntimeError, match=r"shard 1 failed after 3 attempts: device lost"):
        run(synth_inputs, out)
    assert attempts == [0, 1, 1, 1]
    assert writer.shard_done(out, 0) and not (out / "000001.tar").exists() and not (out / "000002.tar").exists()
    assert json.loads((out / "manifest.json").read_text())["complete"] is False

    # The finished shard survives; the next run redoes only the rest and ends equal to the reference.
    monkeypatch.setattr(worker, "synthesize_shard", synthesize_shard)
    r = run(synth_inputs, out)
    assert (r.already_done, r.images) == (1, 4)
    assert_same_shards(synth_reference, out)


def test_an_unreadable_clean_photo_is_counted_in_the_stats(synth_inputs, synth_reference, tmp_path, monkeypatch):
    clean = shutil.copytree(synth_inputs["clean"], tmp_path / "clean")
    real_plan = plan_jobs
    broken = {}

    def plan_then_break(*args, **kwargs):
        jobs = real_plan(*args, **kwargs)
        broken["path"] = jobs[0].items[0].clean  # the photo of the first sample, after planning
        Path(broken["path"]).write_bytes(b"this is no longer a png")
        return jobs

    monkeypatch.setattr(worker, "plan_jobs", plan_then_break)
    r = synthesize(clean, tmp_path / "out", CFG, prompts_dir=synth_inputs["prompts"], progress=False)
    out = r.round_dir

    ref = samples(synth_reference)
    bad = sorted(k for k, (_, meta) in ref.items() if Path(meta["clean"]).name == Path(broken["path"]).name)
    assert bad and r.failures == len(bad) and r.images == 6 - len(bad)
    failed = [f for s in stats(out).values() for f in s["failures"]]
    assert sorted(f["key"] for f in failed) == bad
    assert all(f["error"].startswith(f"ImageSkipped: {broken['path']}: not an image") for f in failed), failed
    assert verify_shards(out) == []
    got = samples(out)
    assert sorted(got) == sorted(set(ref) - set(bad))
    for key, (img, _) in got.items():
        # The other samples are untouched by their neighbour's failure (up to one grey level of float noise).
        assert np.abs(img.astype(int) - ref[key][0].astype(int)).max() <= 1, key


def test_a_full_disk_mid_shard_is_an_output_folder_error(synth_inputs, tmp_path, monkeypatch):
    real_write = writer._HashingWriter.write
    attempts = []

    def full_at_shard_1(self, data):
        if Path(self.f.name).name == "000001.tar.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    def counted(job):
        attempts.append(job.index)
        return synthesize_shard(job)

    monkeypatch.setattr(writer._HashingWriter, "write", full_at_shard_1)
    monkeypatch.setattr(worker, "synthesize_shard", counted)
    out = rounds(tmp_path / "out")
    with pytest.raises(OutputFolderError, match="No space left") as err:
        run(synth_inputs, out)
    assert err.value.errno == errno.ENOSPC and str(out) in str(err.value)
    assert attempts == [0, 1]  # a full disk is not retried
    assert writer.shard_done(out, 0)
    assert sorted(p.name for p in out.iterdir()) == ["000000.stats.json", "000000.tar", "manifest.json"]


def test_an_unwritable_output_folder_is_an_output_folder_error(synth_inputs, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputFolderError, match="a_file"):
        run(synth_inputs, blocker / "round-000")

    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc)  # the first write (the manifest) finds the disk full
    with pytest.raises(OutputFolderError, match="No space left"):
        run(synth_inputs, rounds(tmp_path / "full"))
    assert not list(rounds(tmp_path / "full").iterdir())


def test_a_sampler_error_fails_the_shard_and_is_retried_never_a_short_shard(synth_inputs, synth_reference, tmp_path,
                                                                             monkeypatch):
    """A transient error inside the sampler (e.g. CUDA out of memory) must not end a shard early with its stats
    written: the shard fails, is retried, and the round ends equal to an uninterrupted one. If it keeps failing,
    the run raises, the shard is absent, and the round stays incomplete (verify says so)."""
    real, calls = worker.ccd_sample, []

    def oom_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first batch of shard 1
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, "ccd_sample", oom_once)
    r = run(synth_inputs, rounds(tmp_path / "once"))
    assert (r.images, r.failures, r.retried) == (6, 0, 1)
    retries = json.loads((r.round_dir / "000001.stats.json").read_text())["retries"]
    assert retries == ["RuntimeError: CUDA out of memory"]
    assert_same_shards(synth_reference, r.round_dir)

    def always(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(worker, "ccd_sample", always)
    out = rounds(tmp_path / "always")
    with pytest.raises(RuntimeError, match="shard 0 failed after 3 attempts: CUDA out of memory"):
        run(synth_inputs, out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert any("not complete" in p for p in verify_shards(out))
