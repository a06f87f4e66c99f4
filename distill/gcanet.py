"""GCANet (Chen et al., WACV 2019, "Gated Context Aggregation Network for Image Dehazing and Deraining").

Re-implemented from the paper and the key layout of the official checkpoints (`wacv_gcanet_dehaze.pth`,
`wacv_gcanet_derain.pth`: 75 tensors, 702,818 parameters), which load with strict=True.

Network (feature width C, 64 official): a stem of three bias-free 3x3 convs with affine InstanceNorm and ReLU
(`conv1/norm1` .. `conv3/norm3`; conv3 has stride 2, so the body runs at half resolution); six smoothed
dilated residual blocks `res1..res6` with dilations 2,2,2,4,4,4, each conv preceded by a separable kernel of
side 2d-1 shared by all channels (`pre_convN`, one [1,1,k,k] weight); a plain residual block `res7`; the gated
fusion of three levels (the stem output, res4's and res7's): `gate` (3x3C -> 3) predicts one weight map per
level, and the fused map is their weighted sum (no normalisation of the weights); then `deconv3` (transposed
4x4, stride 2) + norm4 + ReLU, `deconv2` (3x3) + norm5 + ReLU, `deconv1` (1x1 to RGB).

Everything the authors' test script does around the network happens inside `forward`, so the model takes and
returns the project's contract, RGB in [0,1] [B,3,H,W] -> RGB [B,3,H,W] of the same size:
1. scale to 0..255 and append the edge map (`edge_map`) as a fourth channel, then subtract 128 from all four;
2. size rule: the authors resize H and W *down* to multiples of 4 (so their output is smaller than the input).
   Here the 4-channel input is reflect-padded at the bottom/right to the next multiples of 4 and the output
   cropped back. Sizes already multiple of 4 (SOTS-indoor 620x460, Test1200 512x512) run exactly the authors'
   computation; other sizes see up to 3 mirrored rows/columns, which enter the InstanceNorm statistics and the
   receptive field of the pixels near the bottom/right edge, instead of a resampled (blurred) image;
3. output: dehaze adds the input (`residual=True`, the authors' only_residual), derain takes ReLU(net)
   (`residual=False`: the authors trained their deraining model without the residual by mistake); divide by 255.
The authors then round and clamp to 0..255 (`official_quantize`); the model itself does not, so that it
stays differentiable with respect to its input.

The residual flag is not in the checkpoint (both files have the same keys and shapes): the loader takes it from
the registry name (`gcanet-dehaze` / `gcanet-derain`). The wrong flag ruins the output (the derain weights with
the residual rule give 7 to 10 dB on Test1200 samples instead of 30 to 35).

InstanceNorm normalises over the whole image, so tiled inference differs from whole-image inference. The model
scripts with TorchScript; torch.export works with static shapes (in torch 2.14 the symbolic shape solver cannot
prove the pad-then-crop arithmetic for dynamic H and W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from d4ir.distill.sizes import pad_to_multiple
from torch import nn

SIZE_MULTIPLE = 4  # the authors' test script brings H and W to multiples of 4
DILATIONS = (2, 2, 2, 4, 4, 4)  # res1..res6


def edge_map(img: torch.Tensor) -> torch.Tensor:
    """The authors' edge channel: [B,3,H,W] (any scale; 0..255 for GCANet) -> [B,1,H,W] in the same scale.

    At each pixel, the absolute differences with its left, right, upper and lower neighbours (those that exist)
    are summed over the four directions and the three channels and divided by 12 (the mean over channels of
    the sum over directions, divided by 4).
    """
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs()  # [B,3,H,W-1]
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs()  # [B,3,H-1,W]
    total = F.pad(dx, (1, 0)) + F.pad(dx, (0, 1)) + F.pad(dy, (0, 0, 1, 0)) + F.pad(dy, (0, 0, 0, 1))
    return total.sum(dim=1, keepdim=True) / 12.0


def official_quantize(out: torch.Tensor) -> torch.Tensor:
    """The authors' output quantisation: round to the nearest of 256 levels and clamp, [0,1] scale in and out
    (their test script saves `round(pred).clamp(0, 255)` as uint8)."""
    return (out * 255.0).round().clamp(0.0, 255.0) / 255.0


class SharedSeparableConv(nn.Module):
    """One k x k kernel applied to every channel separately ('same' padding): the smoothing before a dilated
    conv. Initialised to the identity (a centred delta), as the paper's smoothed dilated convolution.

    Args:
        kernel_size: odd side k (2d-1 for dilation d).
    """

    def __init__(self, *, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        weight = torch.zeros(1, 1, kernel_size, kernel_size)
        weight[0, 0, kernel_size // 2, kernel_size // 2] = 1.0
        self.weight = nn.Parameter(weight)  # [1,1,k,k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        k = self.weight.shape[-1]
        return F.conv2d(x, self.weight.expand(c, 1, k, k), padding=k // 2, groups=c)


class SmoothDilatedBlock(nn.Module):
    """Residual block of two (smoothing -> dilated 3x3 conv -> InstanceNorm) units: relu(x + n2(c2(s2(relu(n1(c1(
    s1(x)))))))).

    Args:
        channels: feature width.
        dilation: dilation d of both convs; the smoothing kernels have side 2d-1.
    """

    def __init__(self, *, channels: int, dilation: int) -> None:
        super().__init__()
        k = 2 * dilation - 1
        self.pre_conv1 = SharedSeparableConv(kernel_size=k)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm1 = nn.InstanceNorm2d(channels, affine=True)
        self.pre_conv2 = SharedSeparableConv(kernel_size=k)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm2 = nn.InstanceNorm2d(channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(self.pre_conv1(x))))
        return F.relu(x + self.norm2(self.conv2(self.pre_conv2(y))))


class ResidualBlock(nn.Module):
    """Plain residual block: relu(x + n2(c2(relu(n1(c1(x)))))), bias-free 3x3 convs.

    Args:
        channels: feature width.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm2d(channels, affine=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm2d(channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


class GCANet(nn.Module):
    """Gated context aggregation network with the official module tree; RGB [0,1] [B,3,H,W] in and out.

    Args:
        channels: feature width C (64 official; 32 for the half-width student).
        residual: True adds the input to the network's output (the dehazing model); False takes ReLU of the
            output (the deraining model). Not recorded in the weights.
    """

    def __init__(self, *, channels: int = 64, residual: bool = True) -> None:
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f"GCANet channels must be >= 1, got {channels}")
        self.config = dict(channels=int(channels), residual=bool(residual))
        c = int(channels)
        self.residual = bool(residual)
        self.size_multiple = SIZE_MULTIPLE  # an attribute, not the global, so that TorchScript can read it
        self.conv1 = nn.Conv2d(4, c, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm2d(c, affine=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm2d(c, affine=True)
        self.conv3 = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
        self.norm3 = nn.InstanceNorm2d(c, affine=True)
        for i, d in enumerate(DILATIONS, start=1):
            self.add_module(f"res{i}", SmoothDilatedBlock(channels=c, dilation=d))
        self.res7 = ResidualBlock(channels=c)
        self.gate = nn.Conv2d(3 * c, 3, 3, padding=1)
        self.deconv3 = nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)
        self.norm4 = nn.InstanceNorm2d(c, affine=True)
        self.deconv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm5 = nn.InstanceNorm2d(c, affine=True)
        self.deconv1 = nn.Conv2d(c, 3, 1)

    def network(self, inp: torch.Tensor) -> torch.Tensor:
        """The authors' network alone: [B,4,H,W] (RGB 0..255 + edge, minus 128; H, W even) -> [B,3,H,W] in the
        0..255 scale (the residual for dehazing, the image before its ReLU for deraining)."""
        y = F.relu(self.norm1(self.conv1(inp)))
        y = F.relu(self.norm2(self.conv2(y)))
        low = F.relu(self.norm3(self.conv3(y)))  # [B,C,H/2,W/2]
        y = self.res3(self.res2(self.res1(low)))
        mid = self.res4(y)
        high = self.res7(self.res6(self.res5(mid)))
        g = self.gate(torch.cat((low, mid, high), dim=1))  # [B,3,H/2,W/2]: one weight map per level
        fused = low * g[:, 0:1] + mid * g[:, 1:2] + high * g[:, 2:3]
        y = F.relu(self.norm4(self.deconv3(fused)))
        y = F.relu(self.norm5(self.deconv2(y)))
        return self.deconv1(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: RGB [B,3,H,W] in [0,1] -> restored RGB [B,3,H,W] (not clamped, not quantised)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"GCANet expects an RGB batch [B,3,H,W], got shape {list(x.shape)}")
        h, w = x.shape[-2:]
        img = x * 255.0
        inp = torch.cat((img, edge_map(img)), dim=1) - 128.0  # [B,4,H,W]
        out = self.network(pad_to_multiple(inp, self.size_multiple))[..., :h, :w]
        out = out + img if self.residual else F.relu(out)
        return out / 255.0


_REQUIRED = ("conv1.weight", "conv3.weight", "res1.pre_conv1.weight", "res7.conv1.weight", "gate.weight",
             "deconv3.weight", "deconv1.weight")


def detect(state: dict[str, torch.Tensor]) -> bool:
    """True for a GCANet state_dict in the official layout: its characteristic keys, a 4-channel first conv
    (RGB + edge) and a gate fusing three levels."""
    if not all(k in state for k in _REQUIRED):
        return False
    conv1, gate = state["conv1.weight"], state["gate.weight"]
    return conv1.ndim == 4 and conv1.shape[1] == 4 and gate.ndim == 4 and gate.shape[:2] == (3, 3 * conv1.shape[0])


def kwargs_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """Constructor kwargs matching an official (or our) GCANet state_dict: the width from `conv1.weight`
    [C,4,3,3]. `residual` cannot be read from the weights and is left to the caller (the registry name);
    the dehaze and derain files differ only in their values."""
    if not detect(state):
        raise KeyError(f"not a GCANet state_dict: needs {list(_REQUIRED)} with conv1 [C,4,3,3] and gate [3,3C,3,3]")
    return dict(channels=int(state["conv1.weight"].shape[0]))
