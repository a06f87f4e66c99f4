"""Batched PSNR and SSIM in torch (CPU or GPU), data range 1.

PSNR equals skimage's `peak_signal_noise_ratio(clean, restored, data_range=1)` per image. SSIM is Wang et
al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariances and the
'valid' region, computed per channel and averaged: skimage's `structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1)`, the convention of Restormer's MATLAB script.
`y_channel=True` scores the BT.601 luma (as MATLAB `rgb2ycbcr`, here unrounded and scaled to [0,1]).
Computation is in float64 so results agree with the reference to ~1e-6 on any device.

The authors' convention (`authors_scores`, the one PReNet's published numbers use): the restored image is
first quantised as the official test script saves it (clamp to [0,1], then uint8(255*x), by rounding or,
for PReNet, by truncation: `quantize_uint8`); Y is MATLAB `rgb2ycbcr` on the unrounded double values
(Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255); PSNR has peak 1 on that Y; SSIM is Wang's `ssim.m`
(11x11 Gaussian, sigma 1.5, K = 0.01 / 0.03, L = 255, 'valid' filtering) on Y*255 (`ssim_matlab`). The
2011 ssim.m's automatic downsampling (factor round(min(H,W)/256)) is not applied: it is 1 below 384 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): skimage's truncate=3.5 gives an 11-tap window
_K1, _K2 = 0.01, 0.03
QUANTIZE = ("round", "truncate")


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of [B,3,H,W] in [0,1] -> [B,1,H,W] in [16/255, 235/255]."""
    r, g, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    return 16.0 / 255.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def _prepare(a: torch.Tensor, b: torch.Tensor, y_channel: bool, crop_border: int) -> tuple[torch.Tensor, ...]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"expected [B,C,H,W] batches, got shape {tuple(a.shape)}")
    if y_channel and a.shape[1] != 3:
        raise ValueError(f"y_channel needs RGB images [B,3,H,W], got {a.shape[1]} channels")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    a, b = a.to(torch.float64), b.to(torch.float64)
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    if crop_border:
        h, w = a.shape[-2:]
        if 2 * crop_border >= min(h, w):
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def psnr(a: torch.Tensor, b: torch.Tensor, *, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB per image, peak 1: 10*log10(1/MSE) over all pixels and channels.

    Args:
        a, b: [B,C,H,W] in [0,1] (restored and clean; symmetric).
        y_channel: score the BT.601 luma instead of RGB.
        crop_border: pixels removed from each side before scoring.
    Returns:
        [B] float64 (inf for identical images).
    """
    a, b = _prepare(a, b, y_channel, crop_border)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian [11] (sigma 1.5), float64."""
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, device=device, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' region: [N,1,H,W] -> [N,1,H-10,W-10]."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim(a: torch.Tensor, b: torch.Tensor, *, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """Mean SSIM per image (Gaussian 11x11, sigma 1.5, valid region, channels averaged).

    Args:
        a, b: [B,C,H,W] in [0,1], H and W at least 11 after cropping.
        y_channel: score the BT.601 luma instead of RGB.
        crop_border: pixels removed from each side before scoring.
    Returns:
        [B] float64.
    """
    return _ssim(*_prepare(a, b, y_channel, crop_border), data_range=1.0)


def _ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Mean SSIM per image of float64 [B,C,H,W] pairs (channels scored independently and averaged)."""
    bsz, c, h, w = a.shape
    if min(h, w) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {h}x{w}")
    g = _gaussian_window(a.device)
    # Channels are scored independently: fold them into the batch, [B*C,1,H,W].
    x, y = a.reshape(bsz * c, 1, h, w), b.reshape(bsz * c, 1, h, w)
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x**2
    var_y = _filter_valid(y * y, g) - mu_y**2
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.reshape(bsz, c, -1).mean(dim=(1, 2))


def quantize_uint8(img: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """The image an official test script saves, back in [0,1]: clamp to [0,1], then uint8(255*x) with
    "round" (nearest) or "truncate" (numpy's uint8 cast, as PReNet's test script). Same shape and dtype."""
    if mode not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {mode!r}")
    scaled = img.clamp(0, 1) * 255  # in the image's own dtype, as the script's float32 product
    return (scaled.floor() if mode == "truncate" else scaled.round()) / 255


def ssim_matlab(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Wang's ssim.m: [B,1,H,W] in 0..255 (e.g. Y*255), 11x11 Gaussian sigma 1.5, K = 0.01/0.03, L = 255,
    'valid' filtering; mean of the SSIM map per image, [B] float64."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 1:
        raise ValueError(f"ssim_matlab expects two [B,1,H,W] images, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _ssim(a.to(torch.float64), b.to(torch.float64), data_range=255.0)


def authors_scores(restored: torch.Tensor, clean: torch.Tensor, quantize: str = "round") -> dict[str, torch.Tensor]:
    """The authors' convention: {"psnr_y", "ssim_y"} per image ([B] float64) of the quantised restored
    [B,3,H,W] against clean [B,3,H,W] (both in [0,1]): Y of rgb2ycbcr unrounded, PSNR peak 1, ssim.m on Y*255."""
    a, b = _prepare(quantize_uint8(restored, quantize), clean, True, 0)  # float64 Y in [16/255, 235/255]
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return {"psnr_y": 10.0 * torch.log10(1.0 / mse), "ssim_y": ssim_matlab(a * 255, b * 255)}
