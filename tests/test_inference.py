"""restore(): official crop/pad policies, tiled inference against whole-image inference, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from d4ir.distill.airnet import AirNet
from d4ir.distill.inference import crop_to_multiple, official_policy, pad_to_multiple, restore
from d4ir.distill.registry import build
from torch import nn


@pytest.fixture(scope="module")
def tiny_airnet() -> AirNet:
    # one group of one block: receptive-field radius 8, within the tile window's dead margin at overlap 32
    torch.manual_seed(0)
    return AirNet(n_feats=8, queue_size=16, n_groups=1, n_blocks=1).eval()


@pytest.fixture(scope="module")
def restormer12() -> nn.Module:
    # restormer-12 at reduced depth (one block per level) keeps the CPU test fast
    torch.manual_seed(0)
    return build("restormer-12", num_blocks=(1, 1, 1, 1), num_refinement_blocks=1).eval()


def test_crop_to_multiple_matches_airnet_crop_img():
    img = torch.arange(35 * 50, dtype=torch.float32).view(1, 1, 35, 50)
    out = crop_to_multiple(img, 16)
    # H: 35 % 16 = 3 -> 1 row off the top, 2 off the bottom; W: 50 % 16 = 2 -> 1 column each side
    assert torch.equal(out, img[..., 1:33, 1:49])
    assert crop_to_multiple(img[..., :32, :48], 16).shape == (1, 1, 32, 48)
    with pytest.raises(ValueError, match="smaller than"):
        crop_to_multiple(img[..., :10, :], 16)


def test_pad_to_multiple_reflects_bottom_right():
    img = torch.rand(1, 3, 13, 17)
    out = pad_to_multiple(img, 8)
    assert out.shape == (1, 3, 16, 24)
    assert torch.equal(out[..., :13, :17], img)
    assert torch.equal(out[..., 13, :17], img[..., 11, :])  # reflect: row 13 mirrors row 11
    assert torch.equal(out[..., :13, 17], img[..., :, 15])
    assert pad_to_multiple(img[..., :8, :16], 8).shape == (1, 3, 8, 16)
    assert pad_to_multiple(torch.rand(1, 3, 3, 3), 8).shape == (1, 3, 8, 8)  # too small to reflect


def test_official_policies(tiny_airnet, restormer12):
    assert official_policy(tiny_airnet) == ("crop", 16)
    assert official_policy(restormer12) == ("pad", 8)
    assert official_policy(nn.Identity()) == ("none", 1)


def test_airnet_crop_and_pad_policies(tiny_airnet):
    torch.manual_seed(1)
    x = torch.rand(1, 3, 37, 50)
    with torch.no_grad():
        expect = tiny_airnet(crop_to_multiple(x, 16)).clamp(0, 1)
        expect_pad = tiny_airnet(F.pad(x, (0, 14, 0, 11), mode="reflect"))[..., :37, :50].clamp(0, 1)
    out = restore(tiny_airnet, x)
    assert out.shape == (1, 3, 32, 48)
    torch.testing.assert_close(out, expect)
    out_pad = restore(tiny_airnet, x, policy="pad")
    assert out_pad.shape == (1, 3, 37, 50)
    torch.testing.assert_close(out_pad, expect_pad)


def test_restormer_pads_and_crops_back(restormer12):
    torch.manual_seed(2)
    x = torch.rand(1, 3, 30, 37)
    with torch.no_grad():
        expect = restormer12(F.pad(x, (0, 3, 0, 2), mode="reflect"))[..., :30, :37].clamp(0, 1)
    out = restore(restormer12, x[0])  # a single [3,H,W] image comes back as [3,H,W]
    assert out.shape == (3, 30, 37)
    torch.testing.assert_close(out, expect[0])
    with pytest.raises(ValueError, match="multiples of 8"):
        restore(restormer12, x, policy="none")


def test_tiled_equals_whole_image_airnet(tiny_airnet):
    torch.manual_seed(3)
    x = torch.rand(1, 3, 96, 80)
    whole = restore(tiny_airnet, x, clamp=False)
    tiled = restore(tiny_airnet, x, tile=48, tile_overlap=32, clamp=False)
    assert tiled.shape == whole.shape == (1, 3, 96, 80)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=0)


def test_tiled_is_exact_for_a_local_network():
    """A conv stack of receptive-field radius 4 (<= the window's dead margin of overlap//4 = 4) must give
    the whole-image result to float precision, including uneven last tiles."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 5, padding=2), nn.Tanh(),
                        nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.rand(1, 3, 70, 53)
    whole = restore(net, x, policy="none", clamp=False)
    tiled = restore(net, x, policy="none", tile=24, tile_overlap=16, clamp=False)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    # with no overlap the seams are visible: the test above can fail
    seams = restore(net, x, policy="none", tile=24, tile_overlap=0, clamp=False)
    assert (seams - whole).abs().max() > 1e-3


def test_tiled_restormer(restormer12):
    """Restormer's channel attention pools over the whole tile, so tiles cannot reproduce the whole image
    exactly; a tile covering the image must, and smaller tiles must stay close."""
    torch.manual_seed(5)
    x = torch.rand(1, 3, 96, 80)
    whole = restore(restormer12, x, clamp=False)
    torch.testing.assert_close(restore(restormer12, x, tile=96, clamp=False), whole, atol=1e-5, rtol=0)
    tiled = restore(restormer12, x, tile=48, tile_overlap=16, clamp=False)
    assert tiled.shape == whole.shape
    diff = (tiled - whole).abs()
    assert diff.mean() < 0.005 and diff.max() < 0.05  # measured: 0.0017 and 0.013; (whole - x) is ~0.08


def test_restore_keeps_mode_and_rejects_bad_arguments(tiny_airnet):
    x = torch.rand(1, 3, 32, 32)
    tiny_airnet.train()
    try:
        restore(tiny_airnet, x)
        assert tiny_airnet.training
    finally:
        tiny_airnet.eval()
    with pytest.raises(ValueError, match="policy"):
        restore(tiny_airnet, x, policy="stretch")
    with pytest.raises(ValueError, match="multiple of 16"):
        restore(tiny_airnet, x, tile=40)
    with pytest.raises(ValueError, match="tile_overlap"):
        restore(tiny_airnet, x, tile=32, tile_overlap=32)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        restore(tiny_airnet, torch.rand(32, 32))
