"""Reliability, third pass (docs/reliability.md, cases 25 and up): a damaged shard that a rerun repairs, a run
folder that moves, messages that name what they are about. Each test asserts the exact outcome."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil

import d4ir.distill.trainer as trainer_mod
import d4ir.synth.worker as worker
import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner
from conftest import TEACHER_KWARGS, synth_config
from d4ir.distill import deform
from d4ir.distill.registry import build, save_model
from d4ir.distill.trainer import DistillConfig, distill
from d4ir.pipelines.cli import main
from d4ir.shards.images import to_tensor
from d4ir.shards.io import load_weights, read_jsonl
from d4ir.shards.state import StateError, load_state, save_state
from d4ir.shards.verify import verify_shards
from d4ir.shards.writer import read_manifest, read_stats, shard_done
from d4ir.synth.worker import synthesize
from PIL import Image

TINY = dict(student="half", batch_size=2, crop=16, iters_per_epoch=2, feedback_batch=1, num_workers=0)
ROUNDS = dict(epochs=3, joint_epochs=2, round_every=1)


def _cfg(**kw) -> DistillConfig:
    return DistillConfig(**{**TINY, **kw})


def _distill(root, cfg, name, r, **kw):
    """distill into `root` with the tiny run `r`'s web folders and its default teacher (RUN/teacher)."""
    return distill(root, root / "teacher" / "teacher.safetensors", cfg, degraded_dir=r.degraded,
                   clean_dir=r.clean, name=name, progress=False, **kw)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------- 25. a damaged shard is redone by a rerun
def test_a_shard_with_a_flipped_byte_is_not_done_and_a_synth_rerun_redoes_it(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    shards, round0 = r.root / "shards", r.root / "shards" / "round-000"
    tar = round0 / "000001.tar"
    original = tar.read_bytes()
    damaged = bytearray(original)
    damaged[600] ^= 0xFF  # same size, one byte changed
    tar.write_bytes(bytes(damaged))
    altered = "000001.tar: altered: sha256 differs from the one in its stats file"
    assert verify_shards(round0) == [altered]
    assert not shard_done(round0, 1) and shard_done(round0, 0)
    res = synthesize(r.clean, shards, synth_config(), prompts_dir=r.root / "prompts", progress=False)
    assert (res.already_done, res.images) == (1, 4)  # the advice "rerun `d4ir synth` to redo it" is true
    assert tar.read_bytes() == original and read_stats(round0, 1).count == 4
    assert read_manifest(round0).complete is True and verify_shards(round0) == []


# ------------------------------------------------------------------------------ 26. a run folder that moves
class _Killed(Exception):
    pass


def test_a_killed_distill_resumes_after_its_run_folder_is_moved(tiny_run, tmp_path, monkeypatch):
    straight = tiny_run.copy_to(tmp_path / "straight")
    _distill(straight.root, _cfg(**ROUNDS), "s", tiny_run)
    r = tiny_run.copy_to(tmp_path / "run")
    real = trainer_mod.DistillConfig.round_for_epoch

    def kill(cfg, epoch):
        if epoch == 2:  # after epoch 2: round 1 is in the student's folder, round 2 is made after the move
            raise _Killed
        return real(cfg, epoch)

    monkeypatch.setattr(trainer_mod.DistillConfig, "round_for_epoch", kill)
    with pytest.raises(_Killed):
        _distill(r.root, _cfg(**ROUNDS), "s", tiny_run)
    monkeypatch.setattr(trainer_mod.DistillConfig, "round_for_epoch", real)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(r.root, moved)
    res = _distill(moved, _cfg(**ROUNDS), "s", tiny_run, resume=True)
    assert res.round == 2
    want, _ = load_weights(straight.root / "students" / "s" / "student")
    got, _ = load_weights(moved / "students" / "s" / "student")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    keys = ("epoch", "round", "loss_kd", "loss_fb", "loss_cl")
    logs = [[{k: rec[k] for k in keys} for rec in read_jsonl(root / "students" / "s" / "train.jsonl")]
            for root in (straight.root, moved)]
    assert logs[0] == logs[1] and [rec["epoch"] for rec in logs[1]] == [1, 2, 3]
    # the teacher is known by its content: another teacher under the same name is refused
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        save_model(moved / "teacher" / "teacher", build("airnet", **TEACHER_KWARGS))
    with pytest.raises(StateError, match=r"other settings \(teacher_sha256\)"):
        _distill(moved, _cfg(**ROUNDS), "s", tiny_run, resume=True)


def test_a_state_that_names_its_teacher_by_path_still_resumes(tiny_run, tmp_path):
    """States written before row 26 recorded the teacher's resolved path: read as that file's hash."""
    r = tiny_run.copy_to(tmp_path / "run")
    _distill(r.root, _cfg(data="web", epochs=1, joint_epochs=0), "w", tiny_run)
    state_path = r.root / "students" / "w" / "state.pt"
    state = load_state(state_path)
    settings = {k: v for k, v in state["settings"].items() if k != "teacher_sha256"}
    save_state(state_path, state | {"settings": settings | {"teacher": str(r.teacher.resolve())}})
    _distill(r.root, _cfg(data="web", epochs=2, joint_epochs=0), "w", tiny_run, resume=True)
    assert [rec["epoch"] for rec in read_jsonl(r.root / "students" / "w" / "train.jsonl")] == [1, 2]


# --------------------------------------------------------------- 27. runs that repeat at any thread count
def test_two_distills_at_two_threads_end_bit_equal_whatever_the_machine_load(tiny_run, tmp_path, monkeypatch):
    """The deformable conv's "auto" used to pick the fastest implementation by timing it: on a loaded machine two
    runs picked differently (they agree only to float rounding) and two 2-thread distills differed by 1.1e-4.
    Here the timings of the two runs are made to disagree as load makes them; the runs must still be equal."""
    fast = iter([("torchvision", "gather", "sample"), ("gather", "sample", "torchvision")])
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for run in ("a", "b"):
            order = next(fast)
            monkeypatch.setattr(deform, "_timed", lambda impl, *a, order=order, **k: float(order.index(impl)))
            deform.clear_auto_cache()
            r = tiny_run.copy_to(tmp_path / run)
            _distill(r.root, _cfg(**ROUNDS), "s", tiny_run)
            results.append(load_weights(r.root / "students" / "s" / "student")[0])
    finally:
        torch.set_num_threads(threads)
        deform.clear_auto_cache()
    a, b = results
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- 28-32. messages that name their object
def test_a_full_disk_while_distill_saves_the_student_names_the_file(tiny_run, tmp_path, monkeypatch):
    r = tiny_run.copy_to(tmp_path / "run")
    fsync = os.fsync

    def full_for_the_student(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("student.safetensors.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_the_student)
    result = _cli("distill", "--run-dir", r.root, "--teacher", r.teacher, "--data", "web", "--degraded", r.degraded,
                  "--epochs", 1, "--joint-epochs", 0, "--iters-per-epoch", 1, "--batch-size", 2, "--crop", 16,
                  "--device", "cpu", "--name", "x")
    out = r.root / "students" / "x"
    # a pipe gets plain progress lines (shards/progress.py) before it; the error is one line, the last
    lines = [line for line in result.output.replace("\r", "\n").splitlines() if line.strip()]
    assert result.exit_code == 2 and [line for line in lines if "error" in line] == lines[-1:], result.output
    assert lines[-1] == f"d4ir: error: [Errno 28] cannot write student.safetensors to {out}: No space left on device"
    assert not (out / "student.safetensors").exists() and not (out / "student.safetensors.tmp").exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_raw_pickle_as_teacher_or_state_is_refused_without_torchs_advice_to_unpickle_it(tiny_run, tmp_path, protocol):
    """torch's refusal says that weights_only=False "will likely succeed" (it would run the file's code) and
    warns about the pickle protocol: d4ir prints one line of its own, naming the file."""
    r = tiny_run.copy_to(tmp_path / "run")
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"weights": os.system}, protocol=protocol))
    result = _cli("distill", "--run-dir", r.root, "--teacher", raw, "--data", "web", "--degraded", r.degraded,
                  "--epochs", 1, "--joint-epochs", 0, "--device", "cpu")
    one_line_error(result, f"{raw}", "d4ir never unpickles code")
    state = r.root / "students" / "s" / "state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(raw.read_bytes())
    with pytest.raises(StateError, match="d4ir never unpickles code") as err:
        load_state(state)
    for text in (result.output, str(err.value)):
        assert "weights_only" not in text and "likely succeed" not in text and "Warning" not in text


def test_synth_prints_its_skipped_clean_photos_and_its_retried_shards(tiny_run, tmp_path, monkeypatch):
    r = tiny_run.copy_to(tmp_path / "run")
    clean = shutil.copytree(r.clean, tmp_path / "clean")
    (clean / "empty.png").write_bytes(b"")
    real, calls = worker.synthesize_shard, []

    def flaky(job):
        calls.append(job.index)
        if calls == [0]:
            raise RuntimeError("worker lost")
        return real(job)

    monkeypatch.setattr(worker, "synthesize_shard", flaky)
    result = _cli("synth", "--run-dir", r.root, "--clean", clean, "--sd", "tiny", "--round", 3, "--num-samples", 4,
                  "--shard-size", 2, "--batch-size", 2, "--steps", 4, "--size", 32, "--prompt-mode", "none")
    assert result.exit_code == 0, result.output
    line = result.output.rsplit("\r", 1)[-1].strip()
    assert "4 images written, 0 failures (1 shard(s) retried: see their stats' retries)" in line
    assert "clean photos: 8 usable, skipped: 1 zero bytes;" in line
    assert read_stats(r.root / "shards" / "round-003", 0).extra["retries"] == ["RuntimeError: worker lost"]


def test_eval_counts_and_names_the_pairs_it_centre_crops(tiny_run, tmp_path):
    val = shutil.copytree(tiny_run.val, tmp_path / "val")
    clean = Image.open(val / "clean" / "v1.png")
    bigger = Image.new("RGB", (40, 36))
    bigger.paste(clean, (4, 2))  # the clean image 8 px wider and 4 px taller, the degraded one centred in it
    bigger.save(val / "clean" / "v1.png")
    out = tmp_path / "eval.json"
    result = _cli("eval", "--model", "identity", "--pairs", val, "--out", out)
    assert result.exit_code == 0, result.output
    how = "degraded 32x32, clean 40x36 -> 32x32"
    assert f"cropped: {val}: 1 pair(s) of unequal sizes scored on their centre crops (v1: {how})" in result.output
    written = json.loads(out.read_text())
    assert written["cropped"] == [["v1", how]] and written["count"] == 6


def test_a_round_copied_from_another_student_is_refused_naming_the_student_that_made_it(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    _distill(r.root, _cfg(epochs=2, joint_epochs=2, round_every=1), "s", tiny_run)
    copied = r.root / "students" / "s2" / "shards"
    shutil.copytree(r.root / "students" / "s" / "shards" / "round-001", copied / "round-001")
    with pytest.raises(StateError, match=re.escape(f"{copied} holds round-001 made by student 's' (copied here?), "
                                                   "not by a run of 's2'")):
        _distill(r.root, _cfg(epochs=2, joint_epochs=2, round_every=1), "s2", tiny_run)


# ------------------------------------------------------------------ 33. memory bounded by a budget, not by size
class _Recorder(torch.nn.Module):
    """The identity, recording the size of every input it is given."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return x * self.scale


def test_large_images_reach_the_model_in_tiles_and_are_cropped_before_conversion(tmp_path, monkeypatch):
    from d4ir.distill.data import load_pairs
    from d4ir.distill.evaluate import evaluate_model
    from d4ir.distill.inference import AUTO_TILE
    from d4ir.synth import embed, prompts
    from d4ir.synth.prompt_encoder import PromptEncoder
    from d4ir.synth.prompts import PromptsConfig

    big = (1000, 1100)  # 1.1 Mpx: above the whole-image budget of 1 Mpx
    for side, colour in (("degraded", (90, 120, 150)), ("clean", (100, 120, 140))):
        (tmp_path / "pairs" / side).mkdir(parents=True)
        Image.new("RGB", big[::-1], colour).save(tmp_path / "pairs" / side / "a.png")
    model = _Recorder()
    result = evaluate_model(model, load_pairs(tmp_path / "pairs"), progress=False)
    assert max(h * w for h, w in model.sizes) == AUTO_TILE * AUTO_TILE and len(model.sizes) == 9
    assert result["count"] == 1 and abs(result["images"][0]["psnr"] - 20 * np.log10(255 / np.sqrt(200 / 3))) < 1e-3
    model.sizes.clear()
    evaluate_model(model, load_pairs(tmp_path / "pairs"), tile=1024, progress=False)
    assert model.sizes == [(1000, 1024), (1000, 1024)]  # a given tile side is used as it is

    # stage 1 converts only its crops to floats (it converted whole images: batch x image size)
    converted = []

    def recording(arr):
        converted.append(arr.shape[:2])
        return to_tensor(arr)

    paths = [tmp_path / "pairs" / "degraded" / "a.png"] * 2
    monkeypatch.setattr(prompts, "to_tensor", recording)
    q, k = prompts._batch(paths, 0, PromptsConfig(batch_size=2, crop=64))
    assert q.shape == k.shape == (2, 3, 64, 64) and set(converted) == {(64, 64)}
    converted.clear()
    monkeypatch.setattr(embed, "to_tensor", recording)
    encoder = PromptEncoder(prompt_dim=8, prompt_tokens=2, feat_dim=8, widths=(4, 8, 8), token_rank=2).eval()
    rows = embed.embed_images(encoder, paths, side=96, batch_size=2, device="cpu")
    assert rows.shape == (2, 2, 8) and set(converted) == {(96, 96)}
