"""distill.deform: the sampling formulations equal torchvision's deform_conv2d (forward and every gradient),
chunking changes nothing, the switch and its measured "auto", and AirNet across implementations."""

from __future__ import annotations

import pytest
import torch
from d4ir.distill import deform
from d4ir.distill import deform_kernels as K
from d4ir.distill.airnet import AirNet, DCNLayer
from d4ir.distill.registry import load_model, save_model
from torchvision.ops import deform_conv2d

OURS = ("gather", "sample")


def _inputs(b, c, h, w, *, kind: str, seed: int = 0, dtype=torch.float32, device="cpu"):
    """x, offset, weight, mask. kind "random": offsets of std 3 (many taps land outside the image, partly or
    wholly); "integer": whole-pixel offsets (every tap on an exact integer, including y = -1 and y = H on the
    border rows); "zero": AirNet's initial state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    off = torch.randn(b, 18, h, w, generator=g) * 3
    off = {"random": off, "integer": off.round(), "zero": torch.zeros_like(off)}[kind]
    weight = torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5)
    mask = torch.rand(b, 9, h, w, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, off, weight, mask)]


def _run(fn, tensors, seed: int = 1):
    """Forward and the gradients of x, offset, weight, mask for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    grads = torch.autograd.grad(out, leaves, g)
    return [out.detach(), *grads]


def _torchvision(x, off, w, m):
    return deform_conv2d(x, off, w, None, padding=1, mask=m)


def _assert_close(got, ref, tol: float, names=("out", "grad x", "grad offset", "grad weight", "grad mask")):
    """|got - ref| <= tol * max(1, max|ref|) for each tensor (weight gradients sum over every pixel)."""
    for name, a, b in zip(names, got, ref):
        scale = max(1.0, b.abs().max().item())
        err = (a.float() - b.float()).abs().max().item()
        assert err <= tol * scale, f"{name}: max diff {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("impl", OURS)
@pytest.mark.parametrize("kind", ["random", "integer", "zero"])
@pytest.mark.parametrize("c,h,w", [(8, 9, 11), (16, 12, 10), (32, 8, 13), (64, 7, 9)])
def test_equals_torchvision_forward_and_gradients(impl, kind, c, h, w):
    tensors = _inputs(2, c, h, w, kind=kind)
    ref = _run(_torchvision, tensors)
    got = _run(lambda *t: deform.deform_conv3x3(*t, impl=impl), tensors)
    _assert_close(got, ref, 1e-4)


@pytest.mark.parametrize("impl", OURS)
def test_gradcheck_float64(impl):
    torch.manual_seed(0)
    x, off, w, m = (t.double().requires_grad_() for t in _inputs(1, 2, 4, 5, kind="random"))
    assert torch.autograd.gradcheck(lambda *t: deform.deform_conv3x3(*t, impl=impl), (x, off, w, m), atol=1e-6)


def test_grid_sample_offset_gradient_at_integer_positions_needs_the_pow2_padding():
    """At exact integer taps grid_sample's normalise/unnormalise round trip can land just below the integer,
    so floor takes the cell below and the offset gradient is a backward difference; with the image padded to
    2^a + 1 the round trip is exact and the gradient is torchvision's forward difference."""
    assert [K._pow2_plus_one(n) for n in (1, 2, 3, 5, 6, 16, 17, 18, 256)] == [2, 2, 3, 5, 9, 17, 17, 33, 257]
    x, off, w, m = _inputs(1, 4, 16, 16, kind="zero")
    ref = _run(_torchvision, (x, off, w, m))[2]

    def conv(image, o, w_, m_):  # [1,Co,16,16] from the grid_sample columns of `image`
        return (K.sample_weight(w_) @ K.sample_columns(image, o, m_, 0)).view(1, -1, 16, 16)

    plain = _run(lambda x_, o, w_, m_: conv(x_, o, w_, m_), (x, off, w, m))[2]
    padded = _run(lambda x_, o, w_, m_: conv(K.pow2_pad(x_), o, w_, m_), (x, off, w, m))[2]
    wrong = (plain - ref).abs() > 1e-2
    assert wrong.float().mean() > 0.01  # the unpadded image gets a visible share of the gradients wrong
    assert (padded - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("impl", OURS)
@pytest.mark.parametrize("chunk_mib", [1e-3, 0.02])  # row bands of one image / groups of whole images
def test_chunking_changes_nothing(impl, chunk_mib):
    tensors = _inputs(3, 8, 10, 12, kind="random")
    with deform.using(chunk_mib=64):
        whole = _run(lambda *t: deform.deform_conv3x3(*t, impl=impl), tensors)
    with deform.using(chunk_mib=chunk_mib):
        plan = deform._plan((3, 8, 10, 12), 4, chunk_mib * 2**20)
        chunked = _run(lambda *t: deform.deform_conv3x3(*t, impl=impl), tensors)
    assert len(plan) > 1 and sum(len(bands) for *_, bands in plan) > 2
    covered = sorted((b, r) for b0, b1, bands in plan for b in range(b0, b1) for r0, r1 in bands for r in range(r0, r1))
    assert covered == [(b, r) for b in range(3) for r in range(10)]  # every output row exactly once
    _assert_close(chunked, whole, 1e-6)


@pytest.mark.parametrize("impl", OURS)
def test_no_grad_path_equals_the_autograd_path(impl):
    tensors = _inputs(2, 8, 9, 9, kind="random")
    with torch.no_grad():
        plain = deform.deform_conv3x3(*tensors, impl=impl)
    assert torch.allclose(plain, _run(lambda *t: deform.deform_conv3x3(*t, impl=impl), tensors)[0], atol=1e-6)


def test_auto_measures_once_and_caches_the_fastest():
    deform.clear_auto_cache()
    tensors = _inputs(1, 8, 8, 8, kind="random")
    with deform.using(impl="auto", measure=True):
        auto = _run(deform.deform_conv3x3, tensors)
        choices = deform.auto_choices()
        assert len(choices) == 1
        (entry,) = choices.values()
        assert set(entry["seconds"]) == {"gather", "sample", "torchvision"}
        assert entry["choice"] == min(entry["seconds"], key=entry["seconds"].get)
        _run(deform.deform_conv3x3, tensors)
        assert deform.auto_choices() == choices  # cached: not measured again
        with torch.no_grad():
            deform.deform_conv3x3(*tensors)
        assert len(deform.auto_choices()) == 2  # forward-only calls are a separate key
    _assert_close(auto, _run(_torchvision, tensors), 1e-4)


def test_switch_validation_and_bad_inputs():
    with pytest.raises(ValueError, match="impl must be one of"):
        deform.configure(impl="fast")
    with pytest.raises(ValueError, match="chunk_mib"):
        deform.DeformConfig(chunk_mib=0)
    with pytest.raises(ValueError, match="onnx_op"):
        deform.DeformConfig(onnx_op="DCN")
    x, off, w, m = _inputs(1, 4, 5, 5, kind="random")
    with pytest.raises(ValueError, match="impl must be one of"):
        deform.deform_conv3x3(x, off, w, m, impl="cuda")
    with pytest.raises(ValueError, match="offset must be"):
        deform.deform_conv3x3(x, off[:, :9], w, m)
    with pytest.raises(ValueError, match="weight must be"):
        deform.deform_conv3x3(x, off, w[:, :2], m)
    with pytest.raises(ValueError, match="x must be"):
        deform.deform_conv3x3(x[0], off, w, m)
    with pytest.raises(ValueError, match="AirNet deform"):
        AirNet(n_feats=8, n_groups=1, n_blocks=1, queue_size=4, deform="mmcv")
    assert deform.get_config() == deform.DeformConfig()  # nothing above changed the process default


def _tiny_airnet(seed: int = 0) -> AirNet:
    torch.manual_seed(seed)
    model = AirNet(n_feats=8, n_groups=1, n_blocks=2, queue_size=4)
    for m in model.modules():  # non-zero offsets and masks (the official init is zero)
        if isinstance(m, DCNLayer):
            torch.nn.init.normal_(m.conv_offset_mask.weight, std=0.2)
    return model


def test_airnet_outputs_and_gradients_agree_across_implementations(tmp_path):
    model = _tiny_airnet()
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(3))
    results = {}
    for impl in ("torchvision", *OURS):
        model.set_deform(impl).zero_grad()
        out = model(x)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.R.parameters()]
        results[impl] = [out.detach(), *grads]
    names = ["out"] + [f"grad {n}" for n, _ in model.R.named_parameters()]
    for impl in OURS:
        _assert_close(results[impl], results["torchvision"], 1e-4, names)
    # the switch is not state: keys and the saved config are those of a plain AirNet, and old configs load
    assert list(model.state_dict()) == list(_tiny_airnet().state_dict())
    path = save_model(tmp_path / "net", model.set_deform("sample"))
    loaded, info = load_model(path)
    assert "deform" not in info["kwargs"]
    assert all(m.deform is None for m in loaded.modules() if isinstance(m, DCNLayer))
    with torch.no_grad():
        reference = model.eval().set_deform("torchvision")(x)
        assert torch.allclose(loaded(x), reference, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", OURS)
def test_cuda_fp32_and_bf16_autocast(impl):
    """fp32: within 1e-4 of torchvision. bf16 autocast: torchvision runs the op in fp32 and casts back, ours
    samples in fp32 and multiplies in bf16, so each output and gradient carries the bf16 rounding of both
    matmul operands: a relative error of a few units of bf16's 2^-8 ~ 4e-3; bound: 2e-2 of the norm."""
    tensors = _inputs(2, 32, 24, 20, kind="random", device="cuda")
    ref = _run(_torchvision, tensors)
    _assert_close(_run(lambda *t: deform.deform_conv3x3(*t, impl=impl), tensors), ref, 1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref16 = _run(_torchvision, tensors)
        got16 = _run(lambda *t: deform.deform_conv3x3(*t, impl=impl), tensors)
    assert got16[0].dtype == torch.bfloat16
    for a, b in zip(got16, ref16):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel <= 2e-2, f"relative error {rel:.3g}"
