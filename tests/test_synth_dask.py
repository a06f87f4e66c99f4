"""Stage 2 on a real dask cluster: `dask scheduler` and two `dask worker` processes (one thread each) started by
this test from a folder of their own, bound to 127.0.0.1 on free ports, and `d4ir synth --scheduler` run from
another folder with a relative --run-dir and --clean. Every path a shard job carries is absolute, so the
workers write the run's round (byte for byte the images of a local run) and nothing under their own folder; a
job whose files are not on its worker fails with the host named. The test stops what it started, by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import cli
from d4ir.synth.plan import plan_jobs
from d4ir.synth.sd import SDSource
from d4ir.synth.worker import synthesize_shard
from synth_fixtures import CFG, CLI_OVERRIDES, make_clean, make_prompts

DASK = Path(sys.executable).parent / "dask"
pytestmark = pytest.mark.skipif(not DASK.exists(), reason="no dask CLI beside this Python (dask[distributed])")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the dask scheduler exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no dask scheduler on port {port} after {timeout} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group this test started (by its leader's PID), then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _images(round_dir: Path) -> dict[str, bytes]:
    """Every synthesized PNG of a round by sample key (the JSON names the photo's path, which differs)."""
    out = {}
    for tar_path in sorted(round_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out |= {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".png")}
    return out


@pytest.mark.slow
def test_synth_on_a_dask_cluster_from_another_folder(tmp_path):
    user, cluster = tmp_path / "user", tmp_path / "cluster"
    cluster.mkdir()
    make_clean(user / "clean")
    make_prompts(user / "run" / "prompts")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", D4IR_QUIET="1")
    port = _free_port()
    procs: list[subprocess.Popen] = []
    try:
        log = open(cluster / "dask.log", "w")  # noqa: SIM115 - closed with the processes below
        procs.append(subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                      cwd=cluster, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        _wait_for_port(port, procs[0])
        address = f"tcp://127.0.0.1:{port}"
        for _ in range(2):
            procs.append(subprocess.Popen([DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                           "--no-nanny", "--no-dashboard", "--memory-limit", "0",
                                           "--local-directory", cluster / "scratch", "--death-timeout", "60"],
                                          cwd=cluster, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        from dask.distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        cmd = [sys.executable, "-m", "d4ir.pipelines.cli", "synth", "--run-dir", "run", "--clean", "clean",
               "--sd", "tiny", "--preset", "demo", "--device", "cpu", "--scheduler", address, *CLI_OVERRIDES]
        done = subprocess.run(cmd, cwd=user, env=env, capture_output=True, text=True, timeout=300)
    finally:
        _stop(procs)
        log.close()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:] + (cluster / "dask.log").read_text()[-3000:]
    assert "synth: 4 shards (0 already done), 8 images written, 0 failures" in done.stdout
    assert sorted(p.name for p in cluster.iterdir() if p.name not in ("dask.log", "scratch")) == []  # nothing stray
    round_dir = user / "run" / "shards" / "round-000"
    shutil.copytree(user / "run" / "prompts", tmp_path / "local" / "prompts")  # the same run, in this process
    local = cli("synth", "--run-dir", tmp_path / "local", "--clean", user / "clean", "--sd", "tiny", "--preset", "demo",
                "--device", "cpu", *CLI_OVERRIDES)
    assert local.exit_code == 0, local.output
    cluster_images = _images(round_dir)
    assert len(cluster_images) == 8 and cluster_images == _images(tmp_path / "local" / "shards" / "round-000")


def test_a_job_names_the_host_when_its_files_are_not_there(tmp_path):
    clean = make_clean(tmp_path / "clean")
    prompts = make_prompts(tmp_path / "prompts")
    paths = sorted(clean.iterdir())
    jobs = plan_jobs(paths, 5, CFG, round_dir=tmp_path / "gone" / "round-000", sd_source=SDSource("tiny"),
                     prompts_dir=prompts)
    host = socket.gethostname()
    with pytest.raises(FileNotFoundError, match=f"on host {host}: the round folder .*gone/round-000 does not exist"):
        synthesize_shard(jobs[0])
    assert not (tmp_path / "gone").exists()
    (tmp_path / "gone" / "round-000").mkdir(parents=True)
    shutil.rmtree(prompts)
    with pytest.raises(FileNotFoundError, match=f"on host {host}: shard 0 reads .* missing file.*embeddings"):
        synthesize_shard(jobs[0])
    away = replace(jobs[0], sd_source=SDSource(str(tmp_path / "sd-folder")), prompts_dir=None,
                   config=replace(CFG, prompt_mode="none"))
    with pytest.raises(FileNotFoundError, match=f"on host {host}: shard 0 reads 1 missing file.*sd-folder"):
        synthesize_shard(away)
    assert list((tmp_path / "gone" / "round-000").iterdir()) == []


def test_every_path_a_job_carries_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clean = make_clean(Path("clean"))
    jobs = plan_jobs(sorted(clean.iterdir()), 5, CFG, round_dir=Path("run/shards/round-000"),
                     sd_source=SDSource("tiny"), prompts_dir=Path("run/prompts"))
    for job in jobs:
        assert job.round_dir == str(tmp_path / "run" / "shards" / "round-000")
        assert job.prompts_dir == str(tmp_path / "run" / "prompts")
        assert all(Path(path).is_absolute() and Path(path).is_file() for _, path, _, _ in job.items)
