"""Light-DehazeNet (Ullah et al., IEEE TIP 2021, "Light-DehazeNet: A Novel Lightweight CNN Architecture for
Single Image Dehazing"), re-implemented from the paper and the key layout of the official checkpoint
(`trained_LDNet.pth`: `e_conv_layer{1..8}.{weight,bias}`, 30,187 parameters), which loads with strict=True.

Like AOD-Net, the network estimates one map K(x) that folds the transmission and the atmospheric light of the
scattering model into a single quantity, and restores J = relu(K * I - K + 1) (the model's bias b = 1). K comes
from eight convs with ReLU, in three widths (w = 8 official) joined by concatenations (the channel counts of the
checkpoint fix which layers are joined):

    f1 = conv1(I)          1x1, 3 -> w          f4 = conv4([f1, f3])   7x7, 2w -> 2w
    f2 = conv2(f1)         3x3, w -> w          f5 = conv5(f4)         3x3, 2w -> 2w
    f3 = conv3(f2)         5x5, w -> w          f6 = conv6(f5)         3x3, 2w -> 2w
    f7 = conv7([f4, f6])   3x3, 4w -> 4w        K  = conv8([f2, f5, f7])  3x3, 7w -> 3

All convs are stride 1 with 'same' padding, so any H x W works; the input is RGB in [0,1] (the authors' scripts
divide the 8-bit image by 255) and the output is RGB of the same size, not clamped above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LightDehazeNet(nn.Module):
    """Light-DehazeNet with the official module names; RGB [0,1] [B,3,H,W] in, RGB [B,3,H,W] out.

    Args:
        width: channels of the first three convs, w (8 official; 4 for the half-width student); the middle
            convs have 2w channels, conv7 4w, and conv8 reads the 7w channels of [f2, f5, f7].
    """

    def __init__(self, *, width: int = 8) -> None:
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"LightDehazeNet width must be >= 1, got {width}")
        w = int(width)
        self.config = dict(width=w)
        self.e_conv_layer1 = nn.Conv2d(3, w, 1)
        self.e_conv_layer2 = nn.Conv2d(w, w, 3, padding=1)
        self.e_conv_layer3 = nn.Conv2d(w, w, 5, padding=2)
        self.e_conv_layer4 = nn.Conv2d(2 * w, 2 * w, 7, padding=3)
        self.e_conv_layer5 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.e_conv_layer6 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.e_conv_layer7 = nn.Conv2d(4 * w, 4 * w, 3, padding=1)
        self.e_conv_layer8 = nn.Conv2d(7 * w, 3, 3, padding=1)

    def k_map(self, x: torch.Tensor) -> torch.Tensor:
        """K(x): [B,3,H,W] in [0,1] -> [B,3,H,W] >= 0."""
        f1 = F.relu(self.e_conv_layer1(x))
        f2 = F.relu(self.e_conv_layer2(f1))
        f3 = F.relu(self.e_conv_layer3(f2))
        f4 = F.relu(self.e_conv_layer4(torch.cat((f1, f3), dim=1)))
        f5 = F.relu(self.e_conv_layer5(f4))
        f6 = F.relu(self.e_conv_layer6(f5))
        f7 = F.relu(self.e_conv_layer7(torch.cat((f4, f6), dim=1)))
        return F.relu(self.e_conv_layer8(torch.cat((f2, f5, f7), dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: hazy RGB [B,3,H,W] in [0,1] -> dehazed RGB [B,3,H,W] = relu(K*x - K + 1)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LightDehazeNet expects an RGB batch [B,3,H,W], got shape {list(x.shape)}")
        k = self.k_map(x)
        return F.relu(k * x - k + 1.0)


_REQUIRED = tuple(f"e_conv_layer{i}.{p}" for i in range(1, 9) for p in ("weight", "bias"))


def detect(state: dict[str, torch.Tensor]) -> bool:
    """True for a Light-DehazeNet state_dict in the official layout: the 16 `e_conv_layer{1..8}` tensors, an RGB
    1x1 first conv and a last conv to RGB."""
    if not all(k in state for k in _REQUIRED):
        return False
    first, last = state["e_conv_layer1.weight"], state["e_conv_layer8.weight"]
    return first.ndim == 4 and first.shape[1:] == (3, 1, 1) and last.ndim == 4 and last.shape[0] == 3


def kwargs_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """Constructor kwargs matching an official (or our) Light-DehazeNet state_dict: the width w from
    `e_conv_layer1.weight` [w,3,1,1]."""
    if not detect(state):
        raise KeyError("not a Light-DehazeNet state_dict: needs e_conv_layer1..8 weights and biases, "
                       "e_conv_layer1 [w,3,1,1] and e_conv_layer8 [3,7w,3,3]")
    return dict(width=int(state["e_conv_layer1.weight"].shape[0]))
