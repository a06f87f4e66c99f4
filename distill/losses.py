"""Distillation loss terms, each with its own weight: L_kd = sum_i w_i * term_i(student_out, teacher_out).

Eq. (8) of the paper is the pixel L2 distance; "l2" is its mean squared form (the gradient direction is the
same and it does not depend on the image size). Other terms are selectable by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .metrics import ssim


def _charbonnier(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((a - b) ** 2 + eps * eps).mean()


def _ssim_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - ssim(a.clamp(0, 1), b.clamp(0, 1)).mean().to(a.dtype)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l2": F.mse_loss,
    "l1": F.l1_loss,
    "charbonnier": _charbonnier,
    "ssim": _ssim_loss,
}


def parse_weights(spec: str | dict | None) -> dict[str, float]:
    """"l2" -> {"l2": 1.0}; "l2=1,ssim=0.1" -> {...}; dicts pass through; names are checked."""
    if spec is None:
        return {"l2": 1.0}
    if isinstance(spec, str):
        spec = {k: float(v) for k, v in (item.split("=") if "=" in item else (item, 1.0)
                                          for item in spec.split(",") if item)}
    unknown = set(spec) - set(LOSSES)
    if unknown:
        raise ValueError(f"unknown loss term(s) {sorted(unknown)}; choose from {sorted(LOSSES)}")
    return {k: float(v) for k, v in spec.items()}


def kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of the terms; outputs are [B,3,H,W] (float32 for the loss, whatever the AMP dtype)."""
    s, t = student_out.float(), teacher_out.float()
    return sum(w * LOSSES[name](s, t) for name, w in weights.items() if w)
