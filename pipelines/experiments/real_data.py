"""Builders of the real-parts setting (issue 23): a published teacher whose training data is not here, a real test
set, real web photos. Each writes OUT/data/NAME and its data.json (data_common.reuse/finish).

real-derain (the paper's Table 1 with real parts; the teacher is PReNet trained on RainTrainL):
  test/          Rain100L test pairs 51-100, every row is scored on them.
  original/      Rain100L test pairs 1-50: they stand in for the teacher's own data; the Data row distils on their
                 degraded side only (no other training row reads a Rain100L image).
  web_degraded/  real rainy photos from the web: SIRR's 147 real rainy images, plus the rainy side of the SPA-Data
                 (real rain), Rain1200 and Rain14000 samples (the paper's web rain comes from Rain1400).
  web_clean/     photos of no test set: Kodak24, Sun-Hays 80, Urban100 (first 30), McMaster18.
real-dehaze (a second, few-image table; the teacher is GCANet trained on RESIDE ITS):
  tests/sots-indoor, tests/sots-outdoor, tests/hsts: the SOTS-indoor, SOTS-outdoor and HSTS samples.
  web_degraded/  real hazy photos (AOD-Net's and LD-Net's) and the hazy side of the HazeRD samples.
  web_clean/     as for real-derain.

Leakage: every image of a test set and of the private split is protected by its pixels (data_common); a web image
equal to one (also through a top-left Rain100L crop) is left out and listed in data.json, and data.json records
the pixel keys of every test image so that a test can check every training folder against them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from d4ir.shards.images import read_rgb
from d4ir.shards.pairs import find_pairs

from .data_common import Protected, copy_pairs, finish, numbered_pairs, pixels_key, reuse, web_images

WEB_CLEAN = ("kodak24", "sun_hays80", "urban100_first30", "mcmaster18")
WEB_RAIN = ("sirr_real_rain", "spa_data_samples", "test1200_samples", "test2800_samples")
WEB_HAZE = ("haze_real_samples", "hazerd_samples")
DEHAZE_TESTS = {"sots-indoor": "sots_indoor_samples", "sots-outdoor": "sots_outdoor_samples",
                "hsts": "hsts_synthetic"}
PRIVATE, TEST = range(1, 51), range(51, 101)


def _web(data_root: Path, out: Path, sources: list[tuple[str, str, str]], protected: Protected) -> tuple[dict, list]:
    """Copy the usable images of (set, side, destination folder) `sources` byte for byte; returns (counts,
    excluded)."""
    counts: dict = {"duplicates": 0}
    excluded: list[dict] = []
    seen: set[str] = set()
    for folder in {dest for _, _, dest in sources}:
        (out / folder).mkdir(parents=True, exist_ok=True)
    pairs = [(s, side) for s, side, _ in sources]
    for set_index, _, name, src, _ in web_images(data_root, pairs, protected, seen, excluded, counts):
        dest = sources[set_index][2]
        shutil.copy2(src, out / dest / f"{name}{src.suffix}")
        counts[dest] = counts.get(dest, 0) + 1
    return counts, excluded


def _test_keys(folders: list[Path]) -> list[str]:
    """The pixel keys of every image (both sides) of the paired test folders."""
    return sorted({pixels_key(read_rgb(p, min_side=1)) for f in folders for pair in find_pairs(f)
                   for p in (pair.degraded, pair.clean)})


def real_derain(data_root: Path, out: Path, seed: int) -> dict:
    """Build the real deraining setting under `out` (module docstring); returns data.json's content."""
    params = {"builder": "real-derain", "source": str(data_root), "seed": seed}
    if (info := reuse(out, params)) is not None:
        return info
    pairs = numbered_pairs(data_root / "rain100l_test", range(1, 101))
    protected = Protected()
    protected.add_pairs(list(pairs.values()))
    copy_pairs([pairs[n] for n in PRIVATE], out / "original")
    copy_pairs([pairs[n] for n in TEST], out / "test")
    sources = [(s, "degraded", "web_degraded") for s in WEB_RAIN] + [(s, "clean", "web_clean") for s in WEB_CLEAN]
    counts, excluded = _web(data_root, out, sources, protected)
    notes = ["Real parts: the teacher is PReNet trained on RainTrainL (not here); Rain100L pairs 51-100 test every "
             "row, pairs 1-50 stand in for the teacher's data (the Data row reads their degraded side only); web "
             "degraded = real rainy photos (SIRR, SPA) and Rain1200/Rain14000 samples; web clean = Kodak24, Sun-Hays "
             "80, Urban100 (first 30), McMaster18. Web images pixel-identical to a Rain100L image are left out."]
    return finish(out, {**params, "counts": counts | {"original": len(PRIVATE), "test": len(TEST)},
                        "excluded": excluded, "test_pixel_keys": _test_keys([out / "test"]),
                        "private_pixel_keys": _test_keys([out / "original"]), "notes": notes})


def real_dehaze(data_root: Path, out: Path, seed: int) -> dict:
    """Build the real dehazing setting under `out` (module docstring); returns data.json's content."""
    params = {"builder": "real-dehaze", "source": str(data_root), "seed": seed}
    if (info := reuse(out, params)) is not None:
        return info
    protected = Protected()
    tests = []
    for name, set_name in DEHAZE_TESTS.items():
        found = find_pairs(data_root / set_name)
        protected.add_pairs(list(found))
        copy_pairs(list(found), out / "tests" / name)
        tests.append(out / "tests" / name)
    sources = [(s, "degraded", "web_degraded") for s in WEB_HAZE] + [(s, "clean", "web_clean") for s in WEB_CLEAN]
    counts, excluded = _web(data_root, out, sources, protected)
    notes = ["Real parts, few images: the teacher is GCANet trained on RESIDE ITS (not here); tested on the SOTS-"
             "indoor, SOTS-outdoor and HSTS samples (too few pairs to reproduce a published mean); web hazy = real "
             "hazy photos (AOD-Net, LD-Net) and the HazeRD hazy side; web clean as for real-derain."]
    return finish(out, {**params, "counts": counts | {name: len(find_pairs(t)) for name, t in zip(DEHAZE_TESTS, tests)},
                        "excluded": excluded, "test_pixel_keys": _test_keys(tests), "notes": notes})
