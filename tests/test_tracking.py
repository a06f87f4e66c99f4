"""Experiment tracking (shards/tracking.py): with --tensorboard DIR every stage writes TensorBoard event files
beside its train.jsonl, read back here: the records' losses, learning rates and validation PSNR as scalars at their
steps, and the first samples of each shard round as an image. Skipped only when tensorboard cannot be imported."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli
from conftest import PROMPTS, synth_config
from d4ir.distill.trainer import DistillConfig, distill
from d4ir.shards.io import read_jsonl
from d4ir.shards.tracking import set_tracking
from d4ir.synth.prompts import train_prompts
from d4ir.synth.sd import load_sd_cached
from d4ir.synth.worker import synthesize
from PIL import Image

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=8)
DISTILL = DistillConfig(student="half", batch_size=2, crop=16, iters_per_epoch=2, feedback_batch=1, num_workers=0,
                        epochs=2, joint_epochs=1, round_every=1)


@pytest.fixture(autouse=True)
def _no_tracking_after():
    yield
    set_tracking(None)  # the process-wide setting must not leak into other tests


def _events(folder: Path) -> EventAccumulator:
    assert folder.is_dir() and any(folder.glob("events.out.tfevents.*")), folder
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _same(events: list[tuple[int, float]], records: list[dict], key: str, step: str) -> None:
    assert [s for s, _ in events] == [r[step] for r in records]
    np.testing.assert_allclose([v for _, v in events], [r[key] for r in records], rtol=1e-6)


def test_the_teacher_command_writes_its_records_as_scalars(tiny_run, tmp_path):
    run, tb = tmp_path / "exp", tmp_path / "tb"
    args = ["teacher", "--pairs", tiny_run.original, "--val", tiny_run.val, "--run-dir", run, "--epochs", "2",
            "--iters-per-epoch", "2", "--batch-size", "2", "--crop", "16", "--device", "cpu", "--preset", "demo",
            "--arch-kwargs", ",".join(f"{k}={v}" for k, v in TINY.items()), "--tensorboard", tb]
    done = cli(*args)
    assert done.exit_code == 0, done.output
    records = read_jsonl(run / "teacher" / "train.jsonl")
    acc = _events(tb / "exp" / "teacher")
    assert {"loss", "lr", "seconds", "val_psnr", "val_ssim"} <= set(acc.Tags()["scalars"])
    for key in ("loss", "lr", "val_psnr"):
        _same(_scalars(acc, key), records, key, "epoch")


def test_every_stage_and_every_round_is_tracked(run_copy, tmp_path):
    r, tb = run_copy, tmp_path / "tb"
    set_tracking(tb)
    prompts = tmp_path / "other" / "prompts"
    train_prompts(r.degraded, load_sd_cached("tiny", "cpu", "float32"), prompts, PROMPTS, progress=False)
    acc = _events(tb / "other" / "prompts")
    records = read_jsonl(prompts / "train.jsonl")
    _same(_scalars(acc, "loss"), records, "loss", "step")
    assert _scalars(acc, "lr") == [(rec["step"], pytest.approx(PROMPTS.lr)) for rec in records]

    synthesize(r.clean, tmp_path / "other" / "shards", synth_config(), sd_source="tiny", prompts_dir=prompts,
               progress=False)
    (image,) = _events(tb / "other" / "shards").Images("samples/round-000")
    assert image.step == 0 and Image.open(io.BytesIO(image.encoded_image_string)).size[1] >= 32

    distill(r.root, r.teacher, DISTILL, degraded_dir=r.degraded, clean_dir=r.clean, val_dir=r.val, progress=False)
    student = r.root / "students" / "half-teacher"
    acc = _events(tb / "run" / "students" / "half-teacher")
    records = read_jsonl(student / "train.jsonl")
    for key in ("loss_kd", "loss_fb", "loss_cl", "lr", "val_psnr", "val_ref_psnr"):
        _same(_scalars(acc, key), records, key, "epoch")
    (image,) = _events(tb / "run" / "students" / "half-teacher" / "shards").Images("samples/round-001")
    assert image.step == 1
    assert (student / "train.jsonl").is_file()  # kept: the event files are a view of it


def test_without_tensorboard_the_option_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    done = cli("--tensorboard", tmp_path / "tb", "status", "--run-dir", tmp_path)
    assert done.exit_code == 2 and "pip install 'd4ir[track]'" in done.output, done.output
