"""Nothing lost, nothing silently wrong, nothing executed (docs/reliability.md): one test per class of failure
a hostile but realistic user finds, each asserting the exact outcome. Classes 2 (sampler errors fail the shard)
and 11 (the image reader's rules) are in test_synth_faults.py and test_reliability_images.py."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import d4ir.distill.epochs as epochs_mod
import numpy as np
import pytest
import torch
from cli_helpers import cli, one_line_error
from click.testing import CliRunner
from d4ir.distill.trainer import DistillConfig, distill
from d4ir.pipelines.cli import main
from d4ir.shards.io import read_jsonl
from d4ir.shards.verify import verify_shards
from d4ir.shards.writer import read_manifest, write_shard
from PIL import Image

TINY = dict(student="half", batch_size=2, crop=16, iters_per_epoch=2, feedback_batch=1, num_workers=0)


def _cfg(**kw) -> DistillConfig:
    return DistillConfig(**{**TINY, **kw})


def _distill(r, cfg, name, **kw):
    return distill(r.root, r.teacher, cfg, degraded_dir=r.degraded, clean_dir=r.clean, name=name, progress=False,
                   **kw)




class _Evil:
    """Unpickling this object runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------- 1. code execution
def test_crafted_pickles_in_every_resumable_file_never_run(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    marker = tmp_path / "pwned"
    pairs = r.val
    cases = {
        "teacher": (r.root / "teacher" / "state.pt",
                    ["teacher", "--pairs", pairs, "--run-dir", r.root, "--resume", "--epochs", "1", "--crop", "16",
                     "--batch-size", "2", "--arch-kwargs",
                     "n_feats=8,n_groups=1,n_blocks=1,queue_size=8"]),
        "prompts": (r.root / "prompts" / "state.pt",
                    ["prompts", "--run-dir", r.root, "--degraded", r.degraded, "--sd", "tiny", "--resume", "--steps",
                     "1", "--batch-size", "4", "--crop", "16", "--prompt-tokens", "4", "--feat-dim", "8", "--widths",
                     "4,8,8", "--token-rank", "4", "--queue-size", "4", "--embed-side", "32"]),
        "distill": (r.root / "students" / "x" / "state.pt",
                    ["distill", "--run-dir", r.root, "--teacher", r.teacher, "--name", "x", "--resume",
                     "--joint-epochs", "0", "--epochs", "1", "--batch-size", "2", "--crop", "16"]),
    }
    for stage, (state, args) in cases.items():
        state.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 1, "step": 1, "payload": _Evil(marker)}, state)
        result = cli(*args)
        one_line_error(result, str(state), "refused")
        assert not marker.exists(), f"{stage}: unpickling ran code"
    # an official-format teacher checkpoint with a payload is refused the same way
    evil = tmp_path / "evil.pth"
    torch.save({"params": _Evil(marker)}, evil)
    one_line_error(cli("eval", "--model", evil, "--pairs", pairs), "evil.pth")
    assert not marker.exists()


# -------------------------------------------------------------------- 3. never train on part of a round
def test_a_damaged_round_is_refused_naming_the_shard_or_skipped_when_asked(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    round0 = r.root / "shards" / "round-000"
    tar = round0 / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:-700])  # truncated by a full disk or a bad copy
    with pytest.raises(ValueError, match=r"round-000 is damaged: 000001.tar: truncated.*--skip-damaged-shards"):
        _distill(r, _cfg(epochs=1, joint_epochs=0, iters_per_epoch=None), "x")
    assert not (r.root / "students" / "x" / "train.jsonl").exists()
    res = _distill(r, _cfg(epochs=1, joint_epochs=0, iters_per_epoch=None, skip_damaged_shards=True), "y")
    rec = read_jsonl(res.student_dir / "train.jsonl")[0]
    assert rec["skipped_shards"] == ["000001.tar"]
    # (stats-less shards read as unfinished: refused the same way)
    (round0 / "000000.stats.json").unlink()
    with pytest.raises(ValueError, match="000000.tar: unfinished"):
        _distill(r, _cfg(epochs=1, joint_epochs=0), "z")


def test_samples_that_fail_to_decode_are_counted_in_the_log(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    round0 = r.root / "shards" / "round-000"
    from d4ir.shards.reader import iter_raw_metas

    metas = list(iter_raw_metas(round0, 1))
    # rewrite shard 1 with the same keys, one sample's PNG broken but its stats consistent (a writer bug upstream)
    samples = [{"__key__": k, "degraded.png": b"not a png" if i == 0 else _png(), "json": m}
               for i, (k, m) in enumerate(metas)]
    write_shard(round0, 1, samples)
    assert verify_shards(round0) == []
    res = _distill(r, _cfg(epochs=1, joint_epochs=0, iters_per_epoch=8, batch_size=2), "x")
    rec = read_jsonl(res.student_dir / "train.jsonl")[0]
    assert rec["decode_errors"] >= 1


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ 4. verify passes complete only
def test_verify_passes_only_complete_rounds(tiny_run, tmp_path):
    good = tiny_run.root / "shards"
    assert verify_shards(good) == [] and cli("shards", "verify", good).exit_code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    pictures = tmp_path / "pictures"
    shutil.copytree(tiny_run.clean, pictures)
    for folder in (empty, pictures):
        result = cli("shards", "verify", folder)
        assert result.exit_code == 1 and "not a shard round" in result.output, result.output
    root = shutil.copytree(good, tmp_path / "shards")
    shutil.copytree(root / "round-000", root / "round-001")
    (root / "round-001" / "000001.tar").write_bytes(b"x")
    problems = verify_shards(root)
    assert problems and all(p.startswith("round-001/") for p in problems)
    (root / "round-000" / "manifest.json").unlink()
    (root / "round-000" / "000000.stats.json").unlink()
    (root / "round-000" / "000000.tar").unlink()
    problems = verify_shards(root / "round-000")
    assert any("manifest.json: missing" in p for p in problems)
    assert cli("shards", "verify", root).exit_code == 1


# ------------------------------------------------------------------------------------ 5. the manifest is the plan
def test_the_manifest_is_the_plan(tiny_run, tmp_path):
    from conftest import synth_config
    from d4ir.shards.io import FolderBusyError
    from d4ir.synth.worker import synthesize

    r = tiny_run.copy_to(tmp_path / "run")
    shards, prompts = r.root / "shards", r.root / "prompts"
    round0 = shards / "round-000"
    (round0 / "manifest.json").unlink()
    with pytest.raises(ValueError, match="holds shards but no manifest.json"):
        synthesize(r.clean, shards, replace(synth_config(), seed=9), prompts_dir=prompts, progress=False)
    assert sorted(p.name for p in round0.iterdir()) == sorted(
        p.name for p in (tiny_run.root / "shards" / "round-000").iterdir() if p.name != "manifest.json")

    # a manifest that disagrees with the samples: shards of seed 0 under the plan of seed 5
    other = tmp_path / "other"
    res = synthesize(r.clean, other, replace(synth_config(), seed=5), prompts_dir=prompts, progress=False)
    for name in ("000000.tar", "000000.stats.json"):
        shutil.copy(tiny_run.root / "shards" / "round-000" / name, res.round_dir / name)
    with pytest.raises(ValueError, match="sample .* does not match the manifest's plan"):
        synthesize(r.clean, other, replace(synth_config(), seed=5), prompts_dir=prompts, progress=False)

    # one writer at a time: a live owner's lock is refused, a killed owner's is taken over
    done = synthesize(r.clean, tmp_path / "locked", synth_config(), prompts_dir=prompts, progress=False)
    lock = done.round_dir / "synth.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
        synthesize(r.clean, tmp_path / "locked", synth_config(), prompts_dir=prompts, progress=False)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 12345}))  # no such process
    again = synthesize(r.clean, tmp_path / "locked", synth_config(), prompts_dir=prompts, progress=False)
    assert again.already_done == again.shards and not lock.exists()


# ----------------------------------------------------------- 6. a regeneration round is made like round 0
def test_regeneration_uses_round_0s_photos_from_any_folder_and_a_missing_one_is_an_error(tiny_run, tmp_path,
                                                                                           monkeypatch):
    r = tiny_run.copy_to(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # started from another folder: the manifest's absolute paths still hold
    res = _distill(r, _cfg(epochs=2, joint_epochs=2, round_every=1), "a")
    base, round1 = read_manifest(r.root / "shards" / "round-000"), read_manifest(res.student_dir / "shards" /
                                                                                  "round-001")
    assert round1.clean_dir == base.clean_dir and Path(base.clean_dir).is_absolute()
    assert round1.dtype == base.dtype and round1.plan_hash != "" and round1.provenance.sd_fingerprint == \
        base.provenance.sd_fingerprint
    moved = shutil.copytree(r.root, tmp_path / "run2")
    manifest = read_manifest(moved / "shards" / "round-000").to_json()
    manifest["clean_dir"] = str(tmp_path / "deleted-photos")
    (moved / "shards" / "round-000" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="deleted-photos, which is gone"):
        distill(moved, r.teacher, _cfg(epochs=2, joint_epochs=2, round_every=1), degraded_dir=r.degraded,
                clean_dir=r.clean, name="b", progress=False)
    assert not (moved / "students" / "b" / "train.jsonl").exists()


# ---------------------------------------------------------------------- 7. a D4IR run owns its rounds
def test_a_second_student_makes_its_own_rounds_and_a_fresh_rerun_names_resume(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    rounds = dict(epochs=2, joint_epochs=2, round_every=1)
    first = _distill(r, _cfg(**rounds), "first")
    owned = {p: p.read_bytes() for p in (first.student_dir / "shards").rglob("*") if p.is_file()}
    second = _distill(r, _cfg(**rounds, seed=1), "second")
    assert [rec["round"] for rec in read_jsonl(second.student_dir / "train.jsonl")] == [0, 1]
    assert (second.student_dir / "shards" / "round-001" / "manifest.json").is_file()
    assert {p: p.read_bytes() for p in owned} == owned  # the first student's rounds are untouched
    assert sorted(p.name for p in (r.root / "shards").iterdir()) == ["round-000"]
    from d4ir.shards.state import StateError

    with pytest.raises(StateError, match="pass --resume"):
        _distill(r, _cfg(**rounds), "first")


# --------------------------------------------------------------------------- 8. inputs checked up front
def test_bad_pairs_are_counted_up_front_and_none_left_is_an_error(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    val = shutil.copytree(r.val, tmp_path / "val")
    (val / "degraded" / "v0.png").write_bytes((val / "degraded" / "v0.png").read_bytes()[:60])  # truncated
    (val / "clean" / "v1.png").write_bytes(b"")  # empty
    res = _distill(r, _cfg(data="web", joint_epochs=0, epochs=1), "x", val_dir=val)
    skipped = json.loads((res.student_dir / "eval.json").read_text())["skipped"]
    assert sorted(n for n, _ in skipped) == ["v0", "v1"]
    assert {n: why for n, why in skipped} == {"v0": "v0.png: truncated", "v1": "v1.png: zero bytes"}

    bad = shutil.copytree(val, tmp_path / "bad")
    for p in (bad / "degraded").iterdir():
        p.write_bytes(b"")
    with pytest.raises(ValueError, match="no usable pair"):
        _distill(r, _cfg(data="web", joint_epochs=0, epochs=1), "y", val_dir=bad)
    assert not (r.root / "students" / "y").exists()  # refused before any work: nothing written
    result = cli("eval", "--model", "identity", "--pairs", val, "--out", tmp_path / "e.json")
    assert result.exit_code == 0 and json.loads((tmp_path / "e.json").read_text())["count"] == 4
    one_line_error(cli("eval", "--model", "identity", "--pairs", bad, "--out", tmp_path / "f.json"),
                    "no usable pair")


def test_a_clean_photo_named_in_another_encoding_is_used(tiny_run, tmp_path):
    from conftest import synth_config
    from d4ir.shards.reader import iter_samples
    from d4ir.synth.worker import synthesize

    clean = shutil.copytree(tiny_run.clean, tmp_path / "clean")
    raw = b"caf\xe9.png"  # Latin-1: not valid UTF-8
    shutil.move(clean / "c0.png", clean / os.fsdecode(raw))
    res = synthesize(clean, tmp_path / "shards", replace(synth_config(), num_samples=16),
                     prompts_dir=tiny_run.root / "prompts", progress=False)
    assert res.failures == 0 and verify_shards(res.round_dir) == []
    names = {os.fsencode(Path(s["meta"]["clean"]).name) for s in iter_samples(res.round_dir)}
    assert raw in names  # stored losslessly (JSON escapes), read back to the same bytes


# ------------------------------------------------------------------------------- 9. one-line failures
def test_expected_failures_are_one_line_and_leave_no_empty_folder(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    one_line_error(cli("eval", "--model", tmp_path / "missing.safetensors", "--pairs", r.val), "missing.safetensors")
    broken = shutil.copytree(r.root / "teacher", tmp_path / "broken")
    weights = broken / "teacher.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    one_line_error(cli("eval", "--model", weights, "--pairs", r.val), "teacher.safetensors", "unreadable")
    one_line_error(cli("distill", "--run-dir", r.root, "--round", 7, "--epochs", 1), "round-007")
    bad_value = cli("distill", "--run-dir", r.root, "--batch-size", 0)
    assert bad_value.exit_code == 2 and "batch_size must be a positive int" in bad_value.output
    fresh = tmp_path / "fresh-run"
    one_line_error(cli("prompts", "--run-dir", fresh, "--degraded", r.degraded, "--sd", tmp_path / "no-sd"), "no-sd")
    assert not fresh.exists()  # a failed start leaves no empty output folder
    debug = CliRunner().invoke(main, ["--debug", "eval", "--model", str(tmp_path / "x.pth"), "--pairs", str(r.val)])
    assert debug.exit_code != 0 and isinstance(debug.exception, FileNotFoundError)  # --debug keeps the traceback


def test_a_full_disk_is_one_line(tiny_run, tmp_path, monkeypatch):
    import errno

    r = tiny_run.copy_to(tmp_path / "run")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    result = cli("synth", "--run-dir", r.root, "--clean", r.clean, "--sd", "tiny", "--round", 3, "--num-samples", 4,
                  "--shard-size", 2, "--batch-size", 2, "--steps", 4, "--size", 32)
    one_line_error(result, "No space left on device")


# --------------------------------------------------------------------------- 10. logs true across resume
@pytest.mark.parametrize("stage", ["distill", "teacher"])
def test_a_kill_between_log_and_state_leaves_one_record_per_epoch(tiny_run, tmp_path, monkeypatch, stage):
    from d4ir.distill.teacher import SupervisedConfig, train_supervised

    r = tiny_run.copy_to(tmp_path / "run")
    real, saved = epochs_mod.save_state, []

    def killed_at_epoch_2(path, state):
        if state["epoch"] == 2 and not saved:
            saved.append(1)
            raise KeyboardInterrupt  # after epoch 2's log record, before its state
        return real(path, state)

    kwargs = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=8)
    config = SupervisedConfig(arch_kwargs=kwargs, epochs=3, iters_per_epoch=1, batch_size=2, crop=16)

    def run(resume):
        if stage == "distill":
            return _distill(r, _cfg(data="web", joint_epochs=0, epochs=3, iters_per_epoch=1), "x", resume=resume)
        return train_supervised(r.val, tmp_path / "t", config, resume=resume, progress=False)

    monkeypatch.setattr(epochs_mod, "save_state", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(False)
    log = (r.root / "students" / "x" if stage == "distill" else tmp_path / "t") / "train.jsonl"
    assert [rec["epoch"] for rec in read_jsonl(log)] == [1, 2]
    run(True)
    assert [rec["epoch"] for rec in read_jsonl(log)] == [1, 2, 3]
