"""distill/registry.py: official-style .pth files in the wrappers of common training code load the same
weights, and the log names the entry they came from."""

from __future__ import annotations

import logging

import pytest
import torch
from d4ir.distill.airnet import AirNet
from d4ir.distill.registry import load_model
from d4ir.distill.restormer import Restormer

WRAPPERS = ("model", "net", "state_dict", "params", "params_ema")


def _tiny(arch: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "airnet":
            return AirNet(n_feats=8, n_groups=1, n_blocks=1, queue_size=5).eval()
        return Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4]).eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["airnet", "restormer"])
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_each_wrapper_unwraps_and_is_named(arch, wrapper, tmp_path, caplog):
    src = _tiny(arch)
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: src.state_dict(), "epoch": 7, "optimizer": {"lr": 1e-3}}, path)
    with caplog.at_level(logging.INFO, logger="d4ir.distill.registry"):
        model, info = load_model(path)
    assert info["arch"] == arch and info["container"] == wrapper and _same(model, src)
    assert f"weights from the checkpoint's '{wrapper}' entry" in caplog.text


@pytest.mark.parametrize("arch", ["airnet", "restormer"])
def test_module_prefix_and_nested_wrappers(arch, tmp_path, caplog):
    src = _tiny(arch)
    ddp = {f"module.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"state_dict": ddp}}, path)
    with caplog.at_level(logging.INFO, logger="d4ir.distill.registry"):
        model, info = load_model(path)
    assert info["container"] == "model/state_dict" and _same(model, src)
    assert "'model/state_dict' entry" in caplog.text and "stripped the 'module.' prefix" in caplog.text
    torch.save(ddp, path)  # a bare DDP state_dict
    model, info = load_model(path)
    assert info["container"] is None and _same(model, src)


def test_basicsr_prefers_params_ema_and_weights_key_chooses(tmp_path, caplog):
    """BasicSR's test default: params_ema when both are present; --weights-key params takes the other, and the
    log names the entry taken either way; a missing entry is one line naming the ones there."""
    ema, raw = _tiny("restormer"), Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                             heads=[1, 2, 2, 4])
    path = tmp_path / "net_g.pth"
    torch.save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="d4ir.distill.registry"):
        model, info = load_model(path)
    assert info["container"] == "params_ema" and _same(model, ema) and not _same(model, raw)
    assert "'params_ema' entry (also present: params; --weights-key chooses)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="d4ir.distill.registry"):
        model, info = load_model(path, weights_key="params")
    assert info["container"] == "params" and _same(model, raw)
    assert "'params' entry, as chosen (also present: params_ema)" in caplog.text
    with pytest.raises(ValueError, match="no 'ema' entry .* entries holding weights: params, params_ema"):
        load_model(path, weights_key="ema")


def test_weights_key_on_the_command_line(tmp_path):
    """`d4ir eval --weights-key params` scores the non-EMA weights (a different PSNR than the default)."""
    import json

    from click.testing import CliRunner
    from d4ir.pipelines.cli import main
    from PIL import Image

    ema = _tiny("restormer")
    raw = Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4])
    path = tmp_path / "net_g.pth"
    torch.save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, path)
    for sub in ("degraded", "clean"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
    Image.new("RGB", (16, 16), (90, 120, 200)).save(tmp_path / "pairs" / "degraded" / "a.png")
    Image.new("RGB", (16, 16), (80, 110, 190)).save(tmp_path / "pairs" / "clean" / "a.png")
    psnr = {}
    for key in ("params", "params_ema"):
        out = tmp_path / f"{key}.json"
        done = CliRunner().invoke(main, ["eval", "--model", str(path), "--weights-key", key, "--pairs",
                                         str(tmp_path / "pairs"), "--out", str(out), "--device", "cpu"])
        assert done.exit_code == 0, done.output
        psnr[key] = json.loads(out.read_text())["mean"]["psnr"]
    from d4ir.distill.evaluate import evaluate

    default = evaluate(path, tmp_path / "pairs", tmp_path / "default.json", progress=False)["mean"]["psnr"]
    assert default == psnr["params_ema"] != psnr["params"]


def test_the_command_line_shows_which_entry_it_used(tmp_path):
    """`d4ir eval --model` on a wrapped checkpoint says so on stderr, in a process of its own (no test logging)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    path = tmp_path / "ckpt.pth"
    torch.save({"net": _tiny("restormer").state_dict()}, path)
    for sub in ("degraded", "clean"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
        Image.new("RGB", (16, 16), (90, 120, 200)).save(tmp_path / "pairs" / sub / "a.png")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "d4ir.pipelines.cli", "eval", "--model", str(path), "--pairs",
                           str(tmp_path / "pairs"), "--out", str(tmp_path / "eval.json"), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{path}: weights from the checkpoint's 'net' entry" in done.stderr
