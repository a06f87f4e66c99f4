"""Named dataset builders a config asks for (`"prepare": {"rain100l-split": "../shared/data"}`): each reads the
shared benchmark images and writes OUT/data/NAME, with data.json (what was built from what, counts, every image
left out and why) written last, so a rerun reuses a finished folder and rebuilds a half-built one.

rain100l-split (docs/design.md, "Real data"; the protocol `bench/quality_rain100l.py` runs):
  train/     pairs 1-50 of rain100l_test: the teacher's private data ("Student" trains on them, "Data" distils
             on their degraded side).
  test/      pairs 51-100, scored at full size (480x320).
  web_clean/ the clean photos of the OTHER sets (sots_*, hsts, hazerd, test1200, test2800, spa,
             rain100l_fullsize, rain100l_train_sample), byte duplicates dropped.
  web_degraded/ synthetic light rain (`pipelines.weather.add_rain`, RAIN_PER_PHOTO renders per web clean
             photo) plus the real rainy images of spa, test1200, test2800 and rain100l_*_sample.
  Any web image pixel-identical to a rain100l_test image (either side, also through its top-left 480x320
  crop) is left out and listed: rain100l_fullsize holds test pairs 1 and 56 uncropped.

weather-matrix (pipelines/experiments/matrix_data.py): rain, haze and snow tasks whose test and training
images are all kept out of one shared web folder, for the whole matrix on the CPU.

real-derain, real-dehaze (pipelines/experiments/real_data.py): the real-parts setting, a published teacher's
test set and real web photos (configs/real-derain.json, configs/real-dehaze.json).

demo (pipelines/demo_data.py): the embedded demo's derain task, made from the photos inside scikit-image (no
source folder is read; its `prepare` value only documents that): original/ and test/ pairs, web_degraded/ and
web_clean/ from one pool of other photos (configs/demo.json, `make demo`).

Shared images never go into the repository: a builder refuses an experiments folder inside it (the demo's
generated images may go anywhere).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from d4ir.shards.layout import ExperimentLayout

from .data_common import Protected, finish, numbered_pairs, reuse, save_render, web_images
from .real_data import real_dehaze, real_derain

TEST_SET = "rain100l_test"
PRIVATE, TEST = range(1, 51), range(51, 101)
WEB_CLEAN_SETS = ("sots_outdoor_samples", "sots_indoor_samples", "hsts_synthetic", "hazerd_samples",
                  "test1200_samples", "test2800_samples", "spa_data_samples", "rain100l_fullsize_samples",
                  "rain100l_train_sample")
WEB_RAINY_SETS = ("spa_data_samples", "test1200_samples", "test2800_samples", "rain100l_fullsize_samples",
                  "rain100l_train_sample")
RAIN_PER_PHOTO = 2  # synthetic rain renders per web clean photo
REPO_ROOT = Path(__file__).resolve().parents[2]


def rain100l_split(data_root: Path, out: Path, seed: int) -> dict:
    """Build the Rain100L split under `out` (see the module docstring); returns data.json's content."""
    params = {"builder": "rain100l-split", "source": str(data_root), "seed": seed, "rain_per_photo": RAIN_PER_PHOTO}
    info = reuse(out, params)
    if info is not None:
        return info
    pairs = numbered_pairs(data_root / TEST_SET, range(1, 101))
    protected = Protected()
    for split, numbers in (("train", PRIVATE), ("test", TEST)):
        for side in ("degraded", "clean"):
            (out / split / side).mkdir(parents=True, exist_ok=True)
        for n in numbers:
            for side in ("degraded", "clean"):
                src = getattr(pairs[n], side)
                shutil.copy2(src, out / split / side / f"{n}{src.suffix}")
                protected.add(src)
    for folder in ("web_clean", "web_degraded"):
        (out / folder).mkdir(parents=True)
    excluded, seen = [], set()
    counts = {"web_clean": 0, "synthetic_rain": 0, "real_rain": 0, "duplicates": 0}
    sources = [(s, "clean") for s in WEB_CLEAN_SETS] + [(s, "degraded") for s in WEB_RAINY_SETS]
    for set_index, i, name, src, arr in web_images(data_root, sources, protected, seen, excluded, counts):
        if sources[set_index][1] == "degraded":
            shutil.copy2(src, out / "web_degraded" / f"real-{name}{src.suffix}")
            counts["real_rain"] += 1
            continue
        shutil.copy2(src, out / "web_clean" / f"{name}{src.suffix}")
        counts["web_clean"] += 1
        for k in range(RAIN_PER_PHOTO):
            rng = np.random.default_rng([seed, set_index, i, k])
            save_render(out / "web_degraded" / f"syn-{name}-{k}.png", "derain", arr, rng, level="light")
            counts["synthetic_rain"] += 1
    notes = ["Rain100L split: the teacher trains on pairs 1-50, every row is scored on pairs 51-100; web degraded "
             f"= synthetic light rain ({RAIN_PER_PHOTO} per web clean photo) plus the real rainy images of the "
             "other sets; web images identical to a Rain100L test image are left out."]
    return finish(out, {**params, "counts": counts, "excluded": excluded, "private_pairs": "1-50",
                        "test_pairs": "51-100", "notes": notes})


def demo_data(data_root: Path, out: Path, seed: int) -> dict:
    """The demo's derain folders under `out` (build_demo_data, reused when built); `data_root` is not read."""
    from d4ir.pipelines.demo_data import build_demo_data

    params = {"builder": "demo", "source": "scikit-image sample photos", "seed": seed}
    info = reuse(out, params)
    if info is not None:
        return info
    build_demo_data(out, tasks=("derain",), seed=seed, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    notes = ["demo: 96x96 crops of scikit-image photos; the teacher's pairs, the test pairs and the web pool share "
             "no photo; web clean and web degraded are shuffled non-overlapping tiles of the pool (out/README.md)."]
    return finish(out, {**params, "counts": manifest["counts"]["derain"], "excluded": [], "notes": notes})


def _weather_matrix(data_root: Path, out: Path, seed: int) -> dict:
    from .matrix_data import weather_matrix

    return weather_matrix(data_root, out, seed)


BUILDERS: dict[str, Callable[[Path, Path, int], dict]] = {
    "rain100l-split": rain100l_split,
    "weather-matrix": _weather_matrix,
    "real-derain": real_derain,
    "real-dehaze": real_dehaze,
    "demo": demo_data,
}
GENERATED = ("demo",)  # builders that read no source folder: their images may be written anywhere


def prepare(name: str, data_root: Path, out_root: Path, seed: int) -> dict:
    """Run builder `name` on the shared data under `data_root` into OUT/data/NAME; returns its data.json."""
    out = ExperimentLayout(Path(out_root)).data(name)
    if name in GENERATED:
        return BUILDERS[name](Path(data_root), out, seed)
    if out.resolve().is_relative_to(REPO_ROOT):
        raise ValueError(f"{out} is inside the repository; the shared benchmark images must not be copied into "
                         "it: choose an experiments folder outside it")
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"prepare.{name}: the shared data folder {data_root} does not exist")
    return BUILDERS[name](Path(data_root), out, seed)
