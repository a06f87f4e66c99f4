"""Restormer (Zamir et al., CVPR 2022), re-implemented with the official module tree and state_dict keys.

Facts are in docs/design.md ("Networks"). A 4-level U-shaped transformer of MDTA (transposed,
channel-wise attention) and GDFN (gated depthwise feed-forward) blocks, with a global image residual.
The official deraining checkpoint (`{'params': sd}`, 494 keys) loads strictly at the defaults; students
use dim 24 or 12. H and W must be multiples of 8 (three 2x downsamplings); `distill.inference.restore`
pads like the official test script.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYERNORM_TYPES = ("WithBias", "BiasFree")


class _LayerNormBody(nn.Module):
    """Per-pixel LayerNorm over channels of [B,C,H,W] (the official code flattens to [B,HW,C]).

    Args:
        channels: C.
        with_bias: 'WithBias' subtracts the mean and adds a bias; 'BiasFree' divides the raw x by the
            (centred) standard deviation and has no bias.
    """

    def __init__(self, *, channels: int, with_bias: bool) -> None:
        super().__init__()
        self.with_bias = with_bias
        self.weight = nn.Parameter(torch.ones(channels))
        if with_bias:
            self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.var(dim=1, keepdim=True, unbiased=False)  # [B,1,H,W], population variance
        w = self.weight.view(1, -1, 1, 1)
        if self.with_bias:
            mu = x.mean(dim=1, keepdim=True)
            return (x - mu) / torch.sqrt(var + 1e-5) * w + self.bias.view(1, -1, 1, 1)
        return x / torch.sqrt(var + 1e-5) * w


class LayerNorm(nn.Module):
    """Wrapper with the official child name `body` (keys `normX.body.weight`/`.bias`).

    Args:
        channels: C.
        layernorm_type: 'WithBias' or 'BiasFree'.
    """

    def __init__(self, *, channels: int, layernorm_type: str) -> None:
        super().__init__()
        if layernorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
        self.body = _LayerNormBody(channels=channels, with_bias=layernorm_type == "WithBias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Attention(nn.Module):
    """MDTA: multi-Dconv-head transposed attention, a (C/h)x(C/h) attention map per head.

    Args:
        channels: C.
        heads: h; C must be divisible by h.
        bias: conv biases.
    """

    def __init__(self, *, channels: int, heads: int, bias: bool) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"Restormer attention width {channels} is not divisible by {heads} heads")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(channels * 3, channels * 3, 3, padding=1, groups=channels * 3, bias=bias)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        # [B,C,H,W] -> [B,heads,C/heads,HW]; channel = head*(C/heads) + c, head is the outer factor.
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)  # [B,heads,C/h,C/h]
        return self.project_out((attn @ v).reshape(b, c, h, w))


class FeedForward(nn.Module):
    """GDFN: 1x1 expand to 2*hidden, depthwise 3x3, GELU(x1) * x2, 1x1 back.

    Args:
        channels: C.
        ffn_expansion_factor: hidden = int(C * factor).
        bias: conv biases.
    """

    def __init__(self, *, channels: int, ffn_expansion_factor: float, bias: bool) -> None:
        super().__init__()
        hidden = int(channels * ffn_expansion_factor)
        self.project_in = nn.Conv2d(channels, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """x + attn(norm1(x)), then + ffn(norm2(x)).

    Args:
        channels: C.
        heads: attention heads.
        ffn_expansion_factor: GDFN expansion.
        bias: conv biases.
        layernorm_type: 'WithBias' or 'BiasFree'.
    """

    def __init__(
        self, *, channels: int, heads: int, ffn_expansion_factor: float, bias: bool, layernorm_type: str
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(channels=channels, layernorm_type=layernorm_type)
        self.attn = Attention(channels=channels, heads=heads, bias=bias)
        self.norm2 = LayerNorm(channels=channels, layernorm_type=layernorm_type)
        self.ffn = FeedForward(channels=channels, ffn_expansion_factor=ffn_expansion_factor, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """conv3x3 in_channels -> dim, never with a bias (the official constructor does not pass it)."""

    def __init__(self, *, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """conv3x3 n -> n/2 then PixelUnshuffle(2): [B,n,H,W] -> [B,2n,H/2,W/2]."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """conv3x3 n -> 2n then PixelShuffle(2): [B,n,H,W] -> [B,n/2,2H,2W]."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Restormer(nn.Module):
    """Restormer without the dual-pixel option; forward(degraded [B,C_in,H,W]) -> restored [B,C_out,H,W].

    Args:
        inp_channels: input channels (3).
        out_channels: output channels (3); must equal inp_channels for the global residual.
        dim: width of level 1 (48 official; 24 and 12 for students); must be even.
        num_blocks: transformer blocks per level 1..4.
        num_refinement_blocks: blocks of the refinement stage.
        heads: attention heads per level 1..4.
        ffn_expansion_factor: GDFN hidden width factor.
        bias: conv biases inside the blocks and of the 1x1 reductions and output conv.
        layernorm_type: 'WithBias' (deraining/deblurring) or 'BiasFree' (denoising).
    """

    size_multiple = 8  # three 2x PixelUnshuffle steps

    def __init__(
        self, *, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
        layernorm_type: str = "WithBias",
    ) -> None:
        super().__init__()
        num_blocks, heads = [int(n) for n in num_blocks], [int(h) for h in heads]
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 entries, got {num_blocks} and {heads}")
        if dim < 2 or dim % 2:
            raise ValueError(f"Restormer dim must be a positive even number, got {dim}")
        if inp_channels != out_channels:
            raise ValueError("Restormer adds the input image to the output: inp_channels must equal out_channels")
        if layernorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
        self.config = dict(
            inp_channels=inp_channels, out_channels=out_channels, dim=dim, num_blocks=list(num_blocks),
            num_refinement_blocks=num_refinement_blocks, heads=list(heads),
            ffn_expansion_factor=ffn_expansion_factor, bias=bias, layernorm_type=layernorm_type,
        )

        def level(channels: int, n: int, h: int) -> nn.Sequential:
            return nn.Sequential(*[
                TransformerBlock(channels=channels, heads=h, ffn_expansion_factor=ffn_expansion_factor,
                                 bias=bias, layernorm_type=layernorm_type)
                for _ in range(n)
            ])

        self.patch_embed = OverlapPatchEmbed(in_channels=inp_channels, dim=dim)
        self.encoder_level1 = level(dim, num_blocks[0], heads[0])
        self.down1_2 = Downsample(channels=dim)
        self.encoder_level2 = level(dim * 2, num_blocks[1], heads[1])
        self.down2_3 = Downsample(channels=dim * 2)
        self.encoder_level3 = level(dim * 4, num_blocks[2], heads[2])
        self.down3_4 = Downsample(channels=dim * 4)
        self.latent = level(dim * 8, num_blocks[3], heads[3])
        self.up4_3 = Upsample(channels=dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = level(dim * 4, num_blocks[2], heads[2])
        self.up3_2 = Upsample(channels=dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = level(dim * 2, num_blocks[1], heads[1])
        self.up2_1 = Upsample(channels=dim * 2)
        # Level 1 of the decoder and the refinement stay at 2*dim channels (no reduction after concat).
        self.decoder_level1 = level(dim * 2, num_blocks[0], heads[0])
        self.refinement = level(dim * 2, num_refinement_blocks, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config["inp_channels"]:
            raise ValueError(
                f"Restormer expects [B,{self.config['inp_channels']},H,W], got shape {tuple(x.shape)}"
            )
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(
                f"Restormer needs H and W multiples of 8, got {tuple(x.shape[-2:])}; "
                "use distill.inference.restore (pads like the official test script)"
            )
        enc1 = self.encoder_level1(self.patch_embed(x))  # [B,dim,H,W]
        enc2 = self.encoder_level2(self.down1_2(enc1))  # [B,2dim,H/2,W/2]
        enc3 = self.encoder_level3(self.down2_3(enc2))  # [B,4dim,H/4,W/4]
        lat = self.latent(self.down3_4(enc3))  # [B,8dim,H/8,W/8]
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(lat), enc3], dim=1))
        dec3 = self.decoder_level3(dec3)  # [B,4dim,H/4,W/4]
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1))
        dec2 = self.decoder_level2(dec2)  # [B,2dim,H/2,W/2]
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], dim=1))  # [B,2dim,H,W]
        return self.output(self.refinement(dec1)) + x
