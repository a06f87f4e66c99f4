"""Stage 3 acceptance on the tiny run (tests/conftest.py): the feedback gradient path, shard reuse and its
refusals, exact resume across a regeneration round, the rounds themselves, and the Data/M0 baselines."""

from __future__ import annotations

import dataclasses
import json
import shutil

import d4ir.distill.feedback as feedback_mod
import d4ir.distill.trainer as trainer_mod
import d4ir.synth.worker as worker_mod
import numpy as np
import pytest
import torch
from d4ir.distill.evaluate import evaluate_model
from d4ir.distill.feedback import FeedbackLoop, synth_config_of
from d4ir.distill.losses import parse_weights
from d4ir.distill.registry import build, half_of, load_model
from d4ir.distill.resume import upgrade_state
from d4ir.distill.teachers import load_teacher
from d4ir.distill.trainer import DistillConfig, DistillResult, distill
from d4ir.shards.io import load_weights, read_jsonl, sha256_file, state_dict_sha256
from d4ir.shards.pairs import find_pairs
from d4ir.shards.writer import read_manifest
from d4ir.synth.embed import EncoderTraining, load_prompt_encoder
from d4ir.synth.sd import build_tiny_sd, load_sd_cached, save_sd

# Tiny steps everywhere: 16x16 crops, batches of 2, one feedback image per step.
TINY = dict(student="half", batch_size=2, crop=16, iters_per_epoch=2, feedback_batch=1, num_workers=0)


def _cfg(**kw) -> DistillConfig:
    return DistillConfig(**{**TINY, **kw})


def _run(r, cfg: DistillConfig, name: str, **kw) -> DistillResult:
    return distill(r.root, r.teacher, cfg, degraded_dir=r.degraded, clean_dir=r.clean, name=name, progress=False,
                   **kw)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _file_states(folder) -> dict[str, tuple[str, int]]:
    """path -> (sha256, mtime_ns) of every file under `folder`."""
    return {str(p): (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_schedule_helpers():
    cfg = _cfg(epochs=6, joint_epochs=4, round_every=2)
    assert [cfg.round_for_epoch(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]  # no round after the joint phase
    assert _cfg(epochs=6, joint_epochs=4, round_every=0).round_for_epoch(5) == 0
    assert _cfg(data="web", round_every=1).round_for_epoch(5) == 0
    assert DistillConfig().lr_halve_every == 15
    assert half_of({"arch": "airnet", "kwargs": {"n_feats": 64}}) == ("airnet", {"n_feats": 32})
    # kwargs of a checkpoint written when AirNet took encoder_first: dropped, E_pre follows n_feats
    assert half_of({"arch": "airnet", "kwargs": {"n_feats": 64, "encoder_first": 64}}) == ("airnet", {"n_feats": 32})
    assert half_of({"arch": "restormer", "kwargs": {"dim": 48}}) == ("restormer", {"dim": 24})


def test_older_states_in_this_versions_form(tmp_path):
    """What an older d4ir wrote in a stage-3 state: the adversarial source under 'generator', an AirNet student's
    encoder_first in student_kwargs, the teacher by path; `upgrade_state` gives this version's form."""
    teacher = tmp_path / "teacher.pth"
    teacher.write_bytes(b"weights")
    old = {"settings": {"student_kwargs": {"n_feats": 8, "encoder_first": 8}, "teacher": str(teacher)},
           "objects": {"student": {}, "generator": {"epoch": 1}}, "epoch": 1}
    new = upgrade_state(old)
    assert new["objects"] == {"student": {}, "adversarial": {"epoch": 1}} and new["epoch"] == 1
    assert new["settings"] == {"student_kwargs": {"n_feats": 8}, "teacher_sha256": sha256_file(teacher)}
    assert upgrade_state(new) == new
    odd = {"settings": {"student_kwargs": {"n_feats": 8, "encoder_first": 4}}, "objects": {}}
    assert upgrade_state(odd)["settings"] == odd["settings"]  # kept: AirNet refuses it, naming both widths


# ------------------------------------------------------------------------------------ 1. gradient path
def test_feedback_loss_reaches_encoder_not_sd(tiny_run):
    """One backward of the surrogate's L_kd: the prompt encoder gets gradients, no SD, teacher or
    momentum-encoder parameter does (they are frozen and stay without .grad)."""
    r = tiny_run
    parts = load_sd_cached("tiny", "cpu", "float32")
    ccd = synth_config_of(read_manifest(r.root / "shards" / "round-000")).ccd
    loop = FeedbackLoop(r.root / "prompts", parts, r.degraded, r.clean, ccd)
    assert loop.training.crop == 16 and loop.training.moco.queue_size == 4  # stage 1's crop and MoCo settings
    teacher, info = load_model(r.teacher)
    teacher.requires_grad_(False)
    arch, kwargs = half_of(info)
    student = build(arch, **kwargs).train()
    rng = np.random.default_rng(0)
    loss = loop.feedback_loss(student, teacher, rng, 2, parse_weights("l2"), "cpu")
    assert loss.ndim == 0 and float(loss.detach()) > 0
    loss.backward()
    grads = {k: p.grad for k, p in loop.encoder.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values()), "no encoder parameter got a gradient"
    for module in (parts.unet, parts.vae, teacher, loop.key_encoder):
        assert all(p.grad is None for p in module.parameters())
        assert not any(p.requires_grad for p in module.parameters())


def test_joint_step_with_gamma_zero_moves_encoder_only(run_copy, monkeypatch):
    """gamma = 0 turns L_cl off: the encoder must still change (L_kd through `feedback_surrogate`), while the
    frozen SD (vae, unet) and the teacher keep every weight."""
    r = run_copy
    parts = load_sd_cached("tiny", "cpu", "float32")  # the trainer gets this very object from the cache
    sd_before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in (("vae", parts.vae),
                                                                                   ("unet", parts.unet))}
    teachers = []

    def spy_load(path, *a, **kw):
        model, info = load_teacher(path, *a, **kw)
        teachers.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model, info

    monkeypatch.setattr(trainer_mod, "load_teacher", spy_load)
    _run(r, _cfg(epochs=1, joint_epochs=1, round_every=0, gamma=0.0, iters_per_epoch=1), "g0")

    start = load_prompt_encoder(r.root / "prompts")
    after, _ = load_weights(r.root / "students" / "g0" / "prompt_encoder")
    moved = [k for k, v in _params(start).items() if not torch.equal(v, after[k])]
    assert moved, "L_kd alone did not move the prompt encoder"
    for name, module in (("vae", parts.vae), ("unet", parts.unet)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, sd_before[name][k]), f"SD {name} weight {k} changed"
    (teacher, t_before), = teachers
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    rec = read_jsonl(r.root / "students" / "g0" / "train.jsonl")[0]
    assert rec["joint"] and rec["loss_cl"] == 0.0 and rec["loss_fb"] > 0


# ------------------------------------------------------------------------------------------- 2. reuse
def test_second_students_reuse_shards_untouched(run_copy, monkeypatch):
    r = run_copy
    before = _file_states(r.root / "shards")

    def no_synth(*a, **kw):
        raise AssertionError("a reuse run must not synthesize")

    monkeypatch.setattr(worker_mod, "synthesize", no_synth)
    monkeypatch.setattr(feedback_mod, "synthesize", no_synth)
    narrow = dict(n_feats=6, n_groups=1, n_blocks=1, queue_size=16)
    res = _run(r, _cfg(student="airnet", student_kwargs=narrow, round=0, epochs=1), "narrow")
    assert res.round == 0
    # the joint phase on without a round pinned, but no regeneration due: the encoder trains, no synthesis
    res = _run(r, _cfg(epochs=1, joint_epochs=1, round_every=0), "joint")
    assert res.round == 0
    for name, n_feats in (("narrow", 6), ("joint", 4)):
        student, info = load_model(r.root / "students" / name / "student")
        assert info["kwargs"]["n_feats"] == n_feats
    assert _file_states(r.root / "shards") == before
    assert sorted(p.name for p in (r.root / "shards").iterdir()) == ["round-000"]


def test_refuses_shards_of_another_sd(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    other = save_sd(build_tiny_sd(1), tmp_path / "other-sd")  # same layout, other weights
    with pytest.raises(ValueError, match=r"synthesized by SD 'tiny' \(fingerprint .*\), but this run loads .*other-sd"):
        _run(r, _cfg(round=0, epochs=1), "x", sd_source=str(other))
    res = _run(r, _cfg(round=0, epochs=1, iters_per_epoch=1), "y", sd_source="tiny")  # the same model: accepted
    assert res.round == 0


def test_refuses_round0_of_another_encoder(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    path = r.root / "shards" / "round-000" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "encoder_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="encoder_sha256"):
        _run(r, _cfg(epochs=1, joint_epochs=0), "x")


def test_incomplete_round_is_passed_over_or_refused(run_copy, monkeypatch):
    """A regeneration killed half-way leaves round-001 with a manifest marked incomplete: a new student
    trains on the newest finished round, and pinning the broken round is a clear error."""
    r = run_copy
    shards = r.root / "shards"
    shutil.copytree(shards / "round-000", shards / "round-001")
    manifest = read_manifest(shards / "round-001")
    (shards / "round-001" / "manifest.json").write_text(json.dumps({**manifest.to_json(), "complete": False}))
    (shards / "round-001" / "000001.stats.json").unlink()  # its second shard never finished
    res = _run(r, _cfg(epochs=1, joint_epochs=0), "x")
    assert res.round == 0
    with pytest.raises(ValueError, match="round 1 .* is incomplete"):
        _run(r, _cfg(epochs=1, round=1), "y")


def test_joint_phase_needs_web_folders(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    with pytest.raises(ValueError, match="joint phase needs the web folders"):
        distill(r.root, r.teacher, _cfg(epochs=1, joint_epochs=1), progress=False)


# ----------------------------------------------------------------------- 3. resume, 4. regeneration
ROUNDS = dict(epochs=3, joint_epochs=2, round_every=1, iters_per_epoch=2)


@pytest.fixture(scope="module")
def straight(tiny_run, tmp_path_factory):
    """Run A: 3 epochs straight, regenerating before epochs 2 and 3 (rounds 1 and 2)."""
    r = tiny_run.copy_to(tmp_path_factory.mktemp("straight") / "run")
    _run(r, _cfg(**ROUNDS), "s")
    return r


class _Killed(Exception):
    pass


@pytest.mark.parametrize("killed_after", [1, 2])
def test_resume_continues_exactly(straight, run_copy, monkeypatch, killed_after):
    """Killed at the start of an epoch that first regenerates a round (after epoch 1: inside the joint phase,
    so the MoCo queue, key encoder and encoder optimizer must come back too; after epoch 2: just before the
    last round), a resumed run ends bit-equal to the straight one."""
    r = run_copy
    real = trainer_mod.DistillConfig.round_for_epoch

    def kill(cfg, epoch):
        if epoch == killed_after:
            raise _Killed
        return real(cfg, epoch)

    monkeypatch.setattr(trainer_mod.DistillConfig, "round_for_epoch", kill)
    with pytest.raises(_Killed):
        _run(r, _cfg(**ROUNDS), "s")
    out = r.root / "students" / "s"
    assert [rec["epoch"] for rec in read_jsonl(out / "train.jsonl")] == list(range(1, killed_after + 1))
    assert not (out / "shards" / f"round-{killed_after:03d}").exists()
    monkeypatch.setattr(trainer_mod.DistillConfig, "round_for_epoch", real)
    res = _run(r, _cfg(**ROUNDS), "s", resume=True)
    assert res.round == 2

    want, _ = load_weights(straight.root / "students" / "s" / "student")
    got, _ = load_weights(out / "student")
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed student differs from the straight run"
    assert state_dict_sha256(load_weights(out / "prompt_encoder")[0]) == state_dict_sha256(
        load_weights(straight.root / "students" / "s" / "prompt_encoder")[0])
    keys = ("epoch", "round", "loss_kd", "loss_fb", "loss_cl")
    strip = [{k: rec[k] for k in keys} for rec in read_jsonl(out / "train.jsonl")]
    assert strip == [{k: rec[k] for k in keys} for rec in read_jsonl(straight.root / "students" / "s" / "train.jsonl")]


def test_regeneration_rounds(straight):
    r = straight
    base = read_manifest(r.root / "shards" / "round-000")
    hashes = [base.provenance.encoder_sha256]
    student = r.root / "students" / "s"
    assert sorted(p.name for p in (r.root / "shards").iterdir()) == ["round-000"]  # the rounds are the student's
    for n in (1, 2):
        m = read_manifest(student / "shards" / f"round-{n:03d}")
        assert m.complete and m.round == n and m.images == base.images
        assert m.dtype == base.dtype and m.clean_dir == base.clean_dir and m.provenance.sd == base.provenance.sd
        enc = load_weights(student / "prompts" / f"round-{n:03d}" / "prompt_encoder")[0]
        assert m.provenance.encoder_sha256 == state_dict_sha256(enc)  # the KD-updated encoder of that round
        hashes.append(m.provenance.encoder_sha256)
    assert len(set(hashes)) == 3, "each round must be made by a different (further trained) encoder"
    # every prompt encoder's training record has one shape: stage 1's, with the round that wrote it
    stage1 = json.loads((r.root / "prompts" / "prompt_encoder.json").read_text())["training"]
    for n, folder in ((1, student / "prompts" / "round-001"), (2, student / "prompts" / "round-002"), (2, student)):
        record = json.loads((folder / "prompt_encoder.json").read_text())["training"]
        assert record == stage1 | {"round": n}
        assert EncoderTraining.read(folder) == dataclasses.replace(EncoderTraining.read(r.root / "prompts"), round=n)
    # the joint phase ends with epoch 2, so the final encoder is the one that made round 2
    assert state_dict_sha256(load_weights(r.root / "students" / "s" / "prompt_encoder")[0]) == hashes[2]
    log = read_jsonl(r.root / "students" / "s" / "train.jsonl")
    assert [(rec["round"], rec["joint"]) for rec in log] == [(0, True), (1, True), (2, False)]
    assert json.loads((r.root / "students" / "s" / "config.json").read_text())["round"] == 2


# ---------------------------------------------------------------------------------------- 5. baselines
@pytest.mark.parametrize("data", ["original", "web"])
def test_baselines_improve_on_untrained(tiny_run, tmp_path, data):
    r = tiny_run.copy_to(tmp_path / "run")
    kw = dict(original_dir=r.original, val_dir=r.val)
    cfg = _cfg(data=data, joint_epochs=0, iters_per_epoch=6, batch_size=4, lr=2e-3)
    _run(r, dataclasses.replace(cfg, epochs=0), "untrained", **kw)  # no step: the initial student
    res = _run(r, dataclasses.replace(cfg, epochs=2), "trained", **kw)
    out = r.root / "students" / "trained"
    assert (out / "student.safetensors").is_file() and res.round is None
    before = json.loads((r.root / "students" / "untrained" / "eval.json").read_text())["mean"]["ref_psnr"]
    student, _ = load_model(out / "student")
    teacher, _ = load_model(r.teacher)
    after = evaluate_model(student, find_pairs(r.val), reference=teacher, progress=False)["mean"]["ref_psnr"]
    assert after == pytest.approx(json.loads((out / "eval.json").read_text())["mean"]["ref_psnr"], abs=1e-6)
    assert after > before + 1.0, f"{data}: PSNR vs teacher {before:.2f} -> {after:.2f} dB"


@pytest.mark.parametrize("data", ["original", "web"])
def test_cli_baselines_write_students(tiny_run, tmp_path, data):
    from click.testing import CliRunner
    from d4ir.pipelines.cli import main

    r = tiny_run.copy_to(tmp_path / "run")
    source = ["--original", str(r.original)] if data == "original" else ["--degraded", str(r.degraded)]
    args = ["distill", "--run-dir", str(r.root), "--teacher", str(r.teacher), "--data", data, *source, "--epochs", "1",
            "--joint-epochs", "0", "--iters-per-epoch", "1", "--batch-size", "2", "--crop", "16", "--device", "cpu",
            "--name", f"cli-{data}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = r.root / "students" / f"cli-{data}"
    assert load_model(out / "student")[1]["kwargs"]["n_feats"] == 4  # "half" of the 8-wide teacher
    assert json.loads((out / "config.json").read_text())["data"] == data
    assert not (r.root / "shards" / "round-001").exists()


def test_bench_smoke(tmp_path, capsys):
    """bench/distill.py end to end at toy size: its own shards, both sources timed, the table and the JSON."""
    import importlib

    bench = importlib.import_module("distill")  # bench/distill.py: pytest puts bench/ on the path
    out = tmp_path / "bench.json"
    res = bench.main(["--device", "cpu", "--crop", "32", "--batch-size", "2", "--steps", "2", "--blocks", "1",
                      "--warmup", "1", "--num-workers", "0", "--shard-images", "4", "--json-out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["student"] == "restormer-12" and set(res["step_s"]) == {"memory", "shards"}
    assert res["ratio"] == pytest.approx(res["step_s"]["shards"] / res["step_s"]["memory"])
    assert "shards / memory" in capsys.readouterr().out


def test_bad_data_source(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="data must be one of"):
        _run(tiny_run.copy_to(tmp_path / "run"), _cfg(data="imagenet"), "x")


def test_a_round_with_fewer_shards_than_ranks_x_workers_adapts_or_refuses(tiny_run, caplog):
    """Each DataLoader worker of each rank needs a shard of its own: fewer workers are used, with a warning, and
    more ranks than shards is refused before training."""
    import logging

    from d4ir.distill.sources import ShardBatches
    from d4ir.shards.layout import RunLayout, rounds_in
    from d4ir.shards.reader import shard_urls

    round0 = RunLayout(tiny_run.root).round_shards(rounds_in(RunLayout(tiny_run.root).shards)[0])
    shards = len(shard_urls(round0))
    cfg = DistillConfig(student="half", batch_size=2, crop=16, num_workers=shards + 3)
    with caplog.at_level(logging.WARNING, logger="d4ir.distill.sources"):
        batches = ShardBatches(round0, cfg)
    assert batches.loader.num_workers == shards
    assert f"{shards} shards for 1 ranks x {shards + 3} DataLoader workers: using {shards} workers" in caplog.text
    with pytest.raises(ValueError, match=f"{shards} usable shards in .* cannot feed {shards + 1} ranks"):
        ShardBatches(round0, cfg, world=shards + 1)
