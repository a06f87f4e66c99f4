"""The weather LDM's data: crops of redistributable scikit-image photos, clean and in rain, haze and snow.

Every photo here ships inside the scikit-image wheel (no download) and was checked against its
`skimage.data` docstring: only photos whose licence or dedication allows redistributing a model trained on
them are used (`LICENCES`); `EXCLUDED` says why each other sample image is left out. Photos are split by
photo: `HELD_OUT` (the demo's test photos) never enters training and is kept for measurement.

Recipe for crop k of photo p (all randomness from seeded generators, so equal seeds give equal data):

    crop rng  = default_rng([seed, split_id, crc32(p), k])
    side ~ U{min(S,h,w) .. max(that, 0.6 min(h,w))}, top-left uniform, redrawn (<= 10 times) while the gray
    std < 0.05; Lanczos-resized to S x S; mirrored left-right with probability 1/2
    render w  = default_rng([seed, split_id, crc32(p), k, w + 1]) for w in 0..3 (clean, derain, dehaze, desnow)

with random strengths: rain level "light" or "heavy" (Rain100L/H-like), haze beta ~ U(0.02, 0.3) and gray
airlight ~ U(0.7, 1.0) (the demo's web range), snow level "light", "medium" or "heavy". Captions are "a photo"
for clean images and `synth.plan.WEATHER_TEXT` for the weathers, so the pipeline's text prompts match.
Items are ordered photo-major, then crop, then weather: the four renders of a crop are consecutive and
`clean_index` points each one at its clean render.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

import numpy as np
import skimage.data
import torch
from d4ir.pipelines.demo_data import WEB_HAZE_AIRLIGHT, WEB_HAZE_BETA, cut_crop
from d4ir.pipelines.weather import degrade
from d4ir.shards.progress import progress_bar
from d4ir.synth.plan import WEATHER_TEXT as TASK_TEXT
from d4ir.synth.plan import WEATHERS as PIPELINE_WEATHERS

WEATHERS = ("clean", *PIPELINE_WEATHERS)  # what the embedded model is captioned with: clean photos first
CAPTIONS: dict[str, str] = {"clean": "a photo", **TASK_TEXT}
RAIN_CHOICES = ("light", "heavy")
SNOW_CHOICES = ("light", "medium", "heavy")
MAX_CROP_FRACTION = 0.6
MIN_CROP_STD = 0.05

# Every photo used (training or measurement) and its licence, as stated in its skimage.data docstring.
LICENCES: dict[str, str] = {
    "astronaut": "public domain: NASA Great Images database (US government work, no known copyright restrictions)",
    "coffee": "CC0: photographer Rachel Michetti (courtesy of Pikolo Espresso Bar)",
    "grass": "CC0: DeviantArt user linolafett ('Grass-01'), cropped and converted to gray by scikit-image",
    "gravel": "CC0: CC0Textures 'Gravel04', rescaled, cropped and converted to gray by scikit-image",
    "hubble_deep_field": "public domain: NASA, Hubble eXtreme Deep Field (HubbleSite)",
    "retina": "CC0 1.0: Mikael Haggstrom, Wikimedia Commons 'Fundus photograph of normal left eye'",
    "text": "public domain: Wikipedia 'File:Corner.png', no known copyright restrictions",
    "rocket": "public domain: SpaceX launch photo of DSCOVR, released into the public domain by SpaceX",
    "clock": "public domain: released by the photographer Stefan van der Walt",
    "cell": "CC0: quantitative phase image, Mueller et al. (Guck lab), Optics Express 2018",
    "microaneurysms": "CC0: Andreas Maier, crop of HRF fundus database image 07_dr (green channel)",
    "chelsea": "CC0: photographer Stefan van der Walt",
    "camera": "CC0: photographer Lav Varshney",
    "brick": "CC0: CC0Textures 'Bricks25', perspective-corrected, rotated and cropped by scikit-image",
}
HELD_OUT = ("chelsea", "camera", "brick")  # the demo's test photos: measurement only, never trained on
TRAIN_PHOTOS = tuple(p for p in LICENCES if p not in HELD_OUT)
SPLITS = {"train": TRAIN_PHOTOS, "held_out": HELD_OUT}
SPLIT_IDS = {"train": 0, "held_out": 1}

# The other skimage.data images and why they are not used.
EXCLUDED: dict[str, str] = {
    "coins": "'no known copyright restrictions' (Brooklyn Museum): no licence or dedication is stated",
    "immunohistochemistry": "'no known copyright restrictions' (CMMI): no licence or dedication is stated",
    "moon": "no licence stated",
    "page": "no licence stated",
    "cat": "the same photo as chelsea",
    "horse": "CC0, but a binary silhouette, not a photo",
    "logo": "the scikit-image logo (a trademark), not a photo",
    "colorwheel": "synthetic, not a photo",
    "checkerboard": "synthetic, not a photo",
    "binary_blobs": "synthetic, not a photo",
    "shepp_logan_phantom": "synthetic, not a photo",
    "lfw_subset": "face photos (LFW) with no licence stated",
    "stereo_motorcycle": "Middlebury stereo data with no licence stated",
    "eagle": "CC0, but not in the wheel (needs a download)",
    "skin": "public domain, but not in the wheel (needs a download)",
    "kidney": "CC0 microscopy, not in the wheel (needs a download)",
    "lily": "CC0 microscopy, not in the wheel (needs a download)",
    "human_mitosis": "CC0 microscopy, not in the wheel (needs a download)",
    "brain": "volume data, not in the wheel",
    "cells3d": "volume data, not in the wheel",
    "vortex": "PIV image pair, not in the wheel",
    "nickel_solidification": "image sequence, not in the wheel",
    "protein_transport": "image sequence, not in the wheel",
    "palisades_of_vogt": "image sequence, not in the wheel",
}


@dataclass(frozen=True)
class WeatherSetConfig:
    """What to build.

    Args:
        split: "train" (TRAIN_PHOTOS) or "held_out" (HELD_OUT); the two never share a photo.
        crops_per_photo: crops cut from every photo (each rendered in every weather).
        size: side S of the square crops (a multiple of 8, the VAE's largest factor).
        seed: seed of all crops and renders.
        photos: a subset of the split's photos (default: all of them).
        weathers: which of WEATHERS to render, "clean" first (default all four).
    """

    split: str = "train"
    crops_per_photo: int = 64
    size: int = 64
    seed: int = 0
    photos: tuple[str, ...] | None = None
    weathers: tuple[str, ...] = WEATHERS

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.photos is not None:
            stray = [p for p in self.photos if p not in SPLITS[self.split]]
            if stray or not self.photos:
                raise ValueError(f"photos {stray or '()'} are not in the {self.split!r} split {SPLITS[self.split]}")
        if not isinstance(self.crops_per_photo, int) or self.crops_per_photo < 1:
            raise ValueError(f"crops_per_photo must be a positive int, got {self.crops_per_photo!r}")
        if not isinstance(self.size, int) or self.size < 8 or self.size % 8:
            raise ValueError(f"size must be a positive multiple of 8, got {self.size!r}")
        if not self.weathers or self.weathers[0] != "clean" or any(w not in WEATHERS for w in self.weathers):
            raise ValueError(f"weathers must start with 'clean' and come from {WEATHERS}, got {self.weathers}")

    @property
    def photo_list(self) -> tuple[str, ...]:
        return self.photos if self.photos is not None else SPLITS[self.split]


@dataclass
class WeatherSet:
    """Rendered crops.

    Args:
        images: [N,3,S,S] uint8.
        captions: N captions (CAPTIONS of each item's weather).
        weathers: N weather names ("clean", "derain", "dehaze", "desnow").
        clean_index: [N] int64, the index of each item's clean render (itself for clean items).
        records: N dicts: photo, crop, box [y, x, side], flip, weather and the synthesis options.
    """

    images: torch.Tensor
    captions: list[str]
    weathers: list[str]
    clean_index: torch.Tensor
    records: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def floats(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images [B,3,S,S] float32 in [0,1] (all of them when `index` is None)."""
        x = self.images if index is None else self.images[index]
        return x.float() / 255.0

    def where(self, weather: str) -> torch.Tensor:
        """[M] int64 indices of the items of one weather."""
        return torch.tensor([i for i, w in enumerate(self.weathers) if w == weather], dtype=torch.int64)


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """A licensed sample photo as read-only uint8 [H,W,3] (gray replicated to RGB)."""
    if name not in LICENCES:
        raise ValueError(f"photo {name!r} is not in the licence list {list(LICENCES)}")
    arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    arr.setflags(write=False)
    return arr


def weather_options(weather: str, rng: np.random.Generator) -> dict:
    """Random strength of one render: rain/snow level, haze beta and airlight ({} for clean)."""
    if weather == "derain":
        return {"level": RAIN_CHOICES[int(rng.integers(len(RAIN_CHOICES)))]}
    if weather == "desnow":
        return {"level": SNOW_CHOICES[int(rng.integers(len(SNOW_CHOICES)))]}
    if weather == "dehaze":
        return {"beta": float(rng.uniform(*WEB_HAZE_BETA)), "airlight": float(rng.uniform(*WEB_HAZE_AIRLIGHT))}
    return {}


def render(clean: np.ndarray, weather: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """`clean` [S,S,3] uint8 in `weather` at a random strength: ([S,S,3] uint8, the options used)."""
    if weather == "clean":
        return clean, {}
    opts = weather_options(weather, rng)
    out = degrade(weather, clean.astype(np.float64) / 255.0, rng, **opts)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8), opts


def build_weather_set(config: WeatherSetConfig = WeatherSetConfig(), *, progress: bool = False) -> WeatherSet:
    """Cut and render every crop of `config` (a pure function of it)."""
    split_id = SPLIT_IDS[config.split]
    images, captions, weathers, clean_index, records = [], [], [], [], []
    photos = config.photo_list
    bar = progress_bar(total=len(photos) * config.crops_per_photo, desc=f"weather set ({config.split})",
                       enabled=progress)
    for name in photos:
        photo, pid = load_photo(name), zlib.crc32(name.encode())
        for k in range(config.crops_per_photo):
            crop, box, flip = cut_crop(photo, config.size, np.random.default_rng([config.seed, split_id, pid, k]))
            base = len(images)
            for weather in config.weathers:
                rng = np.random.default_rng([config.seed, split_id, pid, k, WEATHERS.index(weather) + 1])
                img, opts = render(crop, weather, rng)
                images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
                captions.append(CAPTIONS[weather])
                weathers.append(weather)
                clean_index.append(base)  # "clean" comes first (validated by the config)
                records.append({"photo": name, "crop": k, "box": box, "flip": flip, "weather": weather, **opts})
            bar.update()
    bar.close()
    return WeatherSet(torch.stack(images), captions, weathers, torch.tensor(clean_index), records)
