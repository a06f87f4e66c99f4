"""The PReNet family: registry names and counts, variants recognised from the keys, strict loading of the
official files, the fast path against the straightforward one, and PReNet6 on three Rain100L pairs.

The official files and Rain100L are read from ../shared (or $D4IR_SHARED); those tests skip without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from d4ir.distill import prenet_cpu
from d4ir.distill.dfmc import build_features
from d4ir.distill.evaluate import evaluate_model
from d4ir.distill.inference import official_policy, restore
from d4ir.distill.prenet import PReNet
from d4ir.distill.registry import build, count_parameters, half_of, load_model
from d4ir.shards.pairs import find_pairs

SHARED = Path(os.environ.get("D4IR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = SHARED / "weights" / "PReNet" / "logs" / "Rain100L"
RAIN100L = SHARED / "data" / "rain100l_test"
# official folder -> (registry name, kwargs recognised from the keys, parameter count from the weights README)
OFFICIAL = {
    "PReNet6": ("prenet", dict(channels=32, stages=6, recurrent=True, recursive=False), 168_963),
    "PReNet6_r": ("prenet-r", dict(channels=32, stages=6, recurrent=True, recursive=True), 94_979),
    "PRN6": ("prn", dict(channels=32, stages=6, recurrent=False, recursive=False), 95_107),
    "PRN6_r": ("prn-r", dict(channels=32, stages=6, recurrent=False, recursive=True), 21_123),
}
needs_weights = pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"official PReNet weights absent ({WEIGHTS})")


def test_registry_names_counts_and_half():
    for name, kwargs, count in OFFICIAL.values():
        model = build(name)
        assert model.config == kwargs and count_parameters(model) == count
    half = build("half-prenet")
    assert half.config == dict(channels=16, stages=6, recurrent=True, recursive=False)
    assert count_parameters(half) == 43_011
    assert build("prenet", channels=8, stages=3).config["channels"] == 8
    assert half_of({"arch": "prenet", "kwargs": OFFICIAL["PReNet6"][1]}) == ("prenet", half.config)
    assert official_policy(half) == ("none", 1)


def test_models_command_lists_the_family():
    from d4ir.pipelines.cli_tools import models

    out = CliRunner().invoke(models).output
    for name, _, count in OFFICIAL.values():
        assert any(line.split()[:1] == [name] and f"{count:,}" in line for line in out.splitlines()), name
    assert any(line.startswith("half-prenet ") and "43,011" in line for line in out.splitlines())


@pytest.mark.parametrize("folder", list(OFFICIAL))
def test_variant_recognised_from_the_keys(tmp_path, folder):
    name, kwargs, _ = OFFICIAL[folder]
    torch.manual_seed(0)
    src = build(name, channels=8).eval()
    torch.save(src.state_dict(), tmp_path / "net_latest.pth")
    model, info = load_model(tmp_path / "net_latest.pth")
    assert isinstance(model, PReNet) and info["arch"] == "prenet" and info["source"] == "official"
    assert model.config == {**kwargs, "channels": 8}
    x = torch.rand(1, 3, 13, 17)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_missing_or_extra_key_is_refused_in_one_line(tmp_path):
    state = build("prenet", channels=4).state_dict()
    missing = {k: v for k, v in state.items() if k != "res_conv3.2.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="does not match PReNet.*Missing key.*res_conv3.2.bias") as err:
        load_model(tmp_path / "missing.pth")
    assert "\n" not in str(err.value)
    torch.save({**state, "res_conv6.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="Unexpected key.*res_conv6.0.weight") as err:
        load_model(tmp_path / "extra.pth")
    assert "\n" not in str(err.value)
    torch.save({**state, "conv0.0.weight": torch.zeros(4, 5, 3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="size mismatch for conv0.0.weight"):
        load_model(tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="holds a prenet state_dict"):
        load_model(tmp_path / "extra.pth", arch="restormer")


@pytest.mark.parametrize("kwargs", [dict(), dict(recursive=True), dict(recurrent=False)])
def test_fast_path_equals_the_straightforward_one(monkeypatch, kwargs):
    torch.manual_seed(1)
    model = PReNet(channels=8, stages=3, **kwargs).eval()
    x = torch.rand(2, 3, 19, 23)
    calls = []
    real = prenet_cpu.forward
    monkeypatch.setattr(prenet_cpu, "forward", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = model(x)
        model.fast = False
        plain = model(x)
    assert calls or not prenet_cpu._kernels()  # the CPU kernels ran where torch has them
    assert (fast - plain).abs().max() < 1e-5
    # with gradients (the feedback loop's teacher): fused gates, torch convs, the same input gradient
    grads = []
    for fast_path in (True, False):
        model.fast = fast_path
        xi = x.clone().requires_grad_(True)
        model(xi).square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_fused_gate_cache_follows_new_weights():
    torch.manual_seed(2)
    model, other = PReNet(channels=4, stages=2).eval(), PReNet(channels=4, stages=2).eval()
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        model(x)  # fills the cache
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=1e-5)


def test_dfmc_teacher_features_of_prenet():
    teacher = PReNet(channels=4, stages=2).eval().requires_grad_(False)
    feats = build_features("teacher", teacher, None, seed=0, device="cpu")(torch.rand(2, 3, 16, 16))
    assert [f.shape for f in feats] == [(2, 4, 16, 16)]


@needs_weights
@pytest.mark.parametrize("folder", list(OFFICIAL))
def test_official_files_load_strictly(folder):
    path = WEIGHTS / folder / "net_latest.pth"
    model, info = load_model(path)
    name, kwargs, count = OFFICIAL[folder]
    assert isinstance(model, PReNet) and model.config == kwargs and count_parameters(model) == count
    assert info["name"] == name  # the variant's registry name, shown by d4ir eval
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert restore(model, torch.rand(1, 3, 21, 30)).shape == (1, 3, 21, 30)  # any size


# PReNet6 on Rain100L pairs 1, 2, 3 (480x320), authors' convention (truncated uint8, Y, ssim.m), measured with
# this implementation on the 2-core CPU; tolerance 0.01 dB / 1e-4 (the fast path's float differences are
# ~1e-5 before quantisation).
PINNED = {"1": (37.8737, 0.97764), "2": (37.8578, 0.96462), "3": (40.0036, 0.99444)}


@needs_weights
@pytest.mark.skipif(not RAIN100L.is_dir(), reason=f"Rain100L test set absent ({RAIN100L})")
def test_prenet6_on_three_rain100l_pairs():
    model, _ = load_model(WEIGHTS / "PReNet6" / "net_latest.pth")
    pairs = [p for p in find_pairs(RAIN100L) if p.name in PINNED]
    result = evaluate_model(model, pairs, progress=False)
    assert result["authors_quantize"] == "truncate" and result["count"] == 3
    for row in result["images"]:
        want_psnr, want_ssim = PINNED[row["name"]]
        assert row["authors_psnr_y"] == pytest.approx(want_psnr, abs=0.01)
        assert row["authors_ssim_y"] == pytest.approx(want_ssim, abs=1e-4)


def test_traced_and_exported_programs_hold_no_nnpack_op(recwarn):
    model = PReNet(channels=4, stages=2).eval()
    x = torch.rand(1, 3, 16, 20)
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, x)
        exported = torch.export.export(model, (x,))
        for graph, out in ((traced.graph, traced(x)), (exported.graph, exported.module()(x))):
            assert "nnpack" not in str(graph)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_a_teacher_run_under_inference_mode_still_gives_input_gradients():
    teacher = PReNet(channels=4, stages=2).eval().requires_grad_(False)
    x = torch.rand(1, 3, 12, 12)
    with torch.inference_mode():
        teacher(x)  # caches the fused gate weights as inference tensors
    xi = x.clone().requires_grad_(True)
    teacher(xi).sum().backward()  # the feedback loop's use: gradients to the input through the frozen teacher
    assert xi.grad is not None and xi.grad.abs().sum() > 0
