"""Image-level building blocks of the weather synthesis (pipelines/weather.py): input checks, the size rule,
blur/streak/disc kernels, FFT convolution on a padded canvas, random point scatter and smooth random fields.

Convolutions run as FFTs on a canvas padded by the kernel radius, so streaks and flakes enter from outside
the frame and the circular wrap-around never reaches the visible image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

REFERENCE_SIDE = 256  # lengths and radii of the weather models are in pixels of a 256-pixel shorter side


def check_image(clean: np.ndarray) -> np.ndarray:
    """Validate a clean image and return a float64 working copy [H, W, 3]."""
    if not isinstance(clean, np.ndarray):
        raise TypeError(f"clean must be a numpy array, got {type(clean).__name__}")
    if clean.ndim != 3 or clean.shape[2] != 3 or clean.shape[0] < 1 or clean.shape[1] < 1:
        raise ValueError(f"clean must have shape [H, W, 3], got {list(clean.shape)}")
    if not np.issubdtype(clean.dtype, np.floating):
        raise TypeError(
            f"clean must be a float image in [0, 1], got dtype {clean.dtype} (convert uint8 with arr / 255)"
        )
    img = clean.astype(np.float64)
    if not np.isfinite(img).all() or img.min() < 0.0 or img.max() > 1.0:
        raise ValueError("clean must hold finite values in [0, 1]")
    return img


def finish(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.clip(out, 0.0, 1.0).astype(like.dtype)


def size_scale(h: int, w: int) -> float:
    # sizes follow the image down to half the reference, so small crops keep visible streaks and flakes
    return max(0.5, min(h, w) / REFERENCE_SIDE)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 2-D Gaussian [k, k], k odd."""
    r = max(1, math.ceil(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Anti-aliased line [k, k] through the centre, about 1 per pixel along it (not normalised).

    The angle is measured from vertical, positive leaning right at the bottom.
    """
    r = math.ceil(length / 2) + 1
    n = max(2, math.ceil(length * 4))  # 4 samples per pixel, bilinearly splatted
    s = np.linspace(-length / 2, length / 2, n)
    a = math.radians(angle_deg)
    ys, xs = r + s * math.cos(a), r + s * math.sin(a)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    k = np.zeros((2 * r + 2, 2 * r + 2))
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        np.add.at(k, (y0 + dy, x0 + dx), wgt)
    k = k[: 2 * r + 1, : 2 * r + 1]
    return k * (length / n)


def disc_kernel(radius: float) -> np.ndarray:
    """Anti-aliased disc [k, k] with peak 1."""
    r = math.ceil(radius) + 1
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return np.clip(radius + 0.5 - np.hypot(y, x), 0.0, 1.0)


def fft_convolve(canvas: np.ndarray, kernels: Sequence[np.ndarray]) -> np.ndarray:
    """Circular convolution of canvas [h, w] with each centred odd-sized kernel in turn."""
    h, w = canvas.shape
    spectrum = np.fft.rfft2(canvas)
    for k in kernels:
        kh, kw = k.shape
        if kh > h or kw > w:
            raise ValueError(f"kernel {k.shape} larger than canvas {canvas.shape}")
        padded = np.zeros((h, w))
        padded[:kh, :kw] = k
        padded = np.roll(padded, (-(kh // 2), -(kw // 2)), axis=(0, 1))  # kernel centre at [0, 0]
        spectrum = spectrum * np.fft.rfft2(padded)
    return np.fft.irfft2(spectrum, s=(h, w))


def scatter(h: int, w: int, n: int, rng: np.random.Generator, amp: tuple[float, float]) -> np.ndarray:
    """Canvas [h, w] with n impulses of random amplitude at random pixels."""
    ys = rng.integers(0, h, size=n)
    xs = rng.integers(0, w, size=n)
    vals = rng.uniform(amp[0], amp[1], size=n)
    return np.bincount(ys * w + xs, weights=vals, minlength=h * w).reshape(h, w)


def render_layer(
    h: int, w: int, n_per_px: float, rng: np.random.Generator, amp: tuple[float, float], kernels: Sequence[np.ndarray]
) -> np.ndarray:
    """Scatter impulses on a padded canvas, convolve, crop back to [h, w]."""
    pad = sum(k.shape[0] // 2 for k in kernels) + 1
    ch, cw = h + 2 * pad, w + 2 * pad
    canvas = scatter(ch, cw, round(n_per_px * ch * cw), rng, amp)
    return fft_convolve(canvas, kernels)[pad : pad + h, pad : pad + w]


def smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    """Smooth random field [h, w] in [0, 1]: a (cells+1)^2 random grid, smoothstep-interpolated."""
    coarse = rng.random((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
    y0 = np.minimum(np.floor(ys).astype(int), cells - 1)
    x0 = np.minimum(np.floor(xs).astype(int), cells - 1)
    fy, fx = ys - y0, xs - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def normalise(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min())
    return (x - x.min()) / span if span > 1e-12 else np.zeros_like(x)


# ---------------------------------------------------------------- haze
