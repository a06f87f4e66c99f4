"""The weather-matrix dataset: rain, haze and snow tasks from the shared images, for the whole matrix on a CPU.

Under OUT/data/weather-matrix/:
  rain/train/   Rain100L pairs 1-50 (the derain teacher's private pairs)    rain/test/  pairs 51-100 ("Rain100L")
  rain/spa/     the SPA-Data real-rain samples ("SPA", test only)
  haze/train/   HazeRD pairs (the dehaze teacher's private pairs)           haze/test/  the SOTS-outdoor samples
  snow/train/   synthetic snow (`pipelines.weather.add_snow`, a random light/medium/heavy level per image) on the
                clean side of Rain100L pairs 1-50; snow/test/ the same on pairs 51-100 (there is no real snow set)
  web_clean/    one folder for every weather: the clean photos of hsts, sots_indoor, test1200, test2800 and the
                rain100l_*_sample sets
  rain|haze|snow/web_degraded/  PER_PHOTO synthetic renders of each web clean photo in that weather, plus the
                real rainy (test1200, test2800, rain100l_*_sample) or hazy (hsts, sots_indoor) images
Every test and training image of every weather is protected: no web folder holds one (by pixels, also through
the 480x320 crops of Rain100L), so the all-in-one task that mixes the three sees no test image either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from d4ir.shards.images import read_rgb
from d4ir.shards.pairs import find_pairs

from .data_common import Protected, copy_pairs, finish, numbered_pairs, reuse, save_render, web_images

PER_PHOTO = 2  # synthetic renders per web clean photo and weather
SNOW_LEVELS = ("light", "medium", "heavy")
WEB_CLEAN = ("hsts_synthetic", "sots_indoor_samples", "test1200_samples", "test2800_samples",
             "rain100l_train_sample", "rain100l_fullsize_samples")
REAL = {"rain": ("test1200_samples", "test2800_samples", "rain100l_train_sample", "rain100l_fullsize_samples"),
        "haze": ("hsts_synthetic", "sots_indoor_samples")}
TASK_OF = {"rain": "derain", "haze": "dehaze", "snow": "desnow"}


def _options(weather: str, rng: np.random.Generator) -> dict:
    if weather == "rain":
        return {"level": "light"}
    if weather == "snow":
        return {"level": SNOW_LEVELS[int(rng.integers(len(SNOW_LEVELS)))]}
    return {}


def _snow_pairs(pairs: dict, numbers: range, dest: Path, seed: int, salt: int) -> None:
    """Synthetic snowy pairs: each clean side as it is, its snowy render as the degraded side."""
    for side in ("degraded", "clean"):
        (dest / side).mkdir(parents=True, exist_ok=True)
    for n in numbers:
        clean = read_rgb(pairs[n].clean, min_side=1)
        rng = np.random.default_rng([seed, salt, n])
        save_render(dest / "degraded" / f"{n}.png", "desnow", clean, rng, **_options("snow", rng))
        (dest / "clean" / f"{n}{pairs[n].clean.suffix}").write_bytes(pairs[n].clean.read_bytes())


def weather_matrix(data_root: Path, out: Path, seed: int) -> dict:
    """Build the weather matrix under `out` (see the module docstring); returns data.json's content."""
    params = {"builder": "weather-matrix", "source": str(data_root), "seed": seed, "per_photo": PER_PHOTO}
    info = reuse(out, params)
    if info is not None:
        return info
    rain100l = numbered_pairs(data_root / "rain100l_test", range(1, 101))
    private_rain = [rain100l[n] for n in range(1, 51)]
    test_rain = [rain100l[n] for n in range(51, 101)]
    spa, hazerd, sots = (find_pairs(data_root / s) for s in ("spa_data_samples", "hazerd_samples",
                                                             "sots_outdoor_samples"))
    protected = Protected()
    for pairs in (private_rain, test_rain, spa, hazerd, sots):
        protected.add_pairs(pairs)
    counts = {"rain/train": copy_pairs(private_rain, out / "rain" / "train"),
              "rain/test": copy_pairs(test_rain, out / "rain" / "test"),
              "rain/spa": copy_pairs(spa, out / "rain" / "spa"),
              "haze/train": copy_pairs(hazerd, out / "haze" / "train"),
              "haze/test": copy_pairs(sots, out / "haze" / "test")}
    _snow_pairs(rain100l, range(1, 51), out / "snow" / "train", seed, 1)
    _snow_pairs(rain100l, range(51, 101), out / "snow" / "test", seed, 2)
    counts.update({"snow/train": 50, "snow/test": 50})

    for folder in ("web_clean", "rain/web_degraded", "haze/web_degraded", "snow/web_degraded"):
        (out / folder).mkdir(parents=True)
    excluded, seen = [], set()
    counts |= {"web_clean": 0, "duplicates": 0}
    for set_index, i, name, src, arr in web_images(data_root, [(s, "clean") for s in WEB_CLEAN], protected, seen,
                                                   excluded, counts):
        (out / "web_clean" / f"{name}{src.suffix}").write_bytes(src.read_bytes())
        counts["web_clean"] += 1
        for w, weather in enumerate(TASK_OF):
            for k in range(PER_PHOTO):
                rng = np.random.default_rng([seed, 10 + w, set_index, i, k])
                save_render(out / weather / "web_degraded" / f"syn-{name}-{k}.png", TASK_OF[weather], arr, rng,
                            **_options(weather, rng))
                counts[f"{weather}/synthetic"] = counts.get(f"{weather}/synthetic", 0) + 1
    for weather, sets in REAL.items():
        for _, _, name, src, _ in web_images(data_root, [(s, "degraded") for s in sets], protected, seen, excluded,
                                             counts):
            (out / weather / "web_degraded" / f"real-{name}{src.suffix}").write_bytes(src.read_bytes())
            counts[f"{weather}/real"] = counts.get(f"{weather}/real", 0) + 1
    notes = [
        "weather-matrix: derain trains on Rain100L pairs 1-50 and is scored on pairs 51-100 and on the SPA-Data "
        "samples; dehaze trains on the HazeRD samples and is scored on the SOTS-outdoor samples.",
        "Desnowing has no real data here (no Snow100K, no CSD): its training and test pairs are the project's "
        "synthetic snow (pipelines.weather) on Rain100L backgrounds; its numbers are not comparable to the "
        "paper's Snow100K.",
        f"Web degraded folders are synthetic rain/haze/snow ({PER_PHOTO} renders per web clean photo) plus the "
        "real rainy and hazy images of the sets not used for testing or training; no web image equals a test or "
        "training image.",
    ]
    return finish(out, {**params, "counts": counts, "excluded": excluded, "notes": notes})
