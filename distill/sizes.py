"""The size rules of the official test scripts, as tensor ops every module can import (the networks themselves
too: GCANet pads inside its forward, and distill.inference dispatches on the network families)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_to_multiple(img: torch.Tensor, base: int) -> torch.Tensor:
    """Center-crop [..., H, W] so H and W are multiples of `base`, as AirNet's `crop_img`.

    Of the H % base surplus rows, (H % base)//2 go from the top and the rest from the bottom; same for W.
    """
    h, w = img.shape[-2:]
    if h < base or w < base:
        raise ValueError(f"image {h}x{w} is smaller than the crop multiple {base}")
    ch, cw = h % base, w % base
    return img[..., ch // 2 : h - ch + ch // 2, cw // 2 : w - cw + cw // 2]


def pad_to_multiple(img: torch.Tensor, base: int) -> torch.Tensor:
    """Pad [B,C,H,W] at the bottom/right to the next multiples of `base` (reflect, as Restormer's test).

    Reflect padding needs the pad to be smaller than the side; tinier images are edge-replicated.
    """
    h, w = img.shape[-2:]
    ph, pw = -h % base, -w % base
    if ph == 0 and pw == 0:
        return img
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(img, (0, pw, 0, ph), mode=mode)
