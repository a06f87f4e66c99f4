"""PReNet (Ren et al., CVPR 2019, "Progressive Image Deraining Networks"): PReNet, PReNet_r, PRN, PRN_r.

Built from the paper and the official key layout (nn.Sequential indices, so official `.pth` files load
strictly). Each of `stages` stages sees the rainy input y and the current estimate x (x = y at the start):

    f   = ReLU(conv0(cat(y, x)))                          # [B,6,H,W] -> [B,C,H,W]
    h,c = ConvLSTM(f, h, c)  (recurrent only)              # gates conv_{i,f,g,o} on cat(f, h): 2C -> C each
    f   = ReLU(res_k(f) + f), k = 1..5                      # res_k = conv, ReLU, conv, ReLU
    x   = conv(f) + y                                       # [B,C,H,W] -> [B,3,H,W]

The last stage's x is the output. The recursive `_r` variants reuse `res_conv1` for all five blocks; PRN
drops the ConvLSTM. The four official models are four settings of `recurrent` and `recursive`.

Speed: the four gate convs run as one 2C -> 4C conv. For a frozen network (or under no_grad) the weights
are concatenated once and cached (keyed on the parameters' versions, so a load_state_dict or an optimiser
step invalidates them); the first stage skips the hidden-state half of the gates (h = 0). The state_dict
keeps the official keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        fused_gates: run the four gate convs as one conv (same result to float rounding); False gives the
            straightforward four-conv ConvLSTM (the reference of the equivalence test and the benchmark).
    """

    def __init__(self, channels: int = 32, stages: int = 6, recurrent: bool = True, recursive: bool = False,
                 fused_gates: bool = True) -> None:
        super().__init__()
        if channels < 1 or stages < 1:
            raise ValueError(f"PReNet needs channels >= 1 and stages >= 1, got {channels} and {stages}")
        self.config = dict(channels=channels, stages=stages, recurrent=recurrent, recursive=recursive)
        self.fused_gates = fused_gates
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
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        if self._fused is None or self._fused[0] != key:
            weight = torch.cat([m.weight.detach() for m in convs])
            bias = torch.cat([m.bias.detach() for m in convs])
            self._fused = (key, weight, bias)
        return self._fused[1], self._fused[2]

    def _lstm_fused(self, f: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None):
        weight, bias = self._gate_weights()
        if h is None:  # first stage: h = 0, only the feature half of the gates contributes
            z = F.conv2d(f, weight[:, : f.shape[1]], bias, padding=1)
        else:
            z = F.conv2d(torch.cat([f, h], 1), weight, bias, padding=1)
        i, fg, g, o = z.chunk(4, dim=1)
        i, o, g = torch.sigmoid(i), torch.sigmoid(o), torch.tanh(g)
        c = i * g if c is None else torch.sigmoid(fg) * c + i * g
        return o * torch.tanh(c), c

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
        lstm = self._lstm_fused if self.fused_gates else self._lstm
        x, h, c = rainy, None, None
        blocks = self._blocks()
        for _ in range(self.config["stages"]):
            f = self.conv0(torch.cat([rainy, x], 1))
            if self.config["recurrent"]:
                h, c = lstm(f, h, c)
                f = h
            for block in blocks:
                f = F.relu(block(f) + f)
            x = self.conv(f) + rainy
        return x


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


def half_kwargs(kwargs: dict) -> dict:
    """The half-width student: channels halved (32 -> 16), the rest kept."""
    return {**kwargs, "channels": kwargs.get("channels", 32) // 2}
