"""pipelines/weather_sd/stats.py: each weather statistic rises with its own weather (rendered by
pipelines.weather at two strengths) and not with the other two; content kept; input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from d4ir.pipelines.weather import degrade
from d4ir.pipelines.weather_sd.data import WeatherSetConfig, build_weather_set
from d4ir.pipelines.weather_sd.stats import (
    colour_stats,
    content_kept,
    dark_channel,
    dominant_angle,
    line_kernel,
    rain_streak_energy,
    snow_blob_density,
    weather_stats,
)


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    """Twelve held-out 64x64 clean crops (chelsea, camera, brick), [12,3,64,64] in [0,1]."""
    data = build_weather_set(WeatherSetConfig("held_out", crops_per_photo=4, weathers=("clean",)))
    return data.floats()


def _render(clean: torch.Tensor, task: str, **kwargs) -> torch.Tensor:
    out = []
    for i, img in enumerate(clean):
        arr = degrade(task, img.permute(1, 2, 0).double().numpy(), np.random.default_rng(100 + i), **kwargs)
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float())
    return torch.stack(out)


@pytest.fixture(scope="module")
def renders(clean) -> dict[str, torch.Tensor]:
    return {
        "clean": clean,
        "rain_weak": _render(clean, "derain", level="light"),
        "rain_strong": _render(clean, "derain", level="heavy"),
        "haze_weak": _render(clean, "dehaze", beta=0.05),
        "haze_strong": _render(clean, "dehaze", beta=0.2),
        "snow_weak": _render(clean, "desnow", level="light"),
        "snow_strong": _render(clean, "desnow", level="heavy"),
    }


def _means(renders) -> dict[str, dict[str, float]]:
    return {k: {n: float(v.mean()) for n, v in weather_stats(x).items()} for k, x in renders.items()}


def test_each_statistic_rises_with_its_weather(renders):
    m = _means(renders)
    for stat, weather in (("rain", "rain"), ("haze", "haze"), ("snow", "snow")):
        c, weak, strong = m["clean"][stat], m[f"{weather}_weak"][stat], m[f"{weather}_strong"][stat]
        assert c < weak < strong, (stat, c, weak, strong)
    # the weak render already moves its statistic clearly (more than a quarter above clean)
    assert m["rain_weak"]["rain"] > 1.25 * m["clean"]["rain"]
    assert m["snow_weak"]["snow"] > 4 * m["clean"]["snow"]
    assert m["haze_weak"]["haze"] > m["clean"]["haze"] + 0.1


def test_statistics_do_not_rise_with_the_other_weathers(renders):
    m = _means(renders)
    rise = {s: m[f"{s}_weak"][s] - m["clean"][s] for s in ("rain", "haze", "snow")}
    for stat in ("rain", "haze", "snow"):
        for other in {"rain", "haze", "snow"} - {stat}:
            for level in ("weak", "strong"):
                if (stat, other, level) == ("haze", "rain", "strong"):
                    continue  # heavy rain carries a veil (a little haze) by design
                moved = m[f"{other}_{level}"][stat] - m["clean"][stat]
                assert moved < 0.25 * rise[stat], (stat, other, level, moved, rise[stat])


def test_haze_lowers_contrast(renders):
    m = _means(renders)
    assert m["haze_strong"]["contrast"] < m["haze_weak"]["contrast"] < m["clean"]["contrast"]


def test_dominant_angle_follows_synthetic_streaks():
    for angle in (-30, 0, 45):
        canvas = torch.zeros(1, 1, 64, 64)
        rng = torch.Generator().manual_seed(0)
        canvas.view(-1)[torch.randint(64 * 64, (60,), generator=rng)] = 1.0
        k = line_kernel(15, angle)[None, None] * 15
        streaks = torch.nn.functional.conv2d(canvas, k, padding=k.shape[-1] // 2).clamp(0, 1)
        img = (0.3 + 0.7 * streaks).expand(1, 3, 64, 64)
        assert float(dominant_angle(img)) == pytest.approx(angle, abs=15)
        assert float(rain_streak_energy(img)) > 10 * float(rain_streak_energy(torch.full((1, 3, 64, 64), 0.3)))


def test_dark_channel_and_blobs_on_simple_images():
    assert float(dark_channel(torch.full((1, 3, 32, 32), 0.25))) == pytest.approx(0.25)
    img = torch.full((1, 3, 32, 32), 0.2)
    assert float(snow_blob_density(img)) == 0.0
    img[..., 8, 8] = img[..., 20, 24] = 1.0  # two bright one-pixel flakes
    assert float(snow_blob_density(img)) == pytest.approx(2 / 1024 * 1e3)


def test_content_kept(renders):
    clean = renders["clean"]
    same = content_kept(clean, clean)
    assert torch.isinf(same["psnr"]).all() and torch.allclose(same["ssim"], torch.ones(len(clean)))
    snow, haze = content_kept(renders["snow_weak"], clean), content_kept(renders["haze_strong"], clean)
    assert float(snow["psnr"].mean()) > float(haze["psnr"].mean()) + 10  # flakes blur away, haze does not
    assert not math.isnan(float(snow["ssim"].mean()))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        weather_stats(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="at least 16x16"):
        weather_stats(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        content_kept(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16))


def test_colour_stats_match_their_definitions():
    grey = torch.full((1, 3, 16, 16), 0.4)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    pink = torch.tensor([0.9, 0.6, 0.7]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    out = colour_stats(torch.cat([grey, red, pink]))
    assert torch.allclose(out["saturation"], torch.tensor([0.0, 1.0, 0.3]))
    assert torch.allclose(torch.stack([out["r"], out["g"], out["b"]], 1)[2], torch.tensor([0.9, 0.6, 0.7]))
    with pytest.raises(ValueError):
        colour_stats(torch.zeros(1, 1, 16, 16))
