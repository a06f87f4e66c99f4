"""The prompt encoder: the paper's degradation-aware prompt adapter (DPA, Enc_DP), Eq. (3)-(5).

One encoder, two heads:

* a backbone of three residual blocks (AirNet's degradation encoder layout: 3 -> 64 -> 128 -> 256, the last
  two with stride 2) and a global average pool, giving the pooled feature ``h`` [B, C];
* a contrastive head, an MLP on ``h`` whose output is L2-normalised: the MoCo feature of Eq. (3) [B, F];
* a prompt head that maps ``h`` to L tokens of width D [B, L, D] that replace the text encoder's output in
  every cross-attention of the frozen UNet (Eq. (4)-(5)).

The prompt head reads ``h`` rather than the contrastive output because the projection head of a contrastive
model discards information the loss does not need (SimCLR's finding); ``h`` keeps more of the degradation.
It stays part of this module so that stage 3 can keep training it with the distillation loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# L = 77: the UNet was trained only on 77-token text contexts. Cross-attention normalises its softmax over
# the keys, and in Stable Diffusion most of the attention mass sits on the start token; a different token
# count changes that balance, so a short prompt equal to a truncated empty text is NOT the unconditional
# model. With L = 77 and the empty-text embedding as base, a fresh encoder reproduces SD's empty-prompt
# conditioning exactly, and the prompts have the shape of any text prompt (every attention kernel and the
# diffusers pipelines take them as `prompt_embeds`). The cost is storage: N x 77 x D fp16, about 118 KB
# per image for D = 768; pass a shorter `prompt_tokens` to trade fidelity for size.
DEFAULT_PROMPT_TOKENS = 77


class ResBlock(nn.Module):
    """conv3x3-BN-LeakyReLU(0.1)-conv3x3-BN plus a conv1x1-BN shortcut, then LeakyReLU (AirNet's ResBlock).

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first conv and of the shortcut (1 or 2).
    """

    def __init__(self, *, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.1),
            nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.backbone(x) + self.shortcut(x))


class PromptEncoder(nn.Module):
    """Enc_DP: degraded image [B,3,H,W] in [0,1] -> (contrastive feature [B,F], prompt [B,L,D]).

    Prompt scale. The prompts replace CLIP's hidden states, so their scale must be one the UNet knows:

    * with ``base_prompt`` (the empty-text embedding [1,L,D]) the prompt is ``base + gain * LN(r)``, where
      ``r`` [B,L,D] is the learned per-image residual, LN a LayerNorm without affine (each token unit RMS)
      and ``gain`` [D] the last layer, initialised to zero: a fresh encoder returns exactly the base.
      `set_prompt_strength` opens the gain to a fraction of the base's token scale (stage 1 does this,
      because the contrastive loss never reaches the prompt head and a zero gain would give every image
      the same prompt);
    * without a base (an SD with no text encoder) the base buffer is zeros and ``gain`` starts at one, so
      every token has unit RMS per channel, the scale of CLIP's layer-normed last hidden states.

    The residual head is ``h -> MLP -> [L, rank] codes -> shared Linear(rank, D)``: a rank-``token_rank``
    factorisation of L separate C -> D maps (1.4M parameters for L=77, D=768 instead of 15M).

    Args:
        prompt_dim: D, the UNet's cross_attention_dim (768 for SD1.x, 1024 for SD2.x).
        prompt_tokens: L, tokens per prompt (default 77, see DEFAULT_PROMPT_TOKENS for why).
        feat_dim: F, width of the contrastive feature.
        widths: channels of the three residual blocks (AirNet: 64, 128, 256).
        token_rank: width of the per-token codes before the shared token projection.
        base_prompt: optional [1,L,D] (or [L,D]) empty-text embedding; stored as a buffer, so it is saved
            and loaded with the weights and not needed again to rebuild the module.
    """

    def __init__(
        self,
        *,
        prompt_dim: int,
        prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
        feat_dim: int = 256,
        widths: Sequence[int] = (64, 128, 256),
        token_rank: int = 64,
        base_prompt: Tensor | None = None,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {widths}")
        for name, value in (
            ("prompt_dim", prompt_dim),
            ("prompt_tokens", prompt_tokens),
            ("feat_dim", feat_dim),
            ("token_rank", token_rank),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.prompt_dim, self.prompt_tokens = int(prompt_dim), int(prompt_tokens)
        self.feat_dim, self.widths, self.token_rank = int(feat_dim), widths, int(token_rank)
        c0, c1, c2 = widths

        # Backbone: full resolution, then /2, then /4; pooled to [B, c2].
        self.blocks = nn.Sequential(
            ResBlock(c_in=3, c_out=c0, stride=1),
            ResBlock(c_in=c0, c_out=c1, stride=2),
            ResBlock(c_in=c1, c_out=c2, stride=2),
        )
        # Contrastive head (the paper's MLP): [B, c2] -> [B, F], normalised in `features`.
        self.mlp = nn.Sequential(nn.Linear(c2, c2), nn.LeakyReLU(0.1), nn.Linear(c2, self.feat_dim))
        # Prompt head: [B, c2] -> codes [B, L*rank] -> [B, L, rank] -> [B, L, D].
        self.prompt_mlp = nn.Sequential(
            nn.Linear(c2, c2), nn.LeakyReLU(0.1), nn.Linear(c2, self.prompt_tokens * self.token_rank)
        )
        self.prompt_proj = nn.Linear(self.token_rank, self.prompt_dim)

        if base_prompt is None:
            base = torch.zeros(1, self.prompt_tokens, self.prompt_dim)
            gain = torch.ones(self.prompt_dim)
        else:
            base = self._check_base(base_prompt)
            gain = torch.zeros(self.prompt_dim)  # prompt == base at init
        self.register_buffer("base_prompt", base)
        self.prompt_gain = nn.Parameter(gain)

    def _check_base(self, base: Tensor) -> Tensor:
        if base.ndim == 2:
            base = base.unsqueeze(0)
        want = (1, self.prompt_tokens, self.prompt_dim)
        if tuple(base.shape) != want:
            raise ValueError(
                f"base_prompt has shape {tuple(base.shape)}, expected {want} (prompt_tokens x prompt_dim)"
            )
        if not torch.isfinite(base).all():
            raise ValueError("base_prompt has NaN or infinite values")
        return base.detach().to(torch.float32).clone()

    @property
    def config(self) -> dict:
        """Constructor arguments (all but the base tensor, which travels in the state dict)."""
        return {
            "prompt_dim": self.prompt_dim,
            "prompt_tokens": self.prompt_tokens,
            "feat_dim": self.feat_dim,
            "widths": list(self.widths),
            "token_rank": self.token_rank,
        }

    @property
    def has_base(self) -> bool:
        """True when the buffer holds a real base prompt (not the all-zero stand-in)."""
        return bool(self.base_prompt.abs().sum() > 0)

    def pooled(self, x: Tensor) -> Tensor:
        """Degraded image [B,3,H,W] in [0,1] -> pooled backbone feature h [B, C]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a degraded image batch [B,3,H,W], got shape {tuple(x.shape)}")
        return self.blocks(x).mean(dim=(2, 3))

    def features_from_pooled(self, h: Tensor) -> Tensor:
        return F.normalize(self.mlp(h), dim=1)

    def prompt_from_pooled(self, h: Tensor) -> Tensor:
        codes = self.prompt_mlp(h).view(h.shape[0], self.prompt_tokens, self.token_rank)
        residual = F.layer_norm(self.prompt_proj(codes), (self.prompt_dim,))  # [B, L, D], unit RMS per token
        return self.base_prompt + self.prompt_gain * residual

    def features(self, x: Tensor) -> Tensor:
        """L2-normalised contrastive feature [B, F]."""
        return self.features_from_pooled(self.pooled(x))

    def prompt(self, x: Tensor) -> Tensor:
        """Prompt embedding [B, L, D] for the UNet's encoder_hidden_states."""
        return self.prompt_from_pooled(self.pooled(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.pooled(x)
        return self.features_from_pooled(h), self.prompt_from_pooled(h)

    def base_token_scale(self) -> float:
        """Median per-token RMS of the base prompt (1.0 without a base): the unit of `set_prompt_strength`.

        The median, because SD's start token has a far larger norm than the others.
        """
        if not self.has_base:
            return 1.0
        rms = self.base_prompt[0].pow(2).mean(dim=-1).sqrt()  # [L]
        return float(rms.median())

    @torch.no_grad()
    def set_prompt_strength(self, strength: float) -> None:
        """Set every channel of the residual gain so each token's residual has RMS strength x base scale.

        Args:
            strength: >= 0; 0 gives prompt == base for every image.
        """
        if not strength >= 0:
            raise ValueError(f"prompt strength must be >= 0, got {strength}")
        self.prompt_gain.fill_(strength * self.base_token_scale())
