"""DFMC's contrastive regularisation (Wang et al., ISCAS 2024), as we read it, and the feature spaces it uses.

DFMC ("Data-Free Learning for Lightweight Multi-Weather Image Restoration") has no public code; its abstract
says it is DFSR plus a contrastive regularisation. This module is OUR READING of that abstract, in the ratio
form of the contrastive regularisation of AECR-Net (Wu et al., CVPR 2021):

    L_CR = sum_i w_i * D(phi_i(a), phi_i(p)) / (D(phi_i(a), phi_i(n)) + eps)

with the anchor a = S(x) (the student's output, the only term with a gradient), the positive p = T(x) (the
teacher's output) and the negative n = x (the generated degraded input); phi_i is the i-th feature map of a
fixed network and D is the mean absolute difference over the whole batch tensor [B, C_i, H_i, W_i]. The
student is pulled towards the teacher's restoration and pushed away from the degraded input, measured where
degradations show. No pretrained VGG is downloaded; phi comes from either

- "teacher": intermediate activations of the frozen teacher itself, captured by forward hooks; the forward
  is cut short once the deepest requested layer has run. Defaults: AirNet's degradation encoder block
  `E.E.encoder_q.E_pre` (the representation AirNet was trained to make degradation-aware), Restormer's
  `encoder_level1` and `encoder_level2`, PReNet's first residual block `res_conv1` (of the first stage: the
  forward stops there). Any module names of the teacher can be given instead.
- "random": a fixed, seeded, randomly initialised 3-layer conv net (3 -> 16 -> 32 -> 64 channels, strides
  1, 2, 2, LeakyReLU 0.2), for teachers that expose no useful layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .families import FAMILIES, family_key_of

Features = Callable[[torch.Tensor], list[torch.Tensor]]  # images [N,3,H,W] -> feature maps [N,C_i,H_i,W_i]

FEATURE_KINDS = ("teacher", "random")
# Default teacher layers per family (the families' `contrastive_layers`).
DEFAULT_LAYERS = {key: fam.contrastive_layers for key, fam in FAMILIES.items() if fam.contrastive_layers}


def contrastive_ratio(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    features: Features,
    weights: Sequence[float] | None = None,
    eps: float = 1e-7,
) -> torch.Tensor:
    """sum_i w_i * mean|phi_i(a) - phi_i(p)| / (mean|phi_i(a) - phi_i(n)| + eps), a scalar (float32).

    anchor, positive, negative: [B,3,H,W]; gradients reach the anchor only (positive and negative are
    constants of the loss). weights: one per feature map (default: equal weights summing to 1).
    """
    if not anchor.shape == positive.shape == negative.shape:
        raise ValueError(
            f"anchor, positive and negative must have one shape, got {tuple(anchor.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    b = anchor.shape[0]
    with torch.no_grad():
        fixed = features(torch.cat([positive.detach(), negative.detach()]))  # one pass for p and n: [2B,...]
    fa = features(anchor)
    weights = [1.0 / len(fa)] * len(fa) if weights is None else list(weights)
    if len(weights) != len(fa):
        raise ValueError(f"{len(weights)} contrastive layer weights for {len(fa)} feature maps")
    total = anchor.new_zeros((), dtype=torch.float32)
    for w, a, pn in zip(weights, fa, fixed):
        a, p, n = a.float(), pn[:b].float(), pn[b:].float()
        total = total + w * (a - p).abs().mean() / ((a - n).abs().mean() + eps)
    return total


class _Stop(Exception):
    """Raised by the last hook to end the teacher's forward early."""


class TeacherFeatures:
    """phi = the outputs of named modules of a frozen teacher, captured by forward hooks during teacher(x).

    The forward stops as soon as every requested module has run, so for AirNet's E_pre only that block
    runs. Hooks are attached for the duration of one call only. The teacher's weights get no gradient;
    gradients flow through it to the input.

    Args:
        teacher: the frozen teacher (eval mode).
        layers: module names as in teacher.named_modules(), e.g. ("E.E.encoder_q.E_pre",).
    """

    def __init__(self, teacher: nn.Module, layers: Sequence[str]) -> None:
        modules = dict(teacher.named_modules())
        missing = [name for name in layers if name not in modules]
        if not layers or missing:
            raise ValueError(
                f"contrastive layers {missing or list(layers)} are not modules of the teacher "
                f"(e.g. {', '.join(list(modules)[1:6])}, ...)"
            )
        self.teacher, self.layers = teacher, tuple(layers)
        self._modules = [modules[name] for name in self.layers]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        captured: dict[int, torch.Tensor] = {}

        def hook(index: int) -> Callable:
            def grab(_module, _inputs, output) -> None:
                captured.setdefault(index, output)
                if len(captured) == len(self._modules):
                    raise _Stop

            return grab

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self._modules)]
        try:
            self.teacher(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(self._modules):
            raise RuntimeError(f"the teacher's forward did not run the layers {self.layers}")
        return [captured[i] for i in range(len(self._modules))]


class RandomFeatures(nn.Module):
    """A fixed random conv feature extractor: three conv3x3 + LeakyReLU(0.2) stages, strides 1, 2, 2.

    Args:
        seed: seeds the Kaiming-normal weights (the same seed gives the same network on any machine).
        widths: output channels of the three stages.
    """

    def __init__(self, seed: int = 0, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        chans = [3, *widths]
        self.stages = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1) for i in range(len(widths))
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.stages:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [N,3,H,W] -> [N,16,H,W], [N,32,H/2,W/2], [N,64,H/4,W/4] (with the default widths)."""
        out = []
        for conv in self.stages:
            x = nn.functional.leaky_relu(conv(x), 0.2)
            out.append(x)
        return out


def build_features(
    kind: str, teacher: nn.Module | None, layers: Sequence[str] | None, seed: int, device: torch.device | str
) -> Features:
    """The feature space named by `kind` ("teacher" hooks, default layers per architecture, or "random")."""
    if kind == "random":
        return RandomFeatures(seed).to(device)
    if kind != "teacher":
        raise ValueError(f"contrastive_features must be one of {FEATURE_KINDS}, got {kind!r}")
    if teacher is None:
        raise ValueError("DFMC with contrastive_features='teacher' needs the teacher: AdversarialSource(teacher=...)")
    if layers is None:
        layers = DEFAULT_LAYERS.get(family_key_of(teacher) or "")
        if layers is None:
            raise ValueError(
                f"no default contrastive layers for a {type(teacher).__name__} teacher: set contrastive_layers "
                "or contrastive_features='random'"
            )
    return TeacherFeatures(teacher, layers)
