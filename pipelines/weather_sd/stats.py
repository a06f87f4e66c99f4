"""Per-weather statistics of images, and how much content an output keeps of its clean source.

All functions take a batch [B,3,H,W] float in [0,1] and return one value per image, [B] float32.
L is the BT.601 luma (without offset), G_s a Gaussian blur of sigma s (reflect padding).

- Rain streak energy (streaks are thin, bright and share one direction): the bright part of the high-pass
  P = relu(L - G_2(L)) is averaged along lines of length 7 px at 12 angles theta (every 15 degrees, measured
  from vertical), E(theta) = mean(conv(P, line_theta)^2); the statistic is max E - min E (the anisotropic part)
  and `dominant_angle` is the argmax. Isotropic texture and round flakes raise all E(theta) alike.
- Haze dark channel (He et al.'s prior: haze-free patches have a dark pixel in some channel; the airlight
  term A(1 - t) lifts it): mean over pixels of min over RGB and a 7x7 patch. `rms_contrast` (std of L)
  falls with haze; `contrast_loss` = 1 - contrast(out) / contrast(clean) needs the clean source.
- Snow blob density (flakes are small, bright and round): at scales s in (0.7, 1, 1.4) px the Hessian of
  G_s(L) has eigenvalues l1 <= l2; a bright round blob has both negative and equal, a streak or an edge has
  l2 ~ 0, a short rain dash l2 << l1 in size, so R = max_s s^2 max(0, -l2) (l2 / l1)^2 (the roundness weight
  keeps 64-px rain dashes, only 2-4 times longer than wide, from counting as flakes). Blobs are 3x3 local
  maxima of R above BLOB_THRESHOLD; the statistic is blobs per 1000 pixels.
- Colour (what a colour cast or a washed-out synthesis changes): saturation = mean over pixels of
  max(R, G, B) - min(R, G, B) (0 for grey), and the mean of each channel (a cast makes them unequal).
- Content kept: PSNR and SSIM (distill.metrics) between G_2 of the output and G_2 of the clean source, so
  fine weather (streaks, flakes) counts little and a moved or lost structure counts fully.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from d4ir.distill.metrics import psnr, ssim

HIGHPASS_SIGMA = 2.0
LINE_LENGTH = 7
ANGLES_DEG = tuple(range(-90, 90, 15))
DARK_PATCH = 7
BLOB_SIGMAS = (0.7, 1.0, 1.4)
BLOB_THRESHOLD = 0.04
LOWPASS_SIGMA = 2.0


def _check(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a float batch [B,3,H,W] in [0,1], got {desc}")
    if min(x.shape[-2:]) < 16:
        raise ValueError(f"images must be at least 16x16 pixels, got {tuple(x.shape[-2:])}")
    return x.float()


def luma(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma [B,1,H,W] of [B,3,H,W]."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W], radius ceil(3 sigma), reflect padding."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)


def line_kernel(length: int, angle_deg: float) -> torch.Tensor:
    """Averaging kernel [k,k] (sum 1) along a line through the centre, angle from vertical, bilinear splats."""
    r = length // 2 + 1
    k = torch.zeros(2 * r + 1, 2 * r + 1, dtype=torch.float64)
    a = math.radians(angle_deg)
    for s in torch.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length).tolist():
        y, x = r + s * math.cos(a), r + s * math.sin(a)
        y0, x0 = math.floor(y), math.floor(x)
        fy, fx = y - y0, x - x0
        for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            k[y0 + dy, x0 + dx] += w
    return (k / k.sum()).float()


def _directional_energy(x: torch.Tensor) -> torch.Tensor:
    """E(theta) for every angle of ANGLES_DEG: [B, A]."""
    lum = luma(_check(x))
    bright = F.relu(lum - gaussian_blur(lum, HIGHPASS_SIGMA))  # [B,1,H,W]
    kernels = torch.stack([line_kernel(LINE_LENGTH, a) for a in ANGLES_DEG]).unsqueeze(1).to(x.device)  # [A,1,k,k]
    r = kernels.shape[-1] // 2
    resp = F.conv2d(F.pad(bright, (r, r, r, r), mode="reflect"), kernels)  # [B,A,H,W]
    return resp.pow(2).mean(dim=(2, 3))


def rain_streak_energy(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic bright high-pass energy, max_theta E - min_theta E: [B] (x1e3 for readable numbers)."""
    e = _directional_energy(x)
    return (e.max(dim=1).values - e.min(dim=1).values) * 1e3


def dominant_angle(x: torch.Tensor) -> torch.Tensor:
    """Angle (degrees from vertical, in [-90, 90)) of the strongest streak energy: [B]."""
    idx = _directional_energy(x).argmax(dim=1)
    return torch.tensor(ANGLES_DEG, dtype=torch.float32, device=x.device)[idx]


def dark_channel(x: torch.Tensor, patch: int = DARK_PATCH) -> torch.Tensor:
    """Mean dark channel (min over RGB and a patch x patch window): [B]."""
    x = _check(x)
    low = x.min(dim=1, keepdim=True).values
    r = patch // 2
    low = -F.max_pool2d(F.pad(-low, (r, r, r, r), mode="replicate"), patch, stride=1)
    return low.mean(dim=(1, 2, 3))


def rms_contrast(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the luma: [B]."""
    return luma(_check(x)).flatten(1).std(dim=1)


def contrast_loss(out: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """1 - contrast(out) / contrast(clean): [B] (0 unchanged, towards 1 as haze flattens the image)."""
    return 1.0 - rms_contrast(out) / rms_contrast(clean).clamp_min(1e-6)


def blob_response(x: torch.Tensor) -> torch.Tensor:
    """R = max over BLOB_SIGMAS of s^2 max(0, -l2) (l2/l1)^2, l1 <= l2 the Hessian eigenvalues: [B,1,H,W]."""
    lum = luma(_check(x))
    best = torch.zeros_like(lum)
    for s in BLOB_SIGMAS:
        g = F.pad(gaussian_blur(lum, s), (1, 1, 1, 1), mode="replicate")
        c = g[..., 1:-1, 1:-1]
        dxx = g[..., 1:-1, 2:] - 2 * c + g[..., 1:-1, :-2]
        dyy = g[..., 2:, 1:-1] - 2 * c + g[..., :-2, 1:-1]
        dxy = (g[..., 2:, 2:] - g[..., 2:, :-2] - g[..., :-2, 2:] + g[..., :-2, :-2]) / 4
        mean, half_gap = (dxx + dyy) / 2, torch.sqrt(((dxx - dyy) / 2) ** 2 + dxy**2)
        l1, l2 = mean - half_gap, mean + half_gap
        roundness = (l2 / l1.clamp(max=-1e-9)).clamp(0, 1)  # 1 for a disc, 0 for a line or a saddle
        best = torch.maximum(best, s * s * F.relu(-l2) * roundness**2)
    return best


def snow_blob_density(x: torch.Tensor, threshold: float = BLOB_THRESHOLD) -> torch.Tensor:
    """Bright small blobs per 1000 pixels (3x3 local maxima of `blob_response` above `threshold`): [B]."""
    resp = blob_response(x)
    peaks = (resp == F.max_pool2d(resp, 3, stride=1, padding=1)) & (resp > threshold)
    return peaks.flatten(1).float().mean(dim=1) * 1e3


def colour_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"saturation", "r", "g", "b"}, each [B]: mean max-min over RGB per pixel, and each channel's mean."""
    x = _check(x)
    means = x.mean(dim=(2, 3))  # [B, 3]
    return {"saturation": (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2)),
            "r": means[:, 0], "g": means[:, 1], "b": means[:, 2]}


def weather_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """All reference-free statistics: {"rain", "haze", "contrast", "snow"}, each [B]."""
    return {
        "rain": rain_streak_energy(x),
        "haze": dark_channel(x),
        "contrast": rms_contrast(x),
        "snow": snow_blob_density(x),
    }


def content_kept(out: torch.Tensor, clean: torch.Tensor, sigma: float = LOWPASS_SIGMA) -> dict[str, torch.Tensor]:
    """PSNR (dB) and SSIM of G_sigma(out) against G_sigma(clean): {"psnr", "ssim"}, each [B] float32."""
    out, clean = _check(out), _check(clean)
    if out.shape != clean.shape:
        raise ValueError(f"out {tuple(out.shape)} and clean {tuple(clean.shape)} differ in shape")
    a, b = gaussian_blur(out, sigma).clamp(0, 1), gaussian_blur(clean, sigma).clamp(0, 1)
    return {"psnr": psnr(a, b).float(), "ssim": ssim(a, b).float()}
