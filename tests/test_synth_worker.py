"""synth/worker.py: stage 2's shard set, reproducibility, resume after SIGKILL, retries, failed samples,
full disks, the manifest check, the prompt-mode switches and the `d4ir synth` command (tiny SD, 32x32)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

import synth.worker as worker
from pipelines.cli import main
from shards import writer
from shards.embeddings import save_embeddings
from shards.io import OutputFolderError, save_weights
from shards.verify import verify_shards
from synth.adapter import PromptEncoder
from synth.worker import SynthConfig, plan_jobs, synthesize, synthesize_shard

REPO = Path(__file__).resolve().parents[1]
# 6 samples in 3 shards of 2, one UNet call per 2 images; 4 DDIM steps at strength 0.5 -> 2 denoising steps.
CFG = SynthConfig(num_samples=6, shard_size=2, batch_size=2, steps=4, strength=0.5, size=32, seed=3)
PROMPT_META = {"encoder_sha256": "e" * 64, "sd_fingerprint": "f" * 64}
# `d4ir synth` at the demo preset, shrunk: 8 images in 4 shards of 2 at 32x32.
CLI_OVERRIDES = ["--num-samples", "8", "--shard-size", "2", "--batch-size", "2", "--steps", "4", "--size", "32"]


def make_clean(folder: Path, sizes=((40, 48), (64, 36), (32, 32), (50, 70))) -> Path:
    """Random-noise clean photos of several shapes (prepare_clean crops each to 32x32)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"clean{i}.png")
    return folder


def make_prompts(folder: Path, n: int = 5, tokens: int = 4, seed: int = 0, meta: dict = PROMPT_META) -> Path:
    """An embeddings file of random prompts [n, tokens, 32] (the tiny UNet's cross_attention_dim)."""
    embeds = torch.randn(n, tokens, 32, generator=torch.Generator().manual_seed(seed))
    sources = [{"path": f"degraded{i}.png", "sha256": "0" * 64} for i in range(n)]
    save_embeddings(folder, embeds, sources, meta)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    return {"clean": make_clean(root / "clean"), "prompts": make_prompts(root / "prompts"), "root": root}


@pytest.fixture(scope="module")
def reference(inputs) -> Path:
    """One uninterrupted run with CFG: what every other run of CFG must equal byte for byte."""
    out = inputs["root"] / "reference"
    synthesize(inputs["clean"], out, sd="tiny", prompts_dir=inputs["prompts"], config=CFG, progress=False)
    return out


def run(inputs: dict, out: Path, config: SynthConfig = CFG, **kw) -> worker.SynthResult:
    kw.setdefault("prompts_dir", inputs["prompts"])
    return synthesize(inputs["clean"], out, sd=kw.pop("sd", "tiny"), config=config, progress=False, **kw)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def stats(folder: Path) -> dict[str, dict]:
    """Every stats file without its wall-clock `seconds`."""
    out = {}
    for p in sorted(folder.glob("*.stats.json")):
        s = json.loads(p.read_text())
        s.pop("seconds")
        out[p.name] = s
    return out


def assert_same_shards(a: Path, b: Path) -> None:
    tars_a, tars_b = sorted(a.glob("*.tar")), sorted(b.glob("*.tar"))
    assert [p.name for p in tars_a] == [p.name for p in tars_b] and tars_a
    for pa, pb in zip(tars_a, tars_b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert stats(a) == stats(b)
    assert (a / "sizes.json").read_bytes() == (b / "sizes.json").read_bytes()


def samples(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (synthesized image [S,S,3] uint8, provenance json) over every tar of a round."""
    out: dict[str, dict] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                key, _, field = info.name.partition(".")
                out.setdefault(key, {})[field] = tar.extractfile(info).read()
    return {
        k: (np.asarray(Image.open(BytesIO(v["input.png"]))), json.loads(v["json"])) for k, v in sorted(out.items())
    }


# ------------------------------------------------------------------------------------------ the shard set
def test_shard_set_is_complete_readable_and_reproducible(inputs, reference, tmp_path, monkeypatch):
    names = {f"{i:06d}.{ext}" for i in range(3) for ext in ("tar", "stats.json")} | {"manifest.json", "sizes.json"}
    assert set(tree(reference)) == names
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["images"] == 6 and manifest["num_shards"] == 3
    assert manifest["sd"] == "tiny" and manifest["config"] == asdict(CFG)
    assert manifest["encoder_sha256"] == "e" * 64 and manifest["sd_fingerprint"] == "f" * 64
    assert json.loads((reference / "sizes.json").read_text()) == {f"{i:06d}.tar": 2 for i in range(3)}
    assert all(s["count"] == 2 and s["failures"] == [] for s in stats(reference).values())
    assert verify_shards(reference) == []

    # A plain webdataset reader sees every sample: a 32x32 RGB image and its provenance.
    urls = [str(p) for p in sorted(reference.glob("*.tar"))]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in read] == [f"r000-{i:07d}" for i in range(6)]
    clean_paths = {str(p) for p in inputs["clean"].iterdir()}
    for s in read:
        assert s["input.png"].shape == (32, 32, 3) and s["input.png"].dtype == np.uint8
        meta = s["json"]
        assert meta["clean"] in clean_paths and 0 <= meta["prompt_row"] < 5
        assert meta["steps"] == 4 and meta["lambda"] == 0.5 and meta["round"] == 0 and meta["prompt_mode"] == "dpa"
        assert meta["encoder_sha256"] == "e" * 64
        assert s["input.png"].std() > 1  # an image, not a constant
    assert len({s["json"]["seed"] for s in read}) == 6  # every sample has its own noise seed

    # Equal inputs, fresh folder: byte-equal shards.
    again = tmp_path / "again"
    r = run(inputs, again)
    assert (r.shards, r.skipped, r.images, r.failures) == (3, 0, 6, 0)
    assert_same_shards(reference, again)
    assert (reference / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()

    # Same folder again: every shard is skipped, no synthesis runs and not one byte changes.
    before = tree(again)

    def must_not_run(job):
        raise AssertionError(f"shard {job.index} was synthesized again")

    monkeypatch.setattr(worker, "synthesize_shard", must_not_run)
    r = run(inputs, again)
    assert (r.shards, r.skipped, r.images) == (3, 3, 0)
    assert tree(again) == before


# ----------------------------------------------------------------------------------------- kill and rerun
# Runs `d4ir synth` with every UNet batch slowed down, so that a SIGKILL lands in the middle of shard 1.
_SLOW_CLI = """
import sys, time
import synth.worker as w
from pipelines.cli import main
real = w.ccd_sample
def slow(*args, **kwargs):
    out = real(*args, **kwargs)
    time.sleep(0.5)
    return out
w.ccd_sample = slow
main(sys.argv[1:], prog_name="d4ir")
"""


def test_sigkill_mid_shard_then_rerun_equals_an_uninterrupted_run(inputs, tmp_path):
    args = ["synth", "--clean", str(inputs["clean"]), "--prompts", str(inputs["prompts"]), "--preset", "demo"]
    args += [*CLI_OVERRIDES, "--device", "cpu"]
    killed_root = tmp_path / "killed"
    round_dir = killed_root / "round-000"
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, *args, "--out", str(killed_root)],
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
    resumed = cli.invoke(main, [*args, "--out", str(killed_root)])
    assert resumed.exit_code == 0, resumed.output
    assert "4 shards (1 already done)" in resumed.output
    whole = cli.invoke(main, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output

    assert_same_shards(round_dir, tmp_path / "whole" / "round-000")
    assert not list(round_dir.glob("*.tmp"))
    assert verify_shards(round_dir) == []
    assert json.loads((round_dir / "manifest.json").read_text())["complete"] is True


def test_jobs_carry_the_cpu_thread_count_and_a_resume_keeps_the_first_one(inputs, reference, tmp_path, monkeypatch):
    # CPU float sums (so a few pixels) depend on torch's thread count: the run's count travels with each job.
    threads = torch.get_num_threads()
    assert json.loads((reference / "manifest.json").read_text())["cpu_threads"] == threads
    seen = []

    def record(job):
        seen.append((job.index, job.threads, torch.get_num_threads()))
        return {"count": 0, "failures": []}

    monkeypatch.setattr(worker, "_synthesize_shard", record)
    job = plan_jobs([Path("a.png")], 1, CFG, out_dir=tmp_path, sd="tiny", prompts_dir=None, encoder=None)[0]
    synthesize_shard(replace(job, threads=threads + 2))
    assert seen == [(0, threads + 2, threads + 2)] and torch.get_num_threads() == threads  # set, then restored

    # A round begun with another thread count is resumed with that count, not with this process's.
    out = shutil.copytree(reference, tmp_path / "round")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "cpu_threads": threads + 2, "complete": False}))
    (out / "000002.stats.json").unlink()
    seen.clear()
    run(inputs, out)
    assert seen == [(2, threads + 2, threads + 2)]
    assert json.loads((out / "manifest.json").read_text())["cpu_threads"] == threads + 2


# ------------------------------------------------------------------------------------------------ faults
def test_a_failing_shard_is_retried(inputs, reference, tmp_path, monkeypatch):
    attempts = []

    def flaky(job):
        attempts.append(job.index)
        if job.index == 1 and attempts.count(1) == 1:
            raise RuntimeError("worker lost")
        return synthesize_shard(job)

    monkeypatch.setattr(worker, "synthesize_shard", flaky)
    r = run(inputs, tmp_path / "out")
    assert attempts == [0, 1, 1, 2]
    assert (r.images, r.failures) == (6, 0)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"] is True
    assert_same_shards(reference, tmp_path / "out")


def test_a_shard_that_keeps_failing_stops_the_run_with_its_index(inputs, reference, tmp_path, monkeypatch):
    attempts = []

    def broken(job):
        attempts.append(job.index)
        if job.index == 1:
            raise RuntimeError("device lost")
        return synthesize_shard(job)

    out = tmp_path / "out"
    monkeypatch.setattr(worker, "synthesize_shard", broken)
    with pytest.raises(RuntimeError, match=r"shard 1 failed after 3 attempts: device lost"):
        run(inputs, out)
    assert attempts == [0, 1, 1, 1]
    assert writer.shard_done(out, 0) and not (out / "000001.tar").exists() and not (out / "000002.tar").exists()
    assert json.loads((out / "manifest.json").read_text())["complete"] is False

    # The finished shard survives; the next run redoes only the rest and ends equal to the reference.
    monkeypatch.setattr(worker, "synthesize_shard", synthesize_shard)
    r = run(inputs, out)
    assert (r.skipped, r.images) == (1, 4)
    assert_same_shards(reference, out)


def test_an_unreadable_clean_photo_is_counted_in_the_stats(inputs, reference, tmp_path, monkeypatch):
    clean = shutil.copytree(inputs["clean"], tmp_path / "clean")
    real_plan = plan_jobs
    broken = {}

    def plan_then_break(*args, **kwargs):
        jobs = real_plan(*args, **kwargs)
        broken["path"] = jobs[0].items[0][1]  # the photo of the first sample, after planning
        Path(broken["path"]).write_bytes(b"this is no longer a png")
        return jobs

    monkeypatch.setattr(worker, "plan_jobs", plan_then_break)
    out = tmp_path / "out"
    r = synthesize(clean, out, sd="tiny", prompts_dir=inputs["prompts"], config=CFG, progress=False)

    ref = samples(reference)
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


def test_a_full_disk_mid_shard_is_an_output_folder_error(inputs, tmp_path, monkeypatch):
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
    out = tmp_path / "out"
    with pytest.raises(OutputFolderError, match="No space left") as err:
        run(inputs, out)
    assert err.value.errno == errno.ENOSPC and str(out) in str(err.value)
    assert attempts == [0, 1]  # a full disk is not retried
    assert writer.shard_done(out, 0)
    assert sorted(p.name for p in out.iterdir()) == ["000000.stats.json", "000000.tar", "manifest.json"]


def test_an_unwritable_output_folder_is_an_output_folder_error(inputs, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputFolderError, match="a_file"):
        run(inputs, blocker / "round-000")

    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc)  # the first write (the manifest) finds the disk full
    with pytest.raises(OutputFolderError, match="No space left"):
        run(inputs, tmp_path / "full")
    assert not list((tmp_path / "full").iterdir())


# ---------------------------------------------------------------------------------------- manifest check
def test_rerun_with_other_settings_into_the_same_folder_is_refused(inputs, reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "round")
    before = tree(out)
    with pytest.raises(ValueError, match=r"do not match this run.*config_hash"):
        run(inputs, out, replace(CFG, steps=6))
    with pytest.raises(ValueError, match=r"sd: shards were made with 'tiny', the run asks for 'sd15-layout'"):
        run(inputs, out, sd="sd15-layout")
    other = make_prompts(tmp_path / "prompts", meta={**PROMPT_META, "encoder_sha256": "1" * 64})
    with pytest.raises(ValueError, match="encoder_sha256"):
        run(inputs, out, prompts_dir=other)
    more_clean = shutil.copytree(inputs["clean"], tmp_path / "clean")
    shutil.copy(more_clean / "clean0.png", more_clean / "clean9.png")
    with pytest.raises(ValueError, match="plan_hash"):  # another clean folder: another draw of the pairs
        synthesize(more_clean, out, sd="tiny", prompts_dir=inputs["prompts"], config=CFG, progress=False)
    assert tree(out) == before


# ----------------------------------------------------------------------------------- prompt-mode switches
def test_prompt_modes_and_z0_change_the_images(inputs, tmp_path):
    small = replace(CFG, num_samples=2, shard_size=2)
    enc = PromptEncoder(prompt_dim=32, prompt_tokens=4, feat_dim=8, widths=(4, 4, 4), token_rank=4)
    enc_path = save_weights(tmp_path / "enc" / "encoder", enc.state_dict(), {"arch": "PromptEncoder",
                                                                              "encoder": enc.config})
    images = {}
    for name, config, kw in [
        ("dpa", small, {}),
        ("none", replace(small, prompt_mode="none"), {"prompts_dir": None}),
        ("content", replace(small, prompt_mode="content"), {"prompts_dir": None, "encoder": enc_path.parent}),
        ("noise", replace(small, z0="noise"), {}),
    ]:
        out = tmp_path / name
        r = run(inputs, out, config, **kw)
        assert (r.images, r.failures) == (2, 0) and verify_shards(out) == []
        got = samples(out)
        assert all(meta["prompt_mode"] == config.prompt_mode and meta["z0"] == config.z0 for _, meta in got.values())
        images[name] = np.stack([img for img, _ in got.values()]).astype(float)
    manifest = json.loads((tmp_path / "content" / "manifest.json").read_text())
    assert len(manifest["encoder_file_sha256"]) == 64
    for name in ("none", "content", "noise"):
        assert np.abs(images[name] - images["dpa"]).mean() > 0.5, name


def test_prompt_mode_errors_are_clear_and_early(inputs, tmp_path):
    with pytest.raises(ValueError, match="prompt_mode 'text' needs an SD with a text encoder; the 'tiny'"):
        run(inputs, tmp_path / "text", replace(CFG, prompt_mode="text"))
    with pytest.raises(ValueError, match="prompt_mode 'content' needs the prompt encoder"):
        run(inputs, tmp_path / "content", replace(CFG, prompt_mode="content"))
    with pytest.raises(FileNotFoundError, match="no prompt encoder at"):
        run(inputs, tmp_path / "content", replace(CFG, prompt_mode="content"), encoder=tmp_path / "missing")
    with pytest.raises(ValueError, match="needs --prompts"):
        run(inputs, tmp_path / "dpa", prompts_dir=None)
    with pytest.raises(ValueError, match="unknown prompt_mode"):
        run(inputs, tmp_path / "odd", replace(CFG, prompt_mode="clip"))
    with pytest.raises(ValueError, match="multiple of 8"):
        run(inputs, tmp_path / "size", replace(CFG, size=30))
    assert not list(tmp_path.iterdir())  # refused before anything was written


# ----------------------------------------------------------------------------------------------- the CLI
def test_cli_help_and_a_demo_run_with_overrides(inputs, tmp_path):
    cli = CliRunner()
    helped = cli.invoke(main, ["synth", "--help"])
    assert helped.exit_code == 0 and "--prompt-mode" in helped.output and "--workers" in helped.output

    args = ["synth", "--clean", str(inputs["clean"]), "--prompts", str(inputs["prompts"]), "--preset", "demo"]
    args += [*CLI_OVERRIDES, "--device", "cpu", "--seed", "5", "--out", str(tmp_path / "shards")]
    result = cli.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "synth: 4 shards (0 already done), 8 images written, 0 failures" in result.output
    round_dir = tmp_path / "shards" / "round-000"
    manifest = json.loads((round_dir / "manifest.json").read_text())
    want = {"num_samples": 8, "shard_size": 2, "batch_size": 2, "steps": 4, "size": 32, "seed": 5}
    assert {k: manifest["config"][k] for k in want} == want
    assert manifest["config"]["strength"] == 0.5  # from the demo preset
    assert verify_shards(round_dir) == []

    bad = cli.invoke(main, [*args[:-2], "--out", str(tmp_path / "t"), "--prompt-mode", "text"])
    assert bad.exit_code != 0 and "text encoder" in str(bad.exception)
