"""The embedded demo data: weather images made offline from the photos that ship with scikit-image.

``build_demo_data`` cuts crops from the sample photos in scikit-image's wheel (no download) and degrades them
with ``pipelines.weather``. The teacher's pairs and the test pairs come from their own photos; the two web sets
come from ONE pool of other photos, as the paper draws both from one collection (Rain1400's two sides, shuffled
to be unpaired): every pool photo is cut into non-overlapping tiles, the tiles are shuffled, and the first ones
become web degraded images, the next ones web clean images (disjoint pixels, no pairs):

    out/<task>/original/{degraded,clean}/*.png   paired: the teacher's private training data
    out/<task>/test/{degraded,clean}/*.png       paired: the test set
    out/<task>/web_degraded/*.png                unpaired "web" degraded images
    out/<task>/web_clean/*.png                   unpaired "web" clean images
    out/README.md                                how it was made
    out/manifest.json                            parameters, counts, every crop and its synthesis options

As in the paper, the web degraded images differ in kind from the original ones (a domain shift): the
teacher sees Rain100L-like light rain, RESIDE-OTS-like haze and mixed snow, while the web degraded set
mixes light and heavy rain, haze with a wider beta/airlight range, and medium/heavy snow.
Everything is a pure function of the parameters: a rerun writes byte-identical PNGs.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import skimage.data
from d4ir.pipelines.weather import HAZE_AIRLIGHT, HAZE_BETA, HAZE_DEPTH, RAIN_LEVELS, SNOW_LEVELS, TASKS, degrade
from d4ir.shards.images import save_png
from d4ir.shards.progress import progress_bar
from PIL import Image

BUILD_VERSION = 2  # bump when the recipe changes, so existing folders are rebuilt
TASK_IDS = {"derain": 0, "dehaze": 1, "desnow": 2}  # fixed, so a subset of tasks gives the same images
SPLIT_IDS = {"original": 0, "test": 1, "web_degraded": 2, "web_clean": 3}
WEB_SPLITS = ("web_degraded", "web_clean")

# scikit-image sample photos (all in the wheel) with their licences, from the skimage.data docstrings
PHOTOS: dict[str, str] = {
    "astronaut": "public domain (NASA)",
    "coffee": "CC0 (Rachel Michetti)",
    "immunohistochemistry": "no known copyright restrictions",
    "grass": "CC0 (CC0Textures)",
    "coins": "no known copyright restrictions",
    "chelsea": "CC0 (Stefan van der Walt)",
    "camera": "CC0 (Lav Varshney)",
    "brick": "CC0 (CC0Textures)",
    "hubble_deep_field": "public domain (NASA)",
    "retina": "CC0 (Mikael Haggstrom)",
    "gravel": "CC0 (CC0Textures)",
    "text": "public domain",
    "rocket": "public domain (SpaceX)",
    "clock": "public domain (Stefan van der Walt)",
    "cell": "CC0 (Guck lab)",
}
# disjoint by photo: the teacher's pairs, the test pairs and the web pool share no photo (the test photos are also
# the weather LDM's held-out ones); both web sets are tiles of the pool's photos (`web_tiles`)
SPLITS: dict[str, tuple[str, ...]] = {
    "original": ("astronaut", "coffee", "immunohistochemistry", "grass", "coins"),
    "test": ("chelsea", "camera", "brick"),
    "web": ("hubble_deep_field", "retina", "gravel", "text", "rocket", "clock", "cell"),
}
WEB_TILES_PER_SIDE = 6  # a pool photo's tile side: max(size, shorter side / 6)
MAX_CROP_FRACTION = 0.6  # crop side drawn in [size, 0.6 * shorter photo side], then resized to size
MIN_CROP_STD = 0.05  # redraw (up to 10 times) crops flatter than this: black borders, empty sky
WEB_HAZE_BETA = (0.02, 0.3)  # wider than HAZE_BETA: the web mixes thin and thick haze
WEB_HAZE_AIRLIGHT = (0.7, 1.0)


@functools.cache
def _load_photo(name: str) -> np.ndarray:
    """A sample photo as read-only uint8 [H, W, 3] (gray replicated); cached, decoding takes a while."""
    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    arr.setflags(write=False)
    return arr


def cut_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int], bool]:
    """One random square crop of `photo` [H,W,3] uint8 (side drawn in [size, MAX_CROP_FRACTION x shorter side],
    redrawn up to 10 times while flatter than MIN_CROP_STD), resized to [size,size,3] uint8 and flipped at random;
    also its box [y, x, side] and the flip."""
    h, w = photo.shape[:2]
    lo = min(size, h, w)
    hi = max(lo, int(MAX_CROP_FRACTION * min(h, w)))
    for _ in range(10):
        side = int(rng.integers(lo, hi + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        flip = bool(rng.random() < 0.5)
        patch = photo[y : y + side, x : x + side]
        if patch.mean(axis=2).std() / 255.0 >= MIN_CROP_STD:
            break
    out = np.asarray(Image.fromarray(patch).resize((size, size), Image.LANCZOS))
    return np.ascontiguousarray(out[:, ::-1] if flip else out), [y, x, side], flip


def _cut_crops(
    photos: dict[str, np.ndarray], names: tuple[str, ...], n: int, size: int, rng: np.random.Generator
) -> list[tuple[dict, np.ndarray]]:
    """n crops cycling over the named photos: (record, uint8 [size, size, 3]) each."""
    crops = []
    for k in range(n):
        name = names[k % len(names)]
        arr, (y, x, side), flip = cut_crop(photos[name], size, rng)
        crops.append(
            ({"stem": f"{name}_{k:03d}", "photo": name, "box": [y, x, side], "flip": flip}, arr)
        )
    return crops


def web_tiles(photos: dict[str, np.ndarray], size: int, counts: tuple[int, int], rng: np.random.Generator
              ) -> dict[str, list[tuple[dict, np.ndarray]]]:
    """The two web sets from one pool: every pool photo cut into a grid of non-overlapping square tiles (side
    max(size, shorter side / WEB_TILES_PER_SIDE); tiles flatter than MIN_CROP_STD dropped), all tiles shuffled,
    the first counts[0] resized to [size, size, 3] uint8 as web degraded sources, the next counts[1] as web
    clean photos; each randomly flipped. Records: stem, photo, box [y, x, side], flip."""
    tiles = []
    for name in SPLITS["web"]:
        h, w = photos[name].shape[:2]
        side = max(size, min(h, w) // WEB_TILES_PER_SIDE)
        for y in range(0, h - side + 1, side):
            for x in range(0, w - side + 1, side):
                if photos[name][y : y + side, x : x + side].mean(axis=2).std() / 255.0 >= MIN_CROP_STD:
                    tiles.append((name, y, x, side))
    if sum(counts) > len(tiles):
        raise ValueError(f"the web pool has {len(tiles)} tiles; n_web_degraded + n_web_clean = {sum(counts)}")
    order = rng.permutation(len(tiles))
    out: dict[str, list[tuple[dict, np.ndarray]]] = {split: [] for split in WEB_SPLITS}
    for k, i in enumerate(order[: sum(counts)]):
        split = WEB_SPLITS[0] if k < counts[0] else WEB_SPLITS[1]
        name, y, x, side = tiles[i]
        patch = photos[name][y : y + side, x : x + side]
        arr = np.asarray(Image.fromarray(patch).resize((size, size), Image.LANCZOS))
        flip = bool(rng.random() < 0.5)
        n = len(out[split])
        out[split].append(({"stem": f"{name}_{n:03d}", "photo": name, "box": [y, x, side], "flip": flip},
                           np.ascontiguousarray(arr[:, ::-1] if flip else arr)))
    return out


def _options(task: str, split: str, k: int, rng: np.random.Generator) -> dict:
    """Synthesis options for image k of a split (the teacher's domain vs the web's)."""
    if split in ("original", "test"):
        if task == "derain":
            return {"level": "light"}
        if task == "desnow":
            return {"level": ("light", "medium", "heavy")[k % 3]}
        return {}  # haze: RESIDE OTS ranges of add_haze
    if task == "derain":
        return {"level": ("light", "heavy")[k % 2]}
    if task == "desnow":
        return {"level": ("medium", "heavy")[k % 2]}
    return {
        "beta": round(float(rng.uniform(*WEB_HAZE_BETA)), 4),
        "airlight": round(float(rng.uniform(*WEB_HAZE_AIRLIGHT)), 4),
    }


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _expected_files(out: Path, manifest: dict) -> list[Path]:
    files = []
    for task in manifest["params"]["tasks"]:
        for split, records in manifest["crops"].items():
            folders = ["degraded", "clean"] if split in ("original", "test") else [""]
            files += [out / task / split / f / f"{r['stem']}.png" for r in records for f in folders]
    return files


def _is_complete(out: Path, params: dict) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("params") == params and all(p.is_file() for p in _expected_files(out, manifest))


def build_demo_data(
    out: Path,
    *,
    size: int = 96,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
    n_original: int = 48,
    n_test: int = 16,
    n_web_degraded: int = 48,
    n_web_clean: int = 48,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Build (or reuse) the embedded demo data under ``out`` and return ``out``.

    A folder whose manifest has the same parameters and whose files are all present is left as it is
    unless ``force``. Otherwise the manifest is removed first (a half-built folder never looks done),
    the PNGs of the built tasks are rewritten and the manifest is written last.

    Args:
        out: output folder (created).
        size: side of the square crops in pixels (>= 8).
        seed: seed of all crops and all synthesis.
        tasks: any of "derain", "dehaze", "desnow".
        n_original, n_test: pairs in the teacher's training set and in the test set (>= 1).
        n_web_degraded, n_web_clean: unpaired web images (>= 1).
        progress: show a progress bar.
        force: rebuild even if the folder is complete.
    """
    out = Path(out)
    tasks = tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or any(t not in TASK_IDS for t in tasks):
        raise ValueError(f"tasks must be distinct names from {list(TASK_IDS)}, got {list(tasks)}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    counts = {"original": n_original, "test": n_test, "web_degraded": n_web_degraded, "web_clean": n_web_clean}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n_{split} must be an integer >= 1, got {n!r}")
    params = {
        "version": BUILD_VERSION,
        "size": size,
        "seed": int(seed),
        "tasks": list(tasks),
        **{f"n_{split}": n for split, n in counts.items()},
    }
    if not force and _is_complete(out, params):
        return out

    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for task in tasks:  # drop stale images of an earlier build with other counts
        for old in (out / task).glob("**/*.png"):
            old.unlink()

    photos = {name: _load_photo(name) for names in SPLITS.values() for name in names}
    crops = {split: _cut_crops(photos, SPLITS[split], counts[split], size,
                               np.random.default_rng([seed, 100, SPLIT_IDS[split]])) for split in ("original", "test")}
    crops |= web_tiles(photos, size, (n_web_degraded, n_web_clean), np.random.default_rng([seed, 100, 2]))
    options: dict[str, dict[str, list[dict]]] = {}
    bar = progress_bar(total=len(tasks) * sum(counts.values()), desc="demo data", enabled=progress)
    for task in tasks:
        options[task] = {}
        for split, items in crops.items():
            folder = out / task / split
            if split == "web_clean":
                for record, clean in items:
                    save_png(folder / f"{record['stem']}.png", clean)
                    bar.update()
                continue
            options[task][split] = []
            for k, (record, clean) in enumerate(items):
                rng = np.random.default_rng([seed, TASK_IDS[task], SPLIT_IDS[split], k])
                opts = _options(task, split, k, rng)
                degraded = _to_uint8(degrade(task, clean.astype(np.float64) / 255.0, rng, **opts))
                options[task][split].append(opts)
                if split == "web_degraded":
                    save_png(folder / f"{record['stem']}.png", degraded)
                else:
                    save_png(folder / "degraded" / f"{record['stem']}.png", degraded)
                    save_png(folder / "clean" / f"{record['stem']}.png", clean)
                bar.update()
    bar.close()

    manifest = {
        "format": "d4ir-demo-data",
        "params": params,
        "counts": {task: dict(counts) for task in tasks},
        "photos": {split: list(names) for split, names in SPLITS.items()},
        "crops": {split: [record for record, _ in items] for split, items in crops.items()},
        "options": options,
    }
    (out / "README.md").write_text(_readme(params, counts))
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / "manifest.json")
    return out


def _readme(params: dict, counts: dict[str, int]) -> str:
    photo_lines = "\n".join(
        f"- `{split}`: " + ", ".join(f"{p} ({PHOTOS[p]})" for p in names) for split, names in SPLITS.items()
    )
    rain = "\n".join(f"  - {name}: {asdict(spec)}" for name, spec in RAIN_LEVELS.items())
    snow = "\n".join(f"  - {name}: {[asdict(layer) for layer in spec]}" for name, spec in SNOW_LEVELS.items())
    return f"""# D4IR embedded demo data

Made by `pipelines/demo_data.py` (`build_demo_data`, recipe version {params["version"]}) from sample photos
that ship inside scikit-image; nothing was downloaded. Parameters: `{json.dumps(params)}`.

## Photos and splits

The teacher's pairs, the test pairs and the web pool use their own photos (no two share a source):

{photo_lines}

Both web sets come from the `web` pool, as the paper draws its web clean and web degraded images from one
collection: each pool photo is cut into a grid of non-overlapping square tiles (side max({params["size"]}, shorter
side / {WEB_TILES_PER_SIDE}), tiles flatter than {MIN_CROP_STD} dropped), the tiles of all pool photos are
shuffled (`np.random.default_rng([seed, 100, 2])`), the first {counts["web_degraded"]} become web degraded
images and the next {counts["web_clean"]} web clean photos: disjoint pixels, no pairs.

Per task: `original/` {counts["original"]} pairs (the teacher's private training data), `test/`
{counts["test"]} pairs, `web_degraded/` {counts["web_degraded"]} and `web_clean/` {counts["web_clean"]}
unpaired images. Paired sets share stems between `degraded/` and `clean/`; stems are `<photo>_<index>`.

## Crops

Crop i of the teacher's or the test group comes from photo i mod (photos in the group): a square of side
drawn uniformly in [{params["size"]}, {MAX_CROP_FRACTION} x shorter photo side] at a uniform position (redrawn up to 10
times while its gray-level std is below {MIN_CROP_STD}), resized to {params["size"]}x{params["size"]} with Lanczos,
flipped left-right with probability 0.5. Gray photos are replicated to RGB. Crop generator:
`np.random.default_rng([seed, 100, split_id])`; every degraded image has its own generator
`np.random.default_rng([seed, task_id, split_id, index])` (task ids {TASK_IDS}, split ids {SPLIT_IDS}).
`manifest.json` lists every crop (photo, box [y, x, side], flip) and its synthesis options.

## Synthesis (`pipelines/weather.py`)

- derain: motion-blurred streak layers, screen-blended. Teacher's data (original/test): level "light"
  (Rain100L-like); web degraded: alternating "light" and "heavy" (Rain100H-like). Levels:
{rain}
- dehaze: I = J t + A (1 - t), t = exp(-beta d), depth proxy d in {HAZE_DEPTH} (vertical gradient,
  smooth random field, brightness cue). Teacher's data: beta in {HAZE_BETA}, gray A in {HAZE_AIRLIGHT}
  (RESIDE OTS-like); web degraded: beta in {WEB_HAZE_BETA}, A in {WEB_HAZE_AIRLIGHT}.
- desnow: soft particle layers of several sizes, alpha-composited in near-white. Teacher's data: levels
  cycling light/medium/heavy (Snow100K S/M/L); web degraded: alternating medium and heavy. Levels:
{snow}
"""
