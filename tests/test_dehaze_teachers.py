"""GCANet and Light-DehazeNet: key layouts, strict loading of the official files, the RGB [0,1] contract, the
pieces the authors run around GCANet (edge channel, scaling, size rule, residual flag, quantisation), and one
pinned reference number per family on the shared benchmark samples.

The official files and images live in ../shared (never in the repository); the tests that need them skip with
the reason when it is absent. D4IR_SHARED names another location (e.g. from a git worktree).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from d4ir.distill import gcanet, ldnet
from d4ir.distill.airnet import AirNet
from d4ir.distill.gcanet import GCANet, edge_map, official_quantize
from d4ir.distill.ldnet import LightDehazeNet
from d4ir.distill.registry import FAMILIES as REGISTRY_FAMILIES
from d4ir.distill.registry import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    """The shared folder: $D4IR_SHARED, else ../shared beside the repository."""
    return Path(os.environ.get("D4IR_SHARED") or ROOT.parent / "shared")


WEIGHTS = _shared() / "weights"
DATA = _shared() / "data"
GCANET_FILES = {"dehaze": WEIGHTS / "GCANet/models/wacv_gcanet_dehaze.pth",
                "derain": WEIGHTS / "GCANet/models/wacv_gcanet_derain.pth"}
LDNET_FILE = WEIGHTS / "Light-DehazeNet/trained_weights/trained_LDNet.pth"


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} absent: the shared weights/data are not on this machine (set D4IR_SHARED)")


def _load_strict(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """torch.load with weights_only=True on the CPU, then every key and shape checked (strict=True)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


FAMILIES = {"gcanet": (gcanet, GCANet), "ldnet": (ldnet, LightDehazeNet)}


# --- key layouts and parameter counts ---------------------------------------------------------------------


def test_parameter_counts_match_the_official_files_and_the_half_students():
    assert count_parameters(GCANet()) == 702_818
    assert count_parameters(LightDehazeNet()) == 30_187
    assert count_parameters(GCANet(**REGISTRY_FAMILIES["gcanet"].half_kwargs(GCANet().config))) == 178_530
    assert count_parameters(LightDehazeNet(**REGISTRY_FAMILIES["ldnet"].half_kwargs(LightDehazeNet().config))) == 7_959


def test_half_kwargs_halve_the_width_and_keep_the_rest():
    half_gcanet = REGISTRY_FAMILIES["gcanet"].half_kwargs
    assert half_gcanet({"channels": 64, "residual": False}) == {"channels": 32, "residual": False}
    assert REGISTRY_FAMILIES["ldnet"].half_kwargs({"width": 8}) == {"width": 4}
    assert GCANet(channels=16).config == {"channels": 16, "residual": True}  # any width by keyword
    with pytest.raises(ValueError, match="cannot halve"):
        REGISTRY_FAMILIES["gcanet"].half_kwargs({"channels": 1})
    with pytest.raises(ValueError, match="width must be >= 1"):
        LightDehazeNet(width=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("width", [4, 6])
def test_detect_and_kwargs_recognise_each_family_and_width(family, width):
    module, cls = FAMILIES[family]
    key = "channels" if family == "gcanet" else "width"
    state = cls(**{key: width}).state_dict()
    assert module.detect(state)
    assert module.kwargs_from_state_dict(state) == {key: width}
    cls(**module.kwargs_from_state_dict(state)).load_state_dict(state, strict=True)
    other = FAMILIES["ldnet" if family == "gcanet" else "gcanet"][1]().state_dict()
    assert not module.detect(other)
    assert not module.detect(AirNet(n_feats=8, queue_size=4, n_groups=1, n_blocks=1).state_dict())
    with pytest.raises(KeyError, match="not a"):
        module.kwargs_from_state_dict(other)


def test_gcanet_detect_checks_the_edge_channel():
    state = GCANet(channels=4).state_dict()
    state["conv1.weight"] = torch.zeros(4, 3, 3, 3)  # an RGB-only first conv is not the official layout
    assert not gcanet.detect(state)


# --- strict loading of the official files -----------------------------------------------------------------


@pytest.mark.parametrize("task", ["dehaze", "derain"])
def test_official_gcanet_files_load_strictly(task):
    _need(GCANET_FILES[task])
    state = torch.load(GCANET_FILES[task], map_location="cpu", weights_only=True)
    assert gcanet.detect(state) and not ldnet.detect(state)
    kwargs = gcanet.kwargs_from_state_dict(state)
    assert kwargs == {"channels": 64}
    model = _load_strict(GCANET_FILES[task], GCANet(**kwargs, residual=task == "dehaze"))
    assert count_parameters(model) == 702_818


def test_official_ldnet_file_loads_strictly():
    _need(LDNET_FILE)
    state = torch.load(LDNET_FILE, map_location="cpu", weights_only=True)
    assert ldnet.detect(state) and not gcanet.detect(state)
    model = _load_strict(LDNET_FILE, LightDehazeNet(**ldnet.kwargs_from_state_dict(state)))
    assert count_parameters(model) == 30_187


# --- the forward contract ---------------------------------------------------------------------------------

CONTRACT_MODELS = {
    "gcanet-dehaze": lambda: GCANet(),
    "gcanet-derain": lambda: GCANet(residual=False),
    "half-gcanet": lambda: GCANet(channels=32),
    "ldnet": lambda: LightDehazeNet(),
    "half-ldnet": lambda: LightDehazeNet(width=4),
}


@pytest.mark.parametrize("name", sorted(CONTRACT_MODELS))
@pytest.mark.parametrize("size", [(33, 47), (2, 3), (36, 48)])
def test_forward_keeps_the_size_is_finite_and_differentiable(name, size):
    torch.manual_seed(0)
    model = CONTRACT_MODELS[name]().eval()
    x = torch.rand(2, 3, *size, requires_grad=True)
    out = model(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["gcanet-dehaze", "gcanet-derain", "ldnet"])
def test_torchscript_gives_the_eager_output_at_any_size(name):
    """A scripted teacher (one of the forms `--teacher` accepts) keeps the size rule and the output rule."""
    torch.manual_seed(0)
    model = CONTRACT_MODELS[name]().eval()
    with warnings.catch_warnings():  # torch.jit.script is deprecated (FutureWarning) in torch 2.14, still supported
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    for size in ((33, 47), (2, 3)):
        x = torch.rand(1, 3, *size)
        torch.testing.assert_close(scripted(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [GCANet, LightDehazeNet])
def test_non_rgb_input_is_refused_in_one_line(cls):
    with pytest.raises(ValueError, match=r"expects an RGB batch \[B,3,H,W\], got shape \[1, 4, 8, 8\]"):
        cls()(torch.rand(1, 4, 8, 8))


def test_edge_map_is_the_mean_absolute_difference_with_existing_neighbours():
    torch.manual_seed(0)
    img = torch.rand(1, 3, 5, 6) * 255
    ref = torch.zeros(5, 6)
    for i in range(5):
        for j in range(6):
            for di, dj in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                if 0 <= i + di < 5 and 0 <= j + dj < 6:
                    ref[i, j] += (img[0, :, i, j] - img[0, :, i + di, j + dj]).abs().sum()
    torch.testing.assert_close(edge_map(img)[0, 0], ref / 12, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(33, 47), (36, 48)])
def test_gcanet_with_a_silent_last_layer_returns_the_input_or_black(size):
    """deconv1 = 0: the dehaze model (residual) must return exactly its input, the derain model ReLU(0) = 0;
    this pins the 0..255 scaling, the crop back to the input size and the residual flag."""
    x = torch.rand(1, 3, *size)
    for residual, expected in ((True, x), (False, torch.zeros_like(x))):
        model = GCANet(channels=8, residual=residual).eval()
        with torch.no_grad():
            model.deconv1.weight.zero_()
            model.deconv1.bias.zero_()
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_gcanet_pads_to_a_multiple_of_four_and_crops_back():
    """The network itself sees the input padded to the next multiples of 4 (33x47 -> 36x48), an input already a
    multiple of 4 unpadded (the authors' computation), and the output has the input's size."""
    model = GCANet(channels=8).eval()
    seen = []
    model.conv1.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 33, 47)).shape[-2:] == (33, 47)
        assert model(torch.rand(1, 3, 36, 48)).shape[-2:] == (36, 48)
    assert seen == [(36, 48), (36, 48)]


def test_ldnet_with_k_equal_one_is_the_identity():
    """K = 1 everywhere (conv8 weights 0, bias 1): relu(K*I - K + 1) = I."""
    model = LightDehazeNet(width=4).eval()
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        model.e_conv_layer8.weight.zero_()
        model.e_conv_layer8.bias.fill_(1.0)
        torch.testing.assert_close(model(x), x)


def test_official_quantize_rounds_to_256_levels_and_clamps():
    out = torch.tensor([-0.2, 0.0, 0.5, 100.4 / 255, 100.6 / 255, 1.0, 1.3])
    expected = torch.tensor([0.0, 0.0, 128.0, 100.0, 101.0, 255.0, 255.0]) / 255  # 127.5 rounds half to even: 128
    torch.testing.assert_close(official_quantize(out), expected)


# --- reference numbers on the shared samples --------------------------------------------------------------

# (file, constructor, set, pair, input PSNR, output PSNR of the 8-bit output), RGB, peak 1, no border, measured
# on this machine's CPU with one thread (the float result varies by ~1e-4 dB across BLAS and thread counts).
REFERENCES = {
    "gcanet-dehaze": (GCANET_FILES["dehaze"], lambda: GCANet(residual=True), "sots_indoor_samples", "1400_1",
                      14.79, 27.10),
    "gcanet-derain": (GCANET_FILES["derain"], lambda: GCANet(residual=False), "test1200_samples", "1",
                      14.20, 30.08),
    "ldnet": (LDNET_FILE, lambda: LightDehazeNet(), "sots_indoor_samples", "1400_1", 14.79, 21.54),
}
TOLERANCE_DB = 0.05


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_official_teacher_restores_its_reference_sample(name):
    from d4ir.distill.data import load_pairs
    from d4ir.distill.metrics import psnr
    from d4ir.shards.images import to_tensor

    path, build, set_name, pair, in_db, out_db = REFERENCES[name]
    _need(path)
    _need(DATA / set_name)
    model = _load_strict(path, build())
    (deg, cln), = [(d, c) for n, d, c in load_pairs(DATA / set_name).items if n == pair]
    x, y = to_tensor(deg)[None], to_tensor(cln)[None]
    with torch.no_grad():
        out = official_quantize(model(x))
    assert out.shape == y.shape
    assert float(psnr(x, y)[0]) == pytest.approx(in_db, abs=0.01)
    assert float(psnr(out, y)[0]) == pytest.approx(out_db, abs=TOLERANCE_DB)  # 6.7 to 15.9 dB above the input


# --- the bench script -------------------------------------------------------------------------------------


def _fake_shared(root: Path) -> None:
    """Random weights in the official layouts and two 26x30 pairs per set, under root/weights and root/data."""
    import dehaze_teachers as bench
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    for _, rel, family, kwargs, sets in bench.RUNS:
        model = GCANet(**kwargs) if family == "gcanet" else LightDehazeNet()
        (root / "weights" / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), root / "weights" / rel)
        for s in sets:
            for side in ("degraded", "clean"):
                (root / "data" / s / side).mkdir(parents=True, exist_ok=True)
                for i in range(2):
                    arr = np.random.default_rng(i).integers(0, 256, (26, 30, 3), dtype=np.uint8)
                    Image.fromarray(arr).save(root / "data" / s / side / f"{i}.png")


def test_bench_script_scores_every_run_and_writes_json(tmp_path, capsys):
    import json

    import dehaze_teachers as bench

    _fake_shared(tmp_path)
    out = tmp_path / "res.json"
    results = bench.main(["--data", str(tmp_path / "data"), "--weights", str(tmp_path / "weights"), "--limit", "1",
                          "--json-out", str(out)])
    assert [(r["teacher"], r["set"], r["count"]) for r in results] == [
        (label, s, 1) for label, _, _, _, sets in bench.RUNS for s in sets]
    written = json.loads(out.read_text())
    assert written["results"][0]["images"][0]["size"] == "30x26"
    assert written["table"].count("\n") == 1 + len(results)
    assert "| gcanet-derain | test1200_samples | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--runs", "gcanet-dehaze,nope"])


# ---------------------------------------------------------------- the families in the registry (d4ir models)
def test_the_registry_builds_and_halves_both_families():
    from d4ir.distill.registry import build, half_of

    assert [count_parameters(build(n)) for n in ("gcanet-dehaze", "gcanet-derain", "ldnet")] == [702818, 702818,
                                                                                                30187]
    assert build("gcanet-derain").config == {"channels": 64, "residual": False}
    # an official file records the base key "gcanet", which is no registry name: the half student's name is one
    name, kwargs = half_of({"arch": "gcanet", "kwargs": {"channels": 64, "residual": False}})
    assert (name, kwargs) == ("half-gcanet-derain", {"channels": 32, "residual": False})
    assert build(name, **kwargs).config == {"channels": 32, "residual": False}
    assert half_of({"arch": "gcanet", "kwargs": {"channels": 48, "residual": True}})[0] == "gcanet-dehaze"
    assert count_parameters(build("half-ldnet")) == 7959


def test_official_files_load_through_the_registry_with_the_named_output_rule(caplog):
    """load_model recognises GCANet and Light-DehazeNet files by their keys, strictly; GCANet's output rule cannot
    be read from its keys: without a name it is dehazing, with a warning saying so, and --arch gcanet-derain
    gives the deraining rule."""
    import logging

    from d4ir.distill.registry import load_model

    for path in (*GCANET_FILES.values(), LDNET_FILE):
        _need(path)
    with caplog.at_level(logging.WARNING, logger="d4ir.distill.registry"):
        model, info = load_model(GCANET_FILES["dehaze"])
    assert info["name"] == "gcanet-dehaze" and model.config == {"channels": 64, "residual": True}
    assert "the keys do not say the output rule" in caplog.text
    model, info = load_model(GCANET_FILES["derain"], arch="gcanet-derain")
    assert info["name"] == "gcanet-derain" and model.config["residual"] is False
    model, info = load_model(LDNET_FILE)
    assert (info["arch"], info["name"], count_parameters(model)) == ("ldnet", "ldnet", 30187)
