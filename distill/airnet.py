"""AirNet (Li et al., CVPR 2022), re-implemented with the official module tree and state_dict keys.

The model is `R` (DGRN, the restorer) conditioned on `E` (CBDE, a MoCo pair of ResEncoders). Facts are
in docs/design.md ("Networks"); the official checkpoints (a bare state_dict, keys `R.*` and
`E.E.*`) load with strict=True. In the official code the restorer only consumes `inter`, the
full-resolution output of the query encoder's first block (`E_pre`), so eval skips the rest of the encoder.

Widths: `n_feats` is the restorer width and, derived from it, the width of `E_pre`: the DGM consumes `inter` with
n_feats channels, so the two are equal (Half-AirNet: 32/32, about 4.46M parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from d4ir.distill.deform import IMPLS, deform_conv3x3
from torch import nn

_SLOPE = 0.1  # every activation in AirNet is LeakyReLU(0.1)


def _conv(c_in: int, c_out: int, k: int = 3, bias: bool = True) -> nn.Conv2d:
    """The official `default_conv`: 'same' padding, bias on by default."""
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias)


# ---------------------------------------------------------------------------------------------------
# CBDE: MoCo pair of ResEncoders
# ---------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """conv3x3-BN-LReLU-conv3x3-BN plus a conv1x1-BN shortcut, then LReLU.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first conv and of the shortcut.
    """

    def __init__(self, *, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(_SLOPE, inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.backbone(x) + self.shortcut(x), _SLOPE)


class ResEncoder(nn.Module):
    """Degradation encoder: E_pre (full resolution) -> two stride-2 blocks -> pooled 256-d feature -> MLP.

    Args:
        first: width of E_pre (its output is `inter`); 64 in the official model.
    """

    def __init__(self, *, first: int = 64) -> None:
        super().__init__()
        self.E_pre = ResBlock(c_in=3, c_out=first, stride=1)
        self.E = nn.Sequential(
            ResBlock(c_in=first, c_out=128, stride=2),
            ResBlock(c_in=128, c_out=256, stride=2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.mlp = nn.Sequential(nn.Linear(256, 256), nn.LeakyReLU(_SLOPE, inplace=True), nn.Linear(256, 256))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,3,H,W] -> (fea [B,256], mlp(fea) [B,256], inter [B,first,H,W])."""
        inter = self.E_pre(x)
        fea = self.E(inter).flatten(1)
        return fea, self.mlp(fea), inter


class MoCo(nn.Module):
    """MoCo wrapper (`E.E` in the checkpoint): query/key encoders, a queue of K past keys.

    Args:
        first: width of each encoder's E_pre.
        queue_size: K, the number of negatives kept (differs per official checkpoint: 1280, 768, 256).
        dim: feature dimension of the keys (hard-coded 256 in the official code).
        momentum: key-encoder momentum m.
        temperature: InfoNCE temperature T.
    """

    def __init__(
        self, *, first: int = 64, queue_size: int = 1280, dim: int = 256, momentum: float = 0.999,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.momentum, self.temperature = momentum, temperature
        self.encoder_q = ResEncoder(first=first)
        self.encoder_k = ResEncoder(first=first)
        # The key encoder starts as a copy and is only moved by the momentum update, never by gradients.
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # [dim, K]
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # [1] int64

    def inter(self, x: torch.Tensor) -> torch.Tensor:
        """Only what the restorer needs: E_pre of the query encoder, [B,3,H,W] -> [B,first,H,W]."""
        return self.encoder_q.E_pre(x)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write keys [N,dim] into the ring buffer at queue_ptr, wrapping around (N need not divide K)."""
        k_len = self.queue.shape[1]
        keys = keys[-k_len:]  # a batch larger than the queue keeps its newest K keys
        n = keys.shape[0]
        ptr = int(self.queue_ptr.item())
        idx = (ptr + torch.arange(n, device=keys.device)) % k_len
        self.queue[:, idx] = keys.t().to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + n) % k_len

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train step. im_q, im_k [B,3,h,w] (two crops of the same degraded images).

        Returns (fea [B,256], logits [B,1+K], labels [B] int64 (all 0: the positive is column 0),
        inter [B,first,h,w]).
        """
        fea, q, inter = self.encoder_q(im_q)
        q = F.normalize(q, dim=1)
        with torch.no_grad():
            self._momentum_update()
            _, k, _ = self.encoder_k(im_k)
            k = F.normalize(k, dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # [B,1]
        l_neg = q @ self.queue.clone().detach()  # [B,K]
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._enqueue(k)
        return fea, logits, labels, inter


class CBDE(nn.Module):
    """Contrastive-based degradation encoder; its only child is the MoCo wrapper `E`.

    Args:
        first: width of E_pre.
        queue_size: MoCo queue length K.
    """

    def __init__(self, *, first: int = 64, queue_size: int = 1280) -> None:
        super().__init__()
        self.E = MoCo(first=first, queue_size=queue_size)

    def forward(self, x_query: torch.Tensor, x_key: torch.Tensor):
        return self.E(x_query, x_key)


# ---------------------------------------------------------------------------------------------------
# DGRN: degradation-guided restoration network
# ---------------------------------------------------------------------------------------------------


class DCNLayer(nn.Module):
    """Modulated deformable conv 3x3 (DCNv2) whose offsets and mask come from [x, inter].

    `distill.deform.deform_conv3x3` computes mmcv's modulated_deform_conv2d (= torchvision's deform_conv2d:
    channel 2k is dy and 2k+1 is dx of tap k; zero-outside bilinear rule), so no re-ordering is needed.

    Args:
        channels: in = out channels (n_feats); `inter` must have the same width.
        deform: implementation (distill.deform.IMPLS); None: the process default. Not a weight or a config key.
    """

    def __init__(self, *, channels: int, deform: str | None = None) -> None:
        super().__init__()
        self.deform = deform
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))  # no bias in the official model
        # 27 = 2*9 offsets + 9 mask logits; zero-initialised so training starts as a plain conv.
        self.conv_offset_mask = nn.Conv2d(2 * channels, 27, 3, padding=1, bias=True)
        stdv = 1.0 / math.sqrt(channels * 9)
        nn.init.uniform_(self.weight, -stdv, stdv)
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
        om = self.conv_offset_mask(torch.cat([x, inter], dim=1))  # [B,27,H,W]
        o1, o2, logits = torch.chunk(om, 3, dim=1)
        offset = torch.cat([o1, o2], dim=1)  # [B,18,H,W]
        return deform_conv3x3(x, offset, self.weight, torch.sigmoid(logits), impl=self.deform)


class SFTLayer(nn.Module):
    """Spatial feature transform: x * gamma(inter) + beta(inter), 1x1 conv pairs without bias.

    Args:
        channels: width of x and inter.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()

        def branch() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels, channels, 1, bias=False),
                nn.LeakyReLU(_SLOPE, inplace=True),
                nn.Conv2d(channels, channels, 1, bias=False),
            )

        self.conv_gamma = branch()
        self.conv_beta = branch()

    def forward(self, x: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
        return x * self.conv_gamma(inter) + self.conv_beta(inter)


class DGM(nn.Module):
    """Degradation-guided module: x + dcn(x, inter) + sft(x, inter) (no activation inside).

    Args:
        channels: n_feats.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.dcn = DCNLayer(channels=channels)
        self.sft = SFTLayer(channels=channels)

    def forward(self, x: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
        return x + self.dcn(x, inter) + self.sft(x, inter)


class DGB(nn.Module):
    """Degradation-guided block: DGM-LReLU-conv-LReLU-DGM-LReLU-conv, plus the block input.

    Args:
        channels: n_feats.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.dgm1 = DGM(channels=channels)
        self.dgm2 = DGM(channels=channels)
        self.conv1 = _conv(channels, channels)
        self.conv2 = _conv(channels, channels)

    def forward(self, x: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.dgm1(x, inter), _SLOPE)
        out = F.leaky_relu(self.conv1(out), _SLOPE)
        out = F.leaky_relu(self.dgm2(out, inter), _SLOPE)
        return self.conv2(out) + x


class DGG(nn.Module):
    """Degradation-guided group: `body` = n_blocks DGBs then a conv3x3; plus the group input.

    Args:
        channels: n_feats.
        n_blocks: DGBs in the group.
    """

    def __init__(self, *, channels: int, n_blocks: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*[DGB(channels=channels) for _ in range(n_blocks)], _conv(channels, channels))

    def forward(self, x: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
        res = x
        for block in self.body[:-1]:
            res = block(res, inter)
        return self.body[-1](res) + x


class DGRN(nn.Module):
    """Restorer: head conv, n_groups DGGs and a conv with a long skip, tail conv (no image residual).

    Args:
        n_feats: feature width.
        n_groups: DGGs.
        n_blocks: DGBs per DGG.
    """

    def __init__(self, *, n_feats: int = 64, n_groups: int = 5, n_blocks: int = 5) -> None:
        super().__init__()
        self.head = nn.Sequential(_conv(3, n_feats))
        self.body = nn.Sequential(
            *[DGG(channels=n_feats, n_blocks=n_blocks) for _ in range(n_groups)], _conv(n_feats, n_feats)
        )
        self.tail = nn.Sequential(_conv(n_feats, 3))

    def forward(self, x: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
        """x [B,3,H,W], inter [B,n_feats,H,W] -> restored [B,3,H,W]."""
        x = self.head(x)
        res = x
        for group in self.body[:-1]:
            res = group(res, inter)
        return self.tail(self.body[-1](res) + x)


# ---------------------------------------------------------------------------------------------------
# AirNet
# ---------------------------------------------------------------------------------------------------


class AirNet(nn.Module):
    """All-in-one image restoration network; children `R` (DGRN) and `E` (CBDE), in the official order.

    `model(x)` returns the restored image [B,3,H,W] in either mode (only E_pre of the query encoder runs).
    `model(x_query, x_key)` in train mode is the official training forward and returns
    (restored, logits [B,1+K], labels [B]) for the InfoNCE loss `cross_entropy(logits, labels)`;
    in eval mode x_key is ignored, as in the official code.

    Args:
        n_feats: restorer width (64 official, 32 for Half-AirNet); the encoders' E_pre has the same width, since
            the restorer's DGMs consume its output `inter` with n_feats channels.
        queue_size: MoCo queue length K (1280 for All.pth, 768 Denoise, 256 Derain/Dehaze).
        n_groups: DGGs in the restorer.
        n_blocks: DGBs per DGG.
        deform: deformable-conv implementation of every DCN layer (see `set_deform`); not part of `config`.
        encoder_first: the E_pre width that configs and checkpoints written before it was derived carry; read only
            to check that it equals n_feats, and not part of `config`.
    """

    def __init__(
        self, *, n_feats: int = 64, queue_size: int = 1280, n_groups: int = 5, n_blocks: int = 5,
        deform: str | None = None, encoder_first: int | None = None,
    ) -> None:
        super().__init__()
        if encoder_first is not None and encoder_first != n_feats:
            raise ValueError(
                f"AirNet needs encoder_first == n_feats (the restorer's DGMs consume the encoder's E_pre "
                f"output `inter` with n_feats channels); got encoder_first={encoder_first}, n_feats={n_feats}"
            )
        for name, v in (("n_feats", n_feats), ("queue_size", queue_size), ("n_groups", n_groups),
                        ("n_blocks", n_blocks)):
            if int(v) < 1:
                raise ValueError(f"AirNet {name} must be >= 1, got {v}")
        self.config = dict(n_feats=n_feats, queue_size=queue_size, n_groups=n_groups, n_blocks=n_blocks)
        self.R = DGRN(n_feats=n_feats, n_groups=n_groups, n_blocks=n_blocks)
        self.E = CBDE(first=n_feats, queue_size=queue_size)
        self.set_deform(deform)

    def set_deform(self, impl: str | None) -> AirNet:
        """Use `impl` ("auto", "gather", "sample", "torchvision"; None: distill.deform's process default) in every
        DCN layer; weights and state_dict keys are unchanged."""
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"AirNet deform must be one of {IMPLS} or None, got {impl!r}")
        for m in self.modules():
            if isinstance(m, DCNLayer):
                m.deform = impl
        return self

    def forward(self, x_query: torch.Tensor, x_key: torch.Tensor | None = None):
        if x_query.ndim != 4 or x_query.shape[1] != 3:
            raise ValueError(f"AirNet expects a degraded batch [B,3,H,W], got shape {tuple(x_query.shape)}")
        if self.training and x_key is not None:
            _, logits, labels, inter = self.E(x_query, x_key)
            return self.R(x_query, inter), logits, labels
        return self.R(x_query, self.E.E.inter(x_query))


def airnet_kwargs_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """Constructor kwargs that make `AirNet(**kwargs)` match an (official or our) AirNet state_dict.

    Reads K from `E.E.queue` [256,K], n_feats from `R.head.0.weight`, the group/block counts from the key names;
    the E_pre width must be n_feats (AirNet's DGMs consume its output).
    """
    required = ("E.E.queue", "R.head.0.weight", "E.E.encoder_q.E_pre.backbone.0.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise KeyError(f"not an AirNet state_dict: missing {missing}")
    groups = {int(k.split(".")[2]) for k in sd if k.startswith("R.body.") and ".body." in k[len("R.body."):]}
    blocks = {int(k.split(".")[4]) for k in sd if k.startswith("R.body.0.body.") and ".dgm1." in k}
    n_feats = int(sd["R.head.0.weight"].shape[0])
    first = int(sd["E.E.encoder_q.E_pre.backbone.0.weight"].shape[0])
    return dict(
        n_feats=n_feats,
        queue_size=int(sd["E.E.queue"].shape[1]),
        n_groups=len(groups),
        n_blocks=len(blocks),
    ) | ({} if first == n_feats else {"encoder_first": first})  # refused by AirNet, naming both widths
