"""Whole-image and tiled inference with each architecture's official size policy.

* AirNet (official test.py): center-crop H and W to multiples of 16 and return the cropped result; the
  clean image is cropped the same way with `crop_to_multiple` before scoring. `policy="pad"` instead
  reflect-pads to a multiple of 16 and crops back, keeping the full image.
* Restormer (official test.py): reflect-pad bottom/right to the next multiple of 8, crop back, clamp.
* PReNet and other fully convolutional families: any size ("none").
The policies are the families' `policy` entries (distill/families.py).

Tiling: overlapping tiles blended with a trapezoid window that is zero in a dead margin of overlap//4 at
each inner tile edge and ramps to one across the rest of the overlap. A network whose receptive-field
radius is at most that margin gives exactly the whole-image result; wider networks get seam-free blends.
Restormer's attention is global over each tile (channel attention over all pixels), so its tiled output
is close to, but never exactly, the whole-image output.
"""

from __future__ import annotations

import torch
from d4ir.distill.families import FAMILIES, family_key_of
from d4ir.distill.sizes import crop_to_multiple, pad_to_multiple
from torch import nn

__all__ = ["POLICIES", "auto_tile", "crop_to_multiple", "official_policy", "pad_to_multiple", "restore"]

POLICIES = ("crop", "pad", "none")
# Evaluation's memory budget: whole-image inference up to AUTO_TILE_ABOVE pixels, larger images in AUTO_TILE-px
# tiles unless a tile side is given: the model's activations are bounded by the tile, not by the image. (AirNet on
# a CPU peaks at 509 MiB at 256x256 and 767 MiB at 480x320, docs/benchmarks.md; linear in the pixels that is about
# 3.3 GiB at 1 Mpx and 1.1 GiB per 512-px tile, an extrapolation, not a measurement.)
AUTO_TILE_ABOVE = 1 << 20
AUTO_TILE = 512


def auto_tile(height: int, width: int, tile: int | None = None) -> int | None:
    """The tile side evaluation uses for an image of height x width: `tile` when given, else AUTO_TILE above
    AUTO_TILE_ABOVE pixels, else None (whole-image inference)."""
    if tile is not None:
        return tile
    return AUTO_TILE if height * width > AUTO_TILE_ABOVE else None


def official_policy(model: nn.Module) -> tuple[str, int]:
    """(policy, base) used by the model's official test script (its family's `policy`); ("none", 1) for
    other modules."""
    key = family_key_of(model)
    return FAMILIES[key].policy if key else ("none", 1)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every `stride`, plus a last tile flush with the far edge."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, start: int, size: int, overlap: int, device, dtype) -> torch.Tensor:
    """1-D window [length] for a tile at `start`: 0 within `overlap//4` px of an inner tile edge, a linear
    ramp to 1 across the next overlap - 2*(overlap//4) px, 1 elsewhere and at image borders."""
    margin = overlap // 4
    ramp_len = max(overlap - 2 * margin, 1)
    idx = torch.arange(length, device=device, dtype=dtype)
    w = torch.ones(length, device=device, dtype=dtype)
    if start > 0:  # inner edge on the low side
        w = torch.minimum(w, ((idx - margin + 1) / (ramp_len + 1)).clamp(0, 1))
    if start + length < size:  # inner edge on the high side
        w = torch.minimum(w, ((length - idx - margin) / (ramp_len + 1)).clamp(0, 1))
    return w


def _tiled(model: nn.Module, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Run `model` on overlapping tiles of x [B,C,H,W] and blend them into [B,C_out,H,W]."""
    b, _, h, w = x.shape
    stride = tile - overlap
    out = weight = None
    for y0 in _starts(h, tile, stride):
        for x0 in _starts(w, tile, stride):
            th, tw = min(tile, h), min(tile, w)
            pred = model(x[..., y0 : y0 + th, x0 : x0 + tw])  # [B,C_out,th,tw]
            if out is None:
                out = x.new_zeros(b, pred.shape[1], h, w, dtype=pred.dtype)
                weight = x.new_zeros(1, 1, h, w, dtype=pred.dtype)
            wy = _ramp(th, y0, h, overlap, x.device, pred.dtype)
            wx = _ramp(tw, x0, w, overlap, x.device, pred.dtype)
            win = (wy[:, None] * wx[None, :])[None, None]  # [1,1,th,tw]
            out[..., y0 : y0 + th, x0 : x0 + tw] += pred * win
            weight[..., y0 : y0 + th, x0 : x0 + tw] += win
    return out / weight


@torch.no_grad()
def restore(
    model: nn.Module,
    degraded: torch.Tensor,
    *,
    policy: str | None = None,
    tile: int | None = None,
    tile_overlap: int = 32,
    clamp: bool = True,
) -> torch.Tensor:
    """Restore a degraded batch with the model's official size policy, optionally tile by tile.

    Args:
        model: AirNet, Restormer, or any module mapping [B,3,H,W] -> [B,3,H,W]; run in eval mode (its
            previous mode is restored afterwards).
        degraded: [B,3,H,W] (or [3,H,W]) in [0,1], on any device; the result comes back on its device.
        policy: "crop" (center-crop to the size multiple; the output is the cropped size), "pad"
            (reflect-pad bottom/right, crop back to H x W) or "none"; default: the official one.
        tile: tile side in pixels (a multiple of the size multiple), or None for whole-image inference.
        tile_overlap: overlap between neighbouring tiles in pixels (0 <= overlap < tile).
        clamp: clamp the result to [0,1] like the official test scripts.
    Returns:
        restored [B,3,H',W'] (H',W' = H,W except under "crop").
    """
    squeeze = degraded.ndim == 3
    if squeeze:
        degraded = degraded[None]
    if degraded.ndim != 4:
        raise ValueError(f"restore expects degraded [B,3,H,W] or [3,H,W], got shape {tuple(degraded.shape)}")
    default_policy, base = official_policy(model)
    policy = default_policy if policy is None else policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    key = family_key_of(model)
    if key and FAMILIES[key].needs_multiple and policy == "none":
        raise ValueError(f"{type(model).__name__} needs H and W multiples of {base}: use policy 'pad' or 'crop'")
    if tile is not None:
        if tile < base or tile % base:
            raise ValueError(f"tile must be a positive multiple of {base} for {type(model).__name__}, got {tile}")
        if not 0 <= tile_overlap < tile:
            raise ValueError(f"tile_overlap must be in [0, tile), got {tile_overlap} with tile {tile}")

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else degraded.device
    dtype = param.dtype if param is not None and param.is_floating_point() else degraded.dtype
    x = degraded.to(device=device, dtype=dtype)
    h, w = x.shape[-2:]
    if policy == "crop":
        x = crop_to_multiple(x, base)
    elif policy == "pad":
        x = pad_to_multiple(x, base)

    was_training = model.training
    model.eval()
    try:
        out = model(x) if tile is None else _tiled(model, x, tile, tile_overlap)
    finally:
        model.train(was_training)
    if policy == "pad":
        out = out[..., :h, :w]
    if clamp:
        out = out.clamp(0, 1)
    out = out.to(device=degraded.device, dtype=degraded.dtype)
    return out[0] if squeeze else out
