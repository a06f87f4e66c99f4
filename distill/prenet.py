"""PReNet (Ren et al., CVPR 2019, "Progressive Image Deraining Networks"): PReNet, PReNet_r, PRN, PRN_r.

Built from the paper and the official key layout (nn.Sequential indices, so official `.pth` files load
strictly). Each of `stages` stages sees the rainy input y and the current estimate x (x = y at the start):

    f   = ReLU(conv0(cat(y, x)))                          # [B,6,H,W] -> [B,C,H,W]
    h,c = ConvLSTM(f, h, c)  (recurrent only)              # gates conv_{i,f,g,o} on cat(f, h): 2C -> C each
    f   = ReLU(res_k(f) + f), k = 1..5                      # res_k = conv, ReLU, conv, ReLU
    x   = conv(f) + y                                       # [B,C,H,W] -> [B,3,H,W]

The last stage's x is the output. The recursive `_r` variants reuse `res_conv1` for all five blocks; PRN
drops the ConvLSTM. The four official models are four settings of `recurrent` and `recursive`.

Speed (`fast`, on by default): the four gate convs run as one 2C -> 4C conv. For a frozen network (or
under no_grad) its weights are concatenated once and cached (keyed on the parameters' versions, so a
load_state_dict or an optimiser step invalidates them); the first stage skips the hidden-state half of the
gates (h = 0). Under no_grad on the CPU in float32 the forward is `distill.prenet_cpu.forward` (each conv by
its fastest kernel there, activations fused or in place; equal to ~1e-6); with gradients (a teacher in the
feedback loop) the fused gates run with torch's convs. A traced/exported forward, or one with forward hooks
on a submodule (DFMC's teacher features), takes the module-by-module path instead. `bench/prenet.py` measures
the fast and the module-by-module paths side by side. The state_dict keeps the official keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import prenet_cpu

_GATES = ("conv_i", "conv_f", "conv_g", "conv_o")
N_BLOCKS = 5


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1))


class PReNet(nn.Module):
    """Progressive recurrent deraining network; RGB in [0,1] in, RGB out, any size (fully convolutional).

    Args:
        channels: feature width C (official 32; the half student 16).
        stages: number of stages T (official 6).
        recurrent: keep the ConvLSTM between stages (PReNet) or not (PRN).
        recursive: one residual block reused five times (`_r` variants) instead of five blocks.

    Attributes:
        fast: True (default) runs the fast path described in the module docstring; False the straightforward
            one (four gate convs, torch's convs): the reference of the equivalence test and the benchmark.
    """

    fast: bool = True

    def __init__(self, channels: int = 32, stages: int = 6, recurrent: bool = True, recursive: bool = False) -> None:
        super().__init__()
        if channels < 1 or stages < 1:
            raise ValueError(f"PReNet needs channels >= 1 and stages >= 1, got {channels} and {stages}")
        self.config = dict(channels=channels, stages=stages, recurrent=recurrent, recursive=recursive)
        c = channels
        self.conv0 = nn.Sequential(nn.Conv2d(6, c, 3, 1, 1), nn.ReLU())
        for k in range(1, 2 if recursive else N_BLOCKS + 1):
            setattr(self, f"res_conv{k}", nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(),
                                                        nn.Conv2d(c, c, 3, 1, 1), nn.ReLU()))
        if recurrent:
            for name in _GATES:
                setattr(self, name, _conv(2 * c, c))
        self.conv = _conv(c, 3)
        self._fused: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _blocks(self) -> list[nn.Module]:
        if self.config["recursive"]:
            return [self.res_conv1] * N_BLOCKS
        return [getattr(self, f"res_conv{k}") for k in range(1, N_BLOCKS + 1)]

    def _gate_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The four gate convs as one: weight [4C,2C,3,3], bias [4C] (i, f, g, o). Cached when no gradient
        can reach the weights (a frozen teacher, or no_grad); concatenated live (differentiable) otherwise."""
        convs = [getattr(self, name)[0] for name in _GATES]
        params = [p for m in convs for p in (m.weight, m.bias)]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return torch.cat([m.weight for m in convs]), torch.cat([m.bias for m in convs])
        # inference-mode tensors cannot enter an autograd graph later: the mode is part of the key
        key = (torch.is_inference_mode_enabled(), *((p.data_ptr(), p._version, p.device, p.dtype) for p in params))
        if self._fused is None or self._fused[0] != key:
            weight = torch.cat([m.weight.detach() for m in convs])
            bias = torch.cat([m.bias.detach() for m in convs])
            self._fused = (key, weight, bias)
        return self._fused[1], self._fused[2]

    def _lstm_fused(self, f: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None):
        weight, bias = self._gate_weights()
        if h is None:  # first stage: h = 0, only the feature half of the gates contributes
            w, x = weight[:, : f.shape[1]], f
        else:
            w, x = weight, torch.cat([f, h], 1)
        z = F.conv2d(x, w, bias, padding=1)
        i, fg, g, o = z.chunk(4, dim=1)
        if torch.is_grad_enabled():
            i, o, g = torch.sigmoid(i), torch.sigmoid(o), torch.tanh(g)
            c = i * g if c is None else torch.sigmoid(fg) * c + i * g
            return o * torch.tanh(c), c
        # no autograd graph: the gate views of z and the previous cell state are overwritten in place
        i, o, g = i.sigmoid_(), o.sigmoid_(), g.tanh_()
        c = i.mul_(g) if c is None else c.mul_(fg.sigmoid_()).addcmul_(i, g)
        return torch.tanh(c).mul_(o), c

    def _lstm(self, f: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None):
        """The ConvLSTM as the paper writes it: four separate gate convs on cat(features, hidden)."""
        if h is None:
            h = c = torch.zeros_like(f)
        fh = torch.cat([f, h], 1)
        i, fg = torch.sigmoid(self.conv_i(fh)), torch.sigmoid(self.conv_f(fh))
        g, o = torch.tanh(self.conv_g(fh)), torch.sigmoid(self.conv_o(fh))
        c = fg * c + i * g
        return o * torch.tanh(c), c

    def forward(self, rainy: torch.Tensor) -> torch.Tensor:
        """rainy [B,3,H,W] in [0,1] -> derained [B,3,H,W] (the last stage's estimate, not clamped)."""
        if rainy.ndim != 4 or rainy.shape[1] != 3:
            raise ValueError(f"PReNet expects a rainy batch [B,3,H,W], got shape {tuple(rainy.shape)}")
        if not self.fast or self._hooked() or _tracing():
            return self._forward_plain(rainy)
        if prenet_cpu.available(rainy):
            return prenet_cpu.forward(self, rainy)
        inplace = not torch.is_grad_enabled()  # no autograd graph: intermediate tensors can be reused
        relu = F.relu_ if inplace else F.relu
        x, h, c = rainy, None, None
        for _ in range(self.config["stages"]):
            f = relu(self.conv0[0](torch.cat([rainy, x], 1)))
            if self.config["recurrent"]:
                h, c = self._lstm_fused(f, h, c)
                f = h
            for k, block in enumerate(self._blocks()):
                r = relu(block[0](f))
                r = relu(block[2](r))
                r = r.add_(f) if inplace else r + f
                # relu(sum) is the identity when f >= 0: after a ReLU (conv0, or an earlier block's sum);
                # only the first block after the LSTM (h in (-1, 1)) needs it
                f = relu(r) if k == 0 and self.config["recurrent"] else r
            x = self.conv[0](f)
            x = x.add_(rainy) if inplace else x + rainy
        return x

    def _hooked(self) -> bool:
        """Whether a submodule carries forward hooks (e.g. DFMC's teacher features): the fast path calls the
        convs' functions directly and would bypass them, so the module-by-module path runs instead."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules() if m is not self)

    def _forward_plain(self, rainy: torch.Tensor) -> torch.Tensor:
        """The forward as the paper writes it, module by module (the reference of the fast path)."""
        x, h, c = rainy, None, None
        for _ in range(self.config["stages"]):
            f = self.conv0(torch.cat([rainy, x], 1))
            if self.config["recurrent"]:
                h, c = self._lstm(f, h, c)
                f = h
            for block in self._blocks():
                f = F.relu(block(f) + f)
            x = self.conv(f) + rainy
        return x


def _tracing() -> bool:
    """Whether the forward is being traced, scripted-traced or exported (ONNX, torch.export, torch.compile): those
    record the module-by-module path, which holds no NNPACK op and no cached weights."""
    compiler = getattr(torch, "compiler", None)
    compiling = bool(compiler and (compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()))
    return torch.jit.is_tracing() or torch.jit.is_scripting() or compiling


def detect(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` has PReNet's official layout (any of the four variants, any width)."""
    return "conv0.0.weight" in state and "res_conv1.0.weight" in state and "conv.0.weight" in state


def kwargs_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """Constructor kwargs matching a PReNet-family state_dict: width from conv0, recurrent from the gate
    keys, recursive from the absence of res_conv2. The stage count is not stored: the official 6."""
    missing = [k for k in ("conv0.0.weight", "res_conv1.0.weight", "conv.0.weight") if k not in state]
    if missing:
        raise KeyError(f"not a PReNet state_dict: missing {missing}")
    return dict(channels=int(state["conv0.0.weight"].shape[0]), stages=6,
                recurrent="conv_i.0.weight" in state, recursive="res_conv2.0.weight" not in state)
