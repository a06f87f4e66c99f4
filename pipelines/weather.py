"""Physical weather synthesis: rain, haze and snow on clean images.

These models make the embedded demo data (``pipelines/demo_data.py``): the paired set a teacher is
trained on, its test set, and the unpaired "web" degraded images. Every function takes a clean float
image ``[H, W, 3]`` in [0, 1] and a ``np.random.Generator`` (all randomness comes from it, so equal
seeds give equal images) and returns a degraded image of the same shape and dtype, still in [0, 1].

Models (sizes are given for a 256-pixel shorter side and scale with the image, down to half of that):

* haze: the atmospheric scattering model ``I = J t + A (1 - t)``, ``t = exp(-beta d)``, with RESIDE-like
  ranges (beta in HAZE_BETA, gray airlight A in HAZE_AIRLIGHT). There is no real depth, so ``d`` is a
  proxy (``haze_depth``): a vertical gradient (the top of a photo is usually far away), a smooth random
  field (hills, buildings) and a brightness cue (bright, flat regions such as sky tend to be far), mixed
  and mapped to HAZE_DEPTH units, which makes beta act like RESIDE's beta per unit of scene depth.
* rain: layers of random seed points motion-blurred by an anti-aliased line kernel (random angle and
  length) and thickened by a small Gaussian, screen-blended onto the image, so a rainy pixel is never
  darker than its clean one. "light" is Rain100L-like (one sparse layer of thin streaks, one direction),
  "heavy" is Rain100H-like (several dense layers in nearby directions plus a rain-accumulation veil).
* snow: particle layers of several sizes (small far flakes, larger blurred near flakes) rendered as soft
  discs with random opacity, alpha-composited in a near-white colour (Snow100K-like light/medium/heavy).

The kernels and the padded FFT convolution live in pipelines/weather_kernels.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from d4ir.synth.plan import WEATHERS

from .weather_kernels import (
    check_image,
    disc_kernel,
    fft_convolve,
    finish,
    gaussian_kernel,
    line_kernel,
    normalise,
    render_layer,
    size_scale,
    smooth_field,
)

TASKS = WEATHERS  # the physical model renders every weather the pipeline knows

HAZE_BETA = (0.04, 0.2)  # scattering coefficient per unit depth (RESIDE OTS range)
HAZE_AIRLIGHT = (0.8, 1.0)  # global atmospheric light, gray (RESIDE OTS range)
HAZE_DEPTH = (2.0, 12.0)  # depth proxy units: nearest and farthest point of a photo


@dataclass(frozen=True)
class RainLevel:
    """Ranges for one rain level; each layer draws its own values.

    Args:
        layers: inclusive range of the number of streak layers.
        coverage: per layer, streak seeds per pixel times streak length (about the fraction of pixels
            a layer covers before overlaps), so longer streaks come fewer.
        length: streak length as a fraction of the shorter image side.
        thickness: Gaussian sigma across a streak, pixels at REFERENCE_SIDE (at least 0.5 px).
        angle: base direction in degrees from vertical (one draw per image).
        spread: each layer deviates from the base direction by up to this many degrees.
        brightness: peak intensity of one streak before blending.
        veil: strength of the rain-accumulation veil (screen-blended white), (0, 0) for none.
    """

    layers: tuple[int, int]
    coverage: tuple[float, float]
    length: tuple[float, float]
    thickness: tuple[float, float]
    angle: tuple[float, float]
    spread: float
    brightness: tuple[float, float]
    veil: tuple[float, float]


@dataclass(frozen=True)
class SnowLayer:
    """One layer of snow flakes of one size.

    Args:
        density: flakes per pixel.
        radius: flake radius range in pixels at REFERENCE_SIDE (one draw per layer, at least 0.5 px).
        blur: Gaussian sigma range in pixels at REFERENCE_SIDE (defocus of near flakes).
        opacity: per-flake opacity range.
    """

    density: float
    radius: tuple[float, float]
    blur: tuple[float, float]
    opacity: tuple[float, float]


RAIN_LEVELS: dict[str, RainLevel] = {
    "light": RainLevel(
        layers=(1, 1),
        coverage=(0.04, 0.1),
        length=(0.06, 0.12),
        thickness=(0.5, 0.8),
        angle=(-20.0, 20.0),
        spread=0.0,
        brightness=(0.4, 0.8),
        veil=(0.0, 0.0),
    ),
    "heavy": RainLevel(
        layers=(3, 4),
        coverage=(0.06, 0.12),
        length=(0.12, 0.3),
        thickness=(0.8, 1.4),
        angle=(-30.0, 30.0),
        spread=12.0,
        brightness=(0.4, 0.8),
        veil=(0.04, 0.15),
    ),
}

_SMALL = SnowLayer(density=0.004, radius=(0.8, 1.5), blur=(0.3, 0.5), opacity=(0.6, 1.0))
_MEDIUM = SnowLayer(density=0.001, radius=(1.6, 3.0), blur=(0.4, 0.8), opacity=(0.6, 1.0))
_LARGE = SnowLayer(density=0.0002, radius=(3.5, 6.0), blur=(0.8, 1.6), opacity=(0.5, 0.9))


def _denser(layer: SnowLayer, factor: float) -> SnowLayer:
    return SnowLayer(density=layer.density * factor, radius=layer.radius, blur=layer.blur, opacity=layer.opacity)


SNOW_LEVELS: dict[str, tuple[SnowLayer, ...]] = {
    "light": (_SMALL, _MEDIUM),
    "medium": (_denser(_SMALL, 2.0), _denser(_MEDIUM, 2.0), _LARGE),
    "heavy": (_denser(_SMALL, 4.0), _denser(_MEDIUM, 3.0), _denser(_LARGE, 2.0)),
}
SNOW_COLOR = (0.9, 1.0)  # gray level of the flakes


def haze_depth(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Depth proxy [H, W] in HAZE_DEPTH units for a clean image [H, W, 3] in [0, 1].

    Mix of 0.55 vertical gradient (top far), 0.25 smooth random field and 0.20 blurred brightness
    (bright regions far), rescaled to HAZE_DEPTH.

    Args:
        clean: float image [H, W, 3] in [0, 1].
        rng: random generator for the smooth field.
    """
    img = check_image(clean)
    h, w = img.shape[:2]
    vertical = np.broadcast_to(np.linspace(1.0, 0.0, h)[:, None], (h, w))
    field = smooth_field(rng, h, w)
    sigma = max(1.0, 0.05 * min(h, w))
    pad = math.ceil(3 * sigma)
    lum = np.pad(img.mean(axis=2), pad, mode="reflect" if min(h, w) > pad else "edge")
    lum = fft_convolve(lum, [gaussian_kernel(sigma)])[pad : pad + h, pad : pad + w]
    proxy = normalise(0.55 * vertical + 0.25 * field + 0.20 * normalise(lum))
    return HAZE_DEPTH[0] + (HAZE_DEPTH[1] - HAZE_DEPTH[0]) * proxy


def add_haze(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    beta: float | None = None,
    airlight: float | Sequence[float] | None = None,
    depth: float | np.ndarray | None = None,
) -> np.ndarray:
    """Hazy image I = J t + A (1 - t), t = exp(-beta d).

    beta and airlight are always drawn (then overridden when given), so fixing one of them leaves the
    other draws, and the depth proxy, as they were for the same seed.

    Args:
        clean: float image [H, W, 3] in [0, 1] (J).
        rng: random generator.
        beta: scattering coefficient per unit depth, >= 0; None draws from HAZE_BETA.
        airlight: A, a gray level or an RGB triple in [0, 1]; None draws a gray from HAZE_AIRLIGHT.
        depth: d, a scalar or [H, W] array >= 0; None uses ``haze_depth``.
    """
    img = check_image(clean)
    h, w = img.shape[:2]
    drawn_beta = rng.uniform(*HAZE_BETA)
    drawn_airlight = rng.uniform(*HAZE_AIRLIGHT)
    b = drawn_beta if beta is None else float(beta)
    if not (math.isfinite(b) and b >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    a = np.asarray(drawn_airlight if airlight is None else airlight, dtype=np.float64)
    if a.shape not in ((), (3,)) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError(f"airlight must be a value or an RGB triple in [0, 1], got {airlight}")
    if depth is None:
        d = haze_depth(img, rng)
    else:
        d = np.asarray(depth, dtype=np.float64)
        if d.shape not in ((), (h, w)) or not np.isfinite(d).all() or d.min() < 0:
            raise ValueError(f"depth must be a scalar or an [H, W] = [{h}, {w}] array >= 0, got shape {list(d.shape)}")
    t = np.exp(-b * np.broadcast_to(d, (h, w)))[..., None]  # [H, W, 1] transmission
    return finish(img * t + a * (1.0 - t), clean)


# ---------------------------------------------------------------- rain


def rain_layer(h: int, w: int, rng: np.random.Generator, *, level: str = "light") -> np.ndarray:
    """Streak intensity map [h, w] in [0, 1] (layers and veil screen-combined).

    Args:
        h, w: image size.
        rng: random generator.
        level: a key of RAIN_LEVELS.
    """
    if level not in RAIN_LEVELS:
        raise ValueError(f"unknown rain level {level!r}; choose from {sorted(RAIN_LEVELS)}")
    spec = RAIN_LEVELS[level]
    scale = size_scale(h, w)
    base_angle = rng.uniform(*spec.angle)
    clear = np.ones((h, w))  # product of (1 - layer): screen combination of the layers
    for _ in range(int(rng.integers(spec.layers[0], spec.layers[1] + 1))):
        angle = base_angle + rng.uniform(-spec.spread, spec.spread)
        length = max(3.0, rng.uniform(*spec.length) * min(h, w))
        sigma = max(0.5, rng.uniform(*spec.thickness) * scale)
        density = rng.uniform(*spec.coverage) / length
        streaks = render_layer(
            h, w, density, rng, spec.brightness, [line_kernel(length, angle), gaussian_kernel(sigma)]
        )
        # the Gaussian spreads a 1-px line over ~sqrt(2 pi) sigma px; restore the streak's peak
        streaks *= max(1.0, math.sqrt(2 * math.pi) * sigma)
        clear *= 1.0 - np.clip(streaks, 0.0, 1.0)
    clear *= 1.0 - rng.uniform(*spec.veil)
    return 1.0 - clear


def add_rain(clean: np.ndarray, rng: np.random.Generator, *, level: str = "light") -> np.ndarray:
    """Rainy image: streaks screen-blended, J + S (1 - J), so never darker than J.

    Args:
        clean: float image [H, W, 3] in [0, 1].
        rng: random generator.
        level: "light" (Rain100L-like) or "heavy" (Rain100H-like).
    """
    img = check_image(clean)
    s = rain_layer(img.shape[0], img.shape[1], rng, level=level)[..., None]  # [H, W, 1]
    # J + S(1 - J) rather than 1 - (1 - J)(1 - S): adding a non-negative term keeps out >= J exactly
    return finish(img + s * (1.0 - img), clean)


# ---------------------------------------------------------------- snow


def snow_mask(h: int, w: int, rng: np.random.Generator, *, level: str = "medium") -> np.ndarray:
    """Snow coverage [h, w] in [0, 1] from the level's particle layers.

    Args:
        h, w: image size.
        rng: random generator.
        level: a key of SNOW_LEVELS.
    """
    if level not in SNOW_LEVELS:
        raise ValueError(f"unknown snow level {level!r}; choose from {sorted(SNOW_LEVELS)}")
    scale = size_scale(h, w)
    clear = np.ones((h, w))
    for layer in SNOW_LEVELS[level]:
        radius = max(0.5, rng.uniform(*layer.radius) * scale)
        sigma = max(0.3, rng.uniform(*layer.blur) * scale)
        flakes = render_layer(h, w, layer.density, rng, layer.opacity, [disc_kernel(radius), gaussian_kernel(sigma)])
        clear *= 1.0 - np.clip(flakes, 0.0, 1.0)
    return 1.0 - clear


def add_snow(clean: np.ndarray, rng: np.random.Generator, *, level: str = "medium") -> np.ndarray:
    """Snowy image: near-white flakes alpha-composited, J (1 - M) + c M.

    Args:
        clean: float image [H, W, 3] in [0, 1].
        rng: random generator.
        level: "light", "medium" or "heavy" (Snow100K S/M/L-like).
    """
    img = check_image(clean)
    m = snow_mask(img.shape[0], img.shape[1], rng, level=level)[..., None]  # [H, W, 1]
    color = rng.uniform(*SNOW_COLOR)
    return finish(img * (1.0 - m) + color * m, clean)


# ---------------------------------------------------------------- by task

DEGRADE: dict[str, Callable[..., np.ndarray]] = {"derain": add_rain, "dehaze": add_haze, "desnow": add_snow}


def degrade(task: str, clean: np.ndarray, rng: np.random.Generator, **kwargs) -> np.ndarray:
    """Apply the task's weather model; kwargs go to it (e.g. level="heavy", beta=0.1).

    Args:
        task: "derain", "dehaze" or "desnow".
        clean: float image [H, W, 3] in [0, 1].
        rng: random generator.
    """
    if task not in DEGRADE:
        raise ValueError(f"unknown task {task!r}; choose from {list(DEGRADE)}")
    return DEGRADE[task](clean, rng, **kwargs)
