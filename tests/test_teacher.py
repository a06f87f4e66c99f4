"""Supervised training (teacher and the "Student" baseline) and evaluation on a tiny paired set."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_brightened_pairs
from d4ir.distill.evaluate import evaluate_model
from d4ir.distill.registry import load_model
from d4ir.distill.teacher import SupervisedConfig, train_supervised
from d4ir.shards.pairs import find_pairs
from d4ir.shards.state import load_state, save_state


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_brightened_pairs(tmp_path_factory.mktemp("pairs"), 6, (32, 40))


def _config(epochs: int) -> SupervisedConfig:
    kwargs = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=8)
    return SupervisedConfig(arch="airnet", arch_kwargs=kwargs, epochs=epochs, iters_per_epoch=3, batch_size=2,
                            crop=16, lr=1e-3, seed=0)


def test_training_writes_files_and_resume_is_exact(pairs: Path, tmp_path: Path):
    straight = tmp_path / "straight"
    result = train_supervised(pairs, straight, _config(2), val_dir=pairs, progress=False)
    assert {"teacher.safetensors", "teacher.json", "train.jsonl", "state.pt"} <= {p.name for p in straight.iterdir()}
    log = [json.loads(x) for x in (straight / "train.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "val_psnr" in log[0]
    assert result.metrics["psnr"] == pytest.approx(log[-1]["val_psnr"])
    assert result.weights == straight / "teacher.safetensors" and result.epochs == 2

    # "killed" after epoch 1 of a 2-epoch run: the epoch count may grow on resume, nothing else depends on it
    resumed = tmp_path / "resumed"
    train_supervised(pairs, resumed, _config(1), progress=False)
    train_supervised(pairs, resumed, _config(2), resume=True, progress=False)
    assert [json.loads(x)["epoch"] for x in (resumed / "train.jsonl").read_text().splitlines()] == [1, 2]
    a, _ = load_model(straight / "teacher.safetensors")
    b, _ = load_model(resumed / "teacher.safetensors")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("written_with", [{"encoder_first": 8}, {}], ids=["config-passes-it", "config-without-it"])
def test_states_with_airnets_encoder_first_resume(pairs: Path, tmp_path: Path, written_with: dict):
    """AirNet's encoder_first is derived from n_feats now: a state whose settings carry it (an older d4ir) resumes
    with a config without it, and a config that still passes it resumes its own state."""
    config = _config(1)
    train_supervised(pairs, tmp_path, replace(config, arch_kwargs={**config.arch_kwargs, "encoder_first": 8}),
                     progress=False)
    state = load_state(tmp_path / "state.pt")
    save_state(tmp_path / "state.pt", state | {"settings": state["settings"] | {
        "arch_kwargs": {**config.arch_kwargs, "encoder_first": 8}}})
    again = replace(config, epochs=2, arch_kwargs={**config.arch_kwargs, **written_with})
    train_supervised(pairs, tmp_path, again, resume=True, progress=False)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "train.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_another_config(pairs: Path, tmp_path: Path):
    train_supervised(pairs, tmp_path, _config(1), progress=False)
    other = replace(_config(1), lr=5e-4)
    with pytest.raises(ValueError, match="other settings.*lr"):
        train_supervised(pairs, tmp_path, other, resume=True, progress=False)


def test_identity_evaluation_matches_hand_computed_psnr(pairs: Path):
    result = evaluate_model(None, find_pairs(pairs), progress=False)
    assert result["count"] == 6 and result["params"] == 0
    # degraded = clean + 40 levels everywhere (clean < 200, so nothing clips): MSE = (40/255)^2
    assert result["mean"]["psnr"] == pytest.approx(-10 * np.log10((40 / 255) ** 2), abs=1e-6)
    assert set(result["images"][0]) >= {"name", "psnr", "ssim", "psnr_y", "ssim_y"}
