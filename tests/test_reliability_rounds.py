"""A round is what its plan says, and only that (docs/reliability.md, cases 12-17): a short shard, a clean folder
changed after round 0, a leftover round of an earlier student run, two takers of a stale lock, a round of
another format version and misnamed folders under a shards root. Each test asserts the exact outcome."""

from __future__ import annotations

import json
import re
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import synth_config
from d4ir.distill.trainer import DistillConfig, distill
from d4ir.pipelines.cli import main
from d4ir.shards.io import atomic_write_json, read_json_object
from d4ir.shards.layout import MANIFEST_FILE
from d4ir.shards.reader import iter_raw_metas
from d4ir.shards.verify import verify_shards
from d4ir.shards.writer import read_manifest, read_stats, write_shard, write_sizes
from d4ir.synth.worker import synthesize

TINY = dict(student="half", batch_size=2, crop=16, iters_per_epoch=2, feedback_batch=1, num_workers=0)
ROUNDS = dict(epochs=2, joint_epochs=2, round_every=1)
DEAD_PID = 2**22 + 12345  # above Linux's largest pid_max: no such process


def _raw(round_dir: Path) -> dict:
    """The manifest as JSON on disk: these tests edit it by hand, as a user or a damaged disk would."""
    return read_json_object(round_dir / MANIFEST_FILE)


def _write_raw(round_dir: Path, manifest: dict) -> None:
    atomic_write_json(round_dir / MANIFEST_FILE, manifest)


def _cfg(**kw) -> DistillConfig:
    return DistillConfig(**{**TINY, **kw})


def _distill(r, cfg, name, clean=None, **kw):
    return distill(r.root, r.teacher, cfg, degraded_dir=r.degraded, clean_dir=clean or r.clean, name=name,
                   progress=False, **kw)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _samples(tar_path) -> list[dict]:
    """The raw samples of a shard, in tar order ({"__key__", field: bytes})."""
    out: dict[str, dict] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            key, _, field = info.name.partition(".")
            out.setdefault(key, {"__key__": key})[field] = tar.extractfile(info).read()
    return list(out.values())


# ------------------------------------------------------------------------- 12. a short shard is never complete
def test_a_short_shard_is_refused_by_verify_and_distill_and_redone_by_synth(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    shards, round0 = r.root / "shards", r.root / "shards" / "round-000"
    original = (round0 / "000001.tar").read_bytes()
    # shard 1 rewritten with 2 of its 4 samples, its stats, sizes.json and the manifest's total made consistent
    write_shard(round0, 1, _samples(round0 / "000001.tar")[:2])
    write_sizes(round0)
    manifest = _raw(round0)
    _write_raw(round0, {**manifest, "images": 6})
    short = "000001.tar: holds 2 samples and 0 failed ones, but its plan has 4: rerun `d4ir synth` to redo it"
    assert verify_shards(round0) == [short]
    result = _cli("shards", "verify", shards)
    assert result.exit_code == 1 and result.output == f"round-000/{short}\n"
    with pytest.raises(ValueError, match=r"round-000 is damaged: 000001\.tar: holds 2 samples"):
        _distill(r, _cfg(epochs=1, joint_epochs=0), "x")
    assert not (r.root / "students" / "x" / "train.jsonl").exists()
    # a round written before the manifest listed its shards' sizes: the plan is its config's
    _write_raw(round0, {k: v for k, v in manifest.items() if k != "shards"} | {"images": 6})
    assert verify_shards(round0) == [short]

    _write_raw(round0, manifest)
    res = synthesize(r.clean, shards, synth_config(), prompts_dir=r.root / "prompts", progress=False)
    assert (res.already_done, res.images) == (1, 4)  # shard 1 redone, shard 0 kept
    assert (round0 / "000001.tar").read_bytes() == original and read_stats(round0, 1).count == 4
    after = read_manifest(round0)
    assert (after.complete, after.images, after.shards) == (True, 8, {"000000.tar": 4, "000001.tar": 4})
    assert verify_shards(round0) == []

    # the manifest's total must agree with the shards
    _write_raw(round0, {**after.to_json(), "images": 7})
    assert verify_shards(round0) == ["manifest.json: images 7, but the shards hold 8"]


# --------------------------------------------------------- 13. a regeneration round is made from round 0's photos
def test_regeneration_uses_exactly_round_0s_clean_photos_or_refuses(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    clean = shutil.copytree(r.clean, tmp_path / "clean")
    shutil.rmtree(r.root / "shards" / "round-000")
    synthesize(clean, r.root / "shards", synth_config(), prompts_dir=r.root / "prompts", progress=False)
    round0 = r.root / "shards" / "round-000"
    photos = sorted(p.name for p in clean.iterdir())
    assert [name for name, _, _ in read_manifest(round0).clean_files] == photos

    shutil.copy(clean / "c0.png", clean / "new.png")  # a photo added later is not part of round 0's plan
    res = _distill(r, _cfg(**ROUNDS), "a", clean=clean)
    round1 = res.student_dir / "shards" / "round-001"
    assert read_manifest(round1).clean_files == read_manifest(round0).clean_files
    assert read_manifest(round1).clean_scan == {"usable": 8}

    def plan(folder):
        return [(m["clean"].rsplit("/", 1)[1], m["prompt_row"], m["seed"]) for i in (0, 1)
                for _, m in iter_raw_metas(folder, i)]

    assert plan(round1) == plan(round0)  # round 0's photos, prompt rows and seeds

    for name in ("c1.png", "c3.png", "c5.png"):
        (clean / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"round 0's clean photos in {clean} changed (3 of 8): c1.png missing, c3.png missing, c5.png missing")):
        _distill(r, _cfg(**ROUNDS), "b", clean=clean)
    assert not (r.root / "students" / "b" / "train.jsonl").exists()
    with pytest.raises(FileNotFoundError, match=re.escape(  # synth checks them again where it draws the plan
            f"the clean photos this round's plan names in {clean} changed (3 of 8): c1.png missing")):
        synthesize(clean, tmp_path / "again", synth_config(), prompts_dir=r.root / "prompts", progress=False,
                   clean_files=read_manifest(round0).clean_files)
    for name in ("c1.png", "c3.png", "c5.png"):
        shutil.copy(r.clean / name, clean / name)
    shutil.copy(r.clean / "c0.png", clean / "c2.png")  # same name, other pixels
    changed = f"round 0's clean photos in {clean} changed (1 of 8): c2.png changed"
    with pytest.raises(ValueError, match=re.escape(changed)):
        _distill(r, _cfg(**ROUNDS), "c", clean=clean)
    assert not (r.root / "students" / "c" / "train.jsonl").exists()


# ----------------------------------------------------------- 14. a leftover round of an earlier student run
def test_a_leftover_round_of_an_earlier_run_is_refused_before_training(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    first = _distill(r, _cfg(**ROUNDS), "x")
    (first.student_dir / "state.pt").unlink()
    log = (first.student_dir / "train.jsonl").read_bytes()
    folder = first.student_dir / "shards"
    with pytest.raises(ValueError, match=re.escape(f"{folder} holds round-001 of an earlier run of student 'x'") +
                       ".*--resume.*" + re.escape(f"another --name, or remove {folder}")):
        _distill(r, _cfg(**ROUNDS, seed=1), "x")
    assert (first.student_dir / "train.jsonl").read_bytes() == log  # no epoch ran
    result = _cli("distill", "--run-dir", r.root, "--teacher", r.teacher, "--name", "x", "--degraded", r.degraded,
                  "--clean", r.clean, "--epochs", 2, "--joint-epochs", 2, "--round-every", 1, "--batch-size", 2,
                  "--crop", 16, "--iters-per-epoch", 2, "--feedback-batch", 1, "--seed", 1)
    assert result.exit_code == 2 and "round-001 of an earlier run of student 'x'" in result.output
    # a run that regenerates nothing trains on round 0 beside them
    assert _distill(r, _cfg(epochs=1, joint_epochs=0), "x").round == 0


# ---------------------------------------------------------------- 15. one taker of a stale lock
def test_two_takers_of_a_stale_lock_never_both_hold_it(tmp_path, monkeypatch):
    import d4ir.shards.io as shards_io

    lock = tmp_path / "synth.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": DEAD_PID}))
    real_alive = shards_io._alive
    a_judging, b_holds, release = threading.Event(), threading.Event(), threading.Event()

    def alive(pid):
        # A has read the dead owner and pauses before taking over: B tries its takeover in this window
        if threading.current_thread().name == "A":
            a_judging.set()
            b_holds.wait(timeout=2)
        return real_alive(pid)

    monkeypatch.setattr(shards_io, "_alive", alive)
    held, busy = [], []

    def take():
        name = threading.current_thread().name
        try:
            with shards_io.folder_lock(lock):
                held.append(name)
                if name == "B":
                    b_holds.set()
                release.wait(timeout=10)
        except shards_io.FolderBusyError:
            busy.append(name)

    a = threading.Thread(target=take, name="A")
    a.start()
    assert a_judging.wait(timeout=10)
    b = threading.Thread(target=take, name="B")
    b.start()
    deadline = time.monotonic() + 15
    while len(held) + len(busy) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    a.join()
    b.join()
    assert (held, busy) == (["A"], ["B"])
    assert not lock.exists()


# ------------------------------------------------------------------- 16. the round format version is read
def test_a_round_of_another_format_version_is_refused_in_one_line(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    round0 = r.root / "shards" / "round-000"
    manifest = _raw(round0)
    _write_raw(round0, {**manifest, "format_version": 1})
    line = "manifest.json: round-000 is a round of format version 1; this d4ir reads version 2: synthesize it again"
    assert verify_shards(round0) == [line]
    assert verify_shards(r.root / "shards") == [f"round-000/{line}"]
    refused = f"{round0} is a round of format version 1; this d4ir reads version 2: synthesize it again"
    with pytest.raises(ValueError, match=re.escape(refused)):
        _distill(r, _cfg(epochs=1, joint_epochs=0), "x")
    result = _cli("distill", "--run-dir", r.root, "--teacher", r.teacher, "--name", "y", "--joint-epochs", 0,
                  "--epochs", 1, "--batch-size", 2, "--crop", 16)
    assert result.exit_code == 2 and result.output == f"d4ir: error: {refused}\n"
    with pytest.raises(ValueError, match=re.escape(refused)):  # nor is it resumed, mixing two formats
        synthesize(r.clean, r.root / "shards", synth_config(), prompts_dir=r.root / "prompts", progress=False)
    _write_raw(round0, {k: v for k, v in manifest.items() if k != "format_version"})
    assert verify_shards(round0) == [
        "manifest.json: round-000 has no format_version (not written by `d4ir synth`); this d4ir reads version 2: "
        "synthesize it again"]


# ------------------------------------------------------------- 17. every folder of a shards root is judged
def test_verify_names_misnamed_folders_of_a_shards_root_once(tiny_run, tmp_path):
    root = shutil.copytree(tiny_run.root / "shards", tmp_path / "shards")
    shutil.copytree(root / "round-000", root / "round-0001")  # not how round 1 is named (round-001)
    shutil.copytree(root / "round-000", root / "backup")
    (root / "round-002").mkdir()
    (root / "notes").mkdir()  # a folder without shards is none of verify's business
    assert verify_shards(root) == [
        "backup: holds shards but is not named round-NNN: no stage reads it; rename it to its round or move it out",
        "round-0001: holds shards but is not named round-NNN: no stage reads it; rename it to its round or move it "
        "out",
        "round-002: not a shard round (no manifest.json, no NNNNNN.tar shards)",
    ]
    (root / "round-002").rmdir()
    shutil.rmtree(root / "round-0001")
    (root / "round-0001").mkdir()  # empty, but named like a round: the user meant one
    result = _cli("shards", "verify", root)
    assert result.exit_code == 1 and result.output.splitlines() == [
        "backup: holds shards but is not named round-NNN: no stage reads it; rename it to its round or move it out",
        "round-0001: named like a round but not round-NNN (round 1 is round-001): no stage reads it",
    ]
