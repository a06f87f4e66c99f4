"""An audit of issue 11's result (docs/reliability.md, rows 12 and up): bad links in a paired set, a state that
loads safely but is not what its stage wrote, unexpected exceptions, weights files, minor one-line errors and a
resume through another path. 16-bit TIFF (row 13) is in test_reliability_images.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, one_line_error
from d4ir.shards.io import read_jsonl

DISTILL = ["--data", "web", "--joint-epochs", "0", "--batch-size", "2", "--crop", "16", "--iters-per-epoch", "1",
           "--num-workers", "0", "--name", "x"]




def _edit_state(path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


# -------------------------------------------- 12. bad links in a paired set are counted skips, not an abort
def _bad_pairs(src, dest):
    """A copy of the val set (v0-v5) whose degraded v0 is a FIFO, clean v1 a dangling link, clean v2 a link loop,
    and degraded v5 is gone (its clean file has no partner)."""
    import os

    val = shutil.copytree(src, dest)
    (val / "degraded" / "v0.png").unlink()
    os.mkfifo(val / "degraded" / "v0.png")
    (val / "clean" / "v1.png").unlink()
    (val / "clean" / "v1.png").symlink_to(val / "clean" / "gone.png")
    (val / "clean" / "v2.png").unlink()
    (val / "clean" / "v2.png").symlink_to(val / "clean" / "v2.png")
    (val / "degraded" / "v5.png").unlink()
    return val


SKIPPED = [["v0", "degraded/v0.png: not a regular file"], ["v1", "clean/v1.png: dangling symlink"],
           ["v2", "clean/v2.png: symlink loop"], ["v5", "clean/v5.png: no degraded partner"]]


def test_bad_links_in_a_paired_set_are_counted_skips_shown_by_every_command(tiny_run, tmp_path):
    import json

    from d4ir.shards.pairs import find_pairs

    val = _bad_pairs(tiny_run.val, tmp_path / "val")
    pairs = find_pairs(val)
    assert [p.name for p in pairs] == ["v3", "v4"] and [list(s) for s in pairs.skipped] == SKIPPED
    shown = (f"skipped: {val}: 2 usable pair(s), 4 skipped (v0: degraded/v0.png: not a regular file; v1: "
             "clean/v1.png: dangling symlink; v2: clean/v2.png: symlink loop; v5: clean/v5.png: no degraded partner)")

    result = cli("eval", "--model", "identity", "--pairs", val, "--out", tmp_path / "e.json")
    assert result.exit_code == 0 and shown in result.output, result.output
    written = json.loads((tmp_path / "e.json").read_text())
    assert (written["count"], written["skipped"]) == (2, SKIPPED)

    result = cli("teacher", "--pairs", val, "--out", tmp_path / "t", "--epochs", "1", "--crop", "16", "--batch-size",
                  "2", "--iters-per-epoch", "1", "--arch-kwargs", "n_feats=8,n_groups=1,n_blocks=1,"
                  "queue_size=8")
    assert result.exit_code == 0 and shown in result.output, result.output

    r = tiny_run.copy_to(tmp_path / "run")
    result = cli("distill", "--run-dir", r.root, "--teacher", r.teacher, "--degraded", r.degraded, *DISTILL,
                  "--epochs", 1, "--val", val)
    assert result.exit_code == 0 and shown in result.output, result.output
    assert json.loads((r.root / "students" / "x" / "eval.json").read_text())["skipped"] == SKIPPED

    original = _bad_pairs(tiny_run.val, tmp_path / "original")  # the same damage, read as --original
    result = cli("distill", "--run-dir", r.root, "--teacher", r.teacher, "--original", original, "--data",
                  "original", *DISTILL[2:], "--name", "o", "--epochs", 1)
    assert result.exit_code == 0, result.output
    assert f"skipped: {original / 'degraded'}: 4 usable, skipped: 1 not a regular file" in result.output

    for p in (val / "degraded").iterdir():
        p.unlink()
    one_line_error(cli("eval", "--model", "identity", "--pairs", val), f"{val}: no usable pair (6 skipped: ")


# ------------------------------------------------------------------ 14. a malformed state is one line
@pytest.mark.parametrize("key, edit", [
    ("'torch_rng'", lambda s: s.update(torch_rng=torch.zeros(3))),
    ("'objects'", lambda s: s.pop("objects")),
    ("'epoch'", lambda s: s.update(epoch="one")),
    ("'objects.student'", lambda s: s["objects"]["student"].update({k: torch.zeros(1) for k in
                                                                    list(s["objects"]["student"])[:1]})),
    ("'rng'", lambda s: s.update(rng={"bit_generator": "none of numpy's"})),
    ("'extra.round'", lambda s: s["extra"].update(round="two")),
])
def test_a_malformed_distill_state_is_one_line_naming_the_file_and_the_key(tiny_run, tmp_path, key, edit):
    r = tiny_run.copy_to(tmp_path / "run")
    args = ["distill", "--run-dir", r.root, "--teacher", r.teacher, "--degraded", r.degraded, *DISTILL]
    assert cli(*args, "--epochs", 1).exit_code == 0
    state = r.root / "students" / "x" / "state.pt"
    _edit_state(state, edit)
    one_line_error(cli(*args, "--epochs", 2, "--resume"), str(state), "malformed training state", key)


def test_a_malformed_prompts_or_teacher_state_is_one_line_naming_the_file_and_the_key(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    state = r.root / "prompts" / "state.pt"
    prompts = ["prompts", "--run-dir", r.root, "--degraded", r.degraded, "--sd", "tiny", "--resume", "--steps", "3",
               "--batch-size", "4", "--crop", "16", "--prompt-tokens", "4", "--feat-dim", "8", "--widths", "4,8,8",
               "--token-rank", "4", "--queue-size", "4", "--embed-side", "32"]
    saved = state.read_bytes()
    _edit_state(state, lambda s: s.pop("query"))
    one_line_error(cli(*prompts), str(state), "malformed training state", "'query'")
    state.write_bytes(saved)
    _edit_state(state, lambda s: s.update(query={"no such weight": torch.zeros(1)}))
    one_line_error(cli(*prompts), str(state), "'query' cannot be restored")

    teacher = ["teacher", "--pairs", r.val, "--out", tmp_path / "t", "--epochs", "1", "--crop", "16", "--batch-size",
               "2", "--iters-per-epoch", "1", "--arch-kwargs", "n_feats=8,n_groups=1,n_blocks=1,"
               "queue_size=8"]
    assert cli(*teacher).exit_code == 0
    _edit_state(tmp_path / "t" / "state.pt", lambda s: s["objects"].pop("optimizer"))
    one_line_error(cli(*teacher[:-2], "--epochs", "2", *teacher[-2:], "--resume"), str(tmp_path / "t" / "state.pt"),
                    "'objects.optimizer'")


def test_unexpected_exceptions_keep_their_traceback(tiny_run, tmp_path, monkeypatch):
    import d4ir.distill.evaluate as evaluate_mod

    for bug in (KeyError("objects"), RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")):
        def broken(*args, bug=bug, **kwargs):
            raise bug

        monkeypatch.setattr(evaluate_mod, "evaluate", broken)
        result = cli("eval", "--model", "identity", "--pairs", tiny_run.val)
        assert result.exit_code == 1 and result.exception is bug and "d4ir: error" not in result.output
    # the project's own KeyError kind (an unknown name) stays one line
    one_line_error(cli("teacher", "--pairs", tiny_run.val, "--out", tmp_path / "t", "--arch", "nope"),
                    "unknown architecture 'nope'")


# ------------------------------------------------------- 18. a resume through another path to the same folder
def test_prompts_resume_names_the_same_folder_by_another_path(tiny_run, tmp_path, monkeypatch):
    from dataclasses import replace

    from conftest import PROMPTS
    from d4ir.synth.prompts import train_prompts
    from d4ir.synth.sd import load_sd_cached

    sd = load_sd_cached("tiny", "cpu", "float32")
    out = tmp_path / "prompts"
    train_prompts(tiny_run.degraded.resolve(), sd, out, replace(PROMPTS, steps=1), progress=False)
    monkeypatch.chdir(tiny_run.degraded.parent)
    (tmp_path / "link").symlink_to(tiny_run.degraded.parent)
    for i, degraded in enumerate((Path(tiny_run.degraded.name), tmp_path / "link" / tiny_run.degraded.name)):
        result = train_prompts(degraded, sd, out, replace(PROMPTS, steps=2 + i), resume=True, progress=False)
        assert result.num_images == 8
        assert [r["step"] for r in read_jsonl(out / "train.jsonl")] == list(range(1, 3 + i))


# --------------------------------------------- 16. weights: fsynced before the rename, usual mode, hash checked
def test_weights_are_fsynced_renamed_with_the_usual_mode_and_their_hash_is_checked(tiny_run, tmp_path, monkeypatch):
    import os
    import stat

    from d4ir.shards.io import load_weights, save_weights

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), replace(a, b))[1])
    weights = save_weights(tmp_path / "m", {"w": torch.arange(6.0).reshape(2, 3)}, {"arch": "x"})
    monkeypatch.undo()
    tmp = f"{weights}.tmp"
    assert events[:2] == [("fsync", tmp), ("replace", tmp)]
    umask = os.umask(0)
    os.umask(umask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (weights, tmp_path / "m.json")}
    assert modes == {0o666 & ~umask} and not (tmp_path / "m.safetensors.tmp").exists()

    assert load_weights(tmp_path / "m")[0]["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last float: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m\.safetensors: its tensors do not match the sha256 recorded in m\.json"):
        load_weights(tmp_path / "m")
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_run.teacher.parent, teacher)
    data = bytearray((teacher / "teacher.safetensors").read_bytes())
    data[-1] ^= 0x01
    (teacher / "teacher.safetensors").write_bytes(bytes(data))
    one_line_error(cli("eval", "--model", teacher / "teacher.safetensors", "--pairs", tiny_run.val),
                    str(teacher / "teacher.safetensors"), "do not match the sha256 recorded in teacher.json")


# ------------------------------------------------------ 17. minor one-line errors name the folder or option
def test_minor_errors_name_the_folder_and_its_counts_or_the_option(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    web = tmp_path / "web"
    web.mkdir()
    for i in range(3):
        (web / f"e{i}.png").write_bytes(b"")
    (web / "notes.txt").write_text("not a photo")
    one_line_error(cli("distill", "--run-dir", r.root, "--teacher", r.teacher, "--degraded", web, *DISTILL,
                         "--epochs", 1),
                    f"{web}: no usable image to train on (0 usable, skipped: 3 zero bytes, 1 not an image)")
    distill = ["distill", "--run-dir", r.root, "--teacher", r.teacher, "--degraded", r.degraded, *DISTILL]
    for args, text in (
        ([*distill, "--lr", "-1"], "lr (--lr) must be a finite number > 0, got -1.0"),  # was Adam's, naming no option
        ([*distill, "--encoder-lr", "nan"],
         "encoder_lr (--encoder-lr) must be a finite number >= 0, got nan"),
        (["teacher", "--pairs", r.val, "--out", tmp_path / "t", "--lr", "inf"],
         "lr (--lr) must be a finite number > 0, got inf"),
        (["prompts", "--run-dir", r.root, "--degraded", r.degraded, "--sd", "tiny", "--lr", "0"],
         "PromptsConfig.lr (--lr) must be a finite number > 0, got 0.0"),
    ):
        result = cli(*args)
        assert result.exit_code == 2 and text in result.output, result.output
    assert not (tmp_path / "t").exists()
