"""Physics and contracts of the rain/haze/snow synthesis in pipelines/weather.py."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from d4ir.pipelines.weather import (
    DEGRADE,
    HAZE_DEPTH,
    RAIN_LEVELS,
    SNOW_LEVELS,
    add_haze,
    add_rain,
    add_snow,
    degrade,
    haze_depth,
    rain_layer,
    snow_mask,
)
from d4ir.pipelines.weather_kernels import line_kernel
from PIL import Image


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A natural 64x80 RGB crop, float64 in [0, 1]."""
    arr = skimage.data.astronaut()[:400, :500]
    return np.asarray(Image.fromarray(arr).resize((80, 64), Image.LANCZOS), dtype=np.float64) / 255.0


# ---------------------------------------------------------------- haze


def test_haze_matches_scattering_model(photo):
    depth = np.full(photo.shape[:2], 5.0)
    out = add_haze(photo, rng(0), beta=0.1, airlight=0.9, depth=depth)
    t = np.exp(-0.1 * 5.0)
    np.testing.assert_allclose(out, photo * t + 0.9 * (1 - t), atol=1e-12)
    # beta = 0 or depth = 0 is no haze at all
    np.testing.assert_allclose(add_haze(photo, rng(0), beta=0.0), photo, atol=1e-12)
    np.testing.assert_allclose(add_haze(photo, rng(0), depth=0.0), photo, atol=1e-12)


def test_hazy_pixel_moves_toward_airlight_as_depth_grows():
    clean = np.full((4, 50, 3), 0.2)
    depth = np.broadcast_to(np.linspace(0.0, 40.0, 50), (4, 50))  # depth grows left to right
    out = add_haze(clean, rng(1), beta=0.1, airlight=0.9, depth=depth)
    gap = np.abs(out - 0.9)[0, :, 0]
    assert np.all(np.diff(gap) < 0)
    assert gap[0] == pytest.approx(0.7) and gap[-1] < 0.7 * np.exp(-3.9)
    # the same holds for an RGB airlight, channel by channel
    out_rgb = add_haze(clean, rng(1), beta=0.1, airlight=(0.8, 0.9, 1.0), depth=depth)
    assert np.all(np.diff(np.abs(out_rgb - np.array([0.8, 0.9, 1.0])), axis=1) < 0)


@pytest.mark.parametrize("use_proxy", [False, True])
def test_haze_contrast_falls_monotonically_with_beta(photo, use_proxy):
    depth = None if use_proxy else 6.0  # None: the proxy, identical for the same seed
    stds = [add_haze(photo, rng(7), beta=b, depth=depth).std() for b in np.linspace(0.0, 0.3, 7)]
    assert np.all(np.diff(stds) < 0), stds


def test_haze_depth_proxy_range_and_far_top(photo):
    d = haze_depth(photo, rng(3))
    assert d.shape == photo.shape[:2]
    assert d.min() == pytest.approx(HAZE_DEPTH[0]) and d.max() == pytest.approx(HAZE_DEPTH[1])
    assert d[:10].mean() > d[-10:].mean() + 2.0  # the top of a photo is far away
    # a fixed beta keeps the drawn depth: the ratio of log transmissions is the ratio of betas
    a = add_haze(photo, rng(5), beta=0.05, airlight=1.0)
    b = add_haze(photo, rng(5), beta=0.15, airlight=1.0)
    dark = photo < 0.6  # avoid J close to A where t is ill-conditioned
    ratio = np.log((1 - b[dark]) / (1 - photo[dark])) / np.log((1 - a[dark]) / (1 - photo[dark]))
    np.testing.assert_allclose(ratio, 3.0, rtol=1e-6)


# ---------------------------------------------------------------- rain


@pytest.mark.parametrize("level", sorted(RAIN_LEVELS))
def test_rain_is_never_darker_and_adds_streaks(photo, level):
    for seed in range(4):
        rainy = add_rain(photo, rng(seed), level=level)
        assert np.all(rainy >= photo)
        assert (rainy - photo).mean() > 0.005
        assert (rainy - photo).max() > 0.3  # visible streaks, not a faint wash


def test_heavy_rain_covers_more_than_light():
    light = np.mean([rain_layer(64, 64, rng(s), level="light").mean() for s in range(6)])
    heavy = np.mean([rain_layer(64, 64, rng(s), level="heavy").mean() for s in range(6)])
    assert heavy > 2 * light


def test_light_rain_streaks_are_near_vertical_lines():
    # light rain falls within 20 degrees of vertical: intensity changes far more across than along
    s = rain_layer(128, 128, rng(11), level="light")
    across = np.abs(np.diff(s, axis=1)).sum()
    along = np.abs(np.diff(s, axis=0)).sum()
    assert across > 2.0 * along


def test_line_kernel_mass_and_direction():
    k = line_kernel(9.0, 0.0)  # vertical
    assert k.sum() == pytest.approx(9.0)
    centre = k.shape[1] // 2
    assert k[:, centre].sum() > 0.95 * k.sum()
    k45 = line_kernel(9.0, 45.0)
    assert k45.sum() == pytest.approx(9.0)
    assert np.trace(k45) > 0.5 * k45.sum()  # top-left to bottom-right: leans right at the bottom


# ---------------------------------------------------------------- snow


@pytest.mark.parametrize("level", sorted(SNOW_LEVELS))
def test_snow_brightens_on_average(photo, level):
    snowy = add_snow(photo, rng(2), level=level)
    assert snowy.mean() > photo.mean()
    assert (snowy - photo).max() > 0.3


def test_snow_levels_order_by_coverage():
    cover = {lv: np.mean([snow_mask(96, 96, rng(s), level=lv).mean() for s in range(4)]) for lv in SNOW_LEVELS}
    assert cover["light"] < cover["medium"] < cover["heavy"]


# ---------------------------------------------------------------- all tasks


@pytest.mark.parametrize("task", sorted(DEGRADE))
def test_seeding_shape_dtype_and_range(photo, task):
    for dtype in (np.float32, np.float64):
        clean = photo.astype(dtype)
        a = degrade(task, clean, rng(4))
        assert a.shape == clean.shape and a.dtype == dtype
        assert a.min() >= 0.0 and a.max() <= 1.0
        np.testing.assert_array_equal(a, degrade(task, clean, rng(4)))
        assert not np.array_equal(a, degrade(task, clean, rng(5)))
        assert not np.array_equal(a, clean)
    # extremes and odd, tiny sizes stay in range
    for clean in (np.zeros((5, 7, 3)), np.ones((33, 17, 3)), np.full((1, 1, 3), 0.5)):
        out = degrade(task, clean, rng(0))
        assert out.shape == clean.shape and out.min() >= 0.0 and out.max() <= 1.0


def test_degrade_forwards_options(photo):
    np.testing.assert_array_equal(degrade("derain", photo, rng(1), level="heavy"),
                                  add_rain(photo, rng(1), level="heavy"))
    np.testing.assert_array_equal(degrade("dehaze", photo, rng(1), beta=0.1),
                                  add_haze(photo, rng(1), beta=0.1))


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda img: add_rain((img * 255).astype(np.uint8), rng(0)), TypeError),
        (lambda img: add_rain(img[..., 0], rng(0)), ValueError),
        (lambda img: add_snow(img * 2.0, rng(0)), ValueError),
        (lambda img: add_haze(np.where(img > 0.5, np.nan, img), rng(0)), ValueError),
        (lambda img: add_rain(img, rng(0), level="medium"), ValueError),
        (lambda img: add_snow(img, rng(0), level="blizzard"), ValueError),
        (lambda img: add_haze(img, rng(0), beta=-0.1), ValueError),
        (lambda img: add_haze(img, rng(0), airlight=1.5), ValueError),
        (lambda img: add_haze(img, rng(0), depth=np.ones((3, 3))), ValueError),
        (lambda img: degrade("defog", img, rng(0)), ValueError),
        (lambda img: add_rain(img.tolist(), rng(0)), TypeError),
    ],
)
def test_bad_input_raises(photo, call, error):
    with pytest.raises(error):
        call(photo)
