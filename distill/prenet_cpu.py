"""PReNet's inference on a CPU in float32: the kernels that are fastest on it for each conv, and no autograd.

On the 2-core CPU at 480x320 (ad-hoc per-conv timings of the session that wrote this; bench/prenet.py measures
the whole forward), oneDNN in channels_last was the fastest for the 32-channel convs and NNPACK's Winograd for
the fused 64 -> 128 gate conv. So the network runs in channels_last through oneDNN
(`mkldnn._convolution_pointwise`, which also applies the ReLU after a conv in the conv's epilogue), and only
the fused gate conv (i, f, g, o as one 2C -> 4C conv) goes through NNPACK in NCHW: one layout change of f and
one of h per stage. Activations and sums run in place. The outputs equal the module-by-module forward to ~1e-6
(tests/test_prenet.py). `available(x)` says whether this path applies: both kernels built into torch, no
gradient wanted, a CPU float32 input.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

_CL = torch.channels_last
_ONE = [1, 1]


@functools.cache
def _kernels() -> bool:
    """Whether torch has both kernels (NNPACK's call also initialises its thread pool: its convs fail before)."""
    try:
        return bool(torch._nnpack_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
            and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def available(x: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and _kernels())


def _conv(x: torch.Tensor, conv: nn.Conv2d, act: str = "none") -> torch.Tensor:
    """3x3 stride-1 pad-1 conv of a channels_last x, with `act` ("relu" or "none") fused after it."""
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, _ONE, _ONE, _ONE, 1, act, [], "")


def _gates(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The fused gate conv by NNPACK: x [B,Cin,H,W] NCHW -> [B,4C,H,W] NCHW."""
    return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias, _ONE, _ONE)


def forward(model: nn.Module, rainy: torch.Tensor) -> torch.Tensor:
    """PReNet `model` (distill.prenet.PReNet) on rainy [B,3,H,W] -> [B,3,H,W], as its forward computes it."""
    cfg = model.config
    x, h, c = rainy, None, None
    rainy_cl = rainy.contiguous(memory_format=_CL)
    weight, bias = model._gate_weights() if cfg["recurrent"] else (None, None)
    for _ in range(cfg["stages"]):
        f = _conv(torch.cat([rainy, x], 1).contiguous(memory_format=_CL), model.conv0[0], "relu")
        if cfg["recurrent"]:
            f = f.contiguous()  # NCHW for NNPACK
            z = _gates(f, weight[:, : f.shape[1]], bias) if h is None else \
                _gates(torch.cat([f, h], 1), weight, bias)
            i, fg, g, o = z.chunk(4, dim=1)
            i, o, g = i.sigmoid_(), o.sigmoid_(), g.tanh_()
            c = i.mul_(g) if c is None else c.mul_(fg.sigmoid_()).addcmul_(i, g)
            h = torch.tanh(c).mul_(o)
            f = h.contiguous(memory_format=_CL)
        for k, block in enumerate(model._blocks()):
            r = _conv(_conv(f, block[0], "relu"), block[2], "relu").add_(f)
            # relu(sum) is the identity when f >= 0 (after a ReLU); only the first block after the LSTM needs it
            f = r.relu_() if k == 0 and cfg["recurrent"] else r
        x = _conv(f, model.conv[0]).add_(rainy_cl)
    return x.contiguous()
