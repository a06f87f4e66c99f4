"""`load_sd(spec)`: the one way every stage gets its frozen Stable Diffusion.

A spec is, in this order:

- ``"tiny"``: a Stable-Diffusion-shaped model built from a config with fixed-seed random weights (4 latent
  channels, 8x VAE downsampling, cross-attention width 32) and a tiny CLIP text encoder and tokenizer
  (synth/text_encoder.py). It proves the plumbing offline; its images are noise-like. For unit tests.
- ``"weather"``: the small weather latent diffusion model trained by this project on redistributable photos and
  shipped inside the package (`WEATHER_DIR`, its model card README.md there): 4x VAE, 64x64 images, a frozen
  CLIP text encoder (D = 64) that knows "a photo" and the three weather captions. The demo's and the CPU
  benchmarks' default; loaded offline like any diffusers folder, named "weather".
- ``"sd15-layout"``: the real SD1.5 UNet/VAE layout with random weights, for benchmarks only.
- a diffusers folder (``unet/``, ``vae/``, optional ``scheduler/``, ``text_encoder/`` + ``tokenizer/``);
- a single ``.safetensors``/``.ckpt`` file in the original (CompVis) layout, UNet, VAE and text encoder
  (SD1.x HF-CLIP or SD2.x OpenCLIP keys) converted by diffusers with the configs and tokenizer of ``config=``
  (a diffusers folder or cached hub id). SD1.x files also load without it, from built-in UNet/VAE configs,
  but then without their text encoder (a warning says so);
- a hub id (``org/name``), loaded only from the local Hugging Face cache (its refs/main snapshot).

`load_sd_cached` keeps one loaded model per process: a dask worker or a training run loads it once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from .sd_configs import SD15_SCHEDULER_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, random_modules, sd15_modules
from .sd_files import hub_cache_dir, hub_snapshot, load_folder, load_single_file
from .sd_parts import SDLoadError, SDParts, assemble
from .text_encoder import save_tokenizer, tiny_text_parts

__all__ = ["SDLoadError", "SDParts", "SDSource", "build_tiny_sd", "default_device", "default_dtype", "load_sd",
           "load_sd_cached", "save_sd"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = ("float32", "float16", "bfloat16")
BUILTIN = ("tiny", "weather", "sd15-layout")
WEATHER_DIR = Path(__file__).resolve().parent / "weights" / "weather-ldm"


def _local(value: str) -> str:
    """An existing local path as an absolute, normalised string (no trailing slash); anything else as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


@dataclass(frozen=True)
class SDSource:
    """Where the frozen SD comes from, as a user names it (the loaded model is `SDParts`; its identity is
    `SDParts.fingerprint`, not this name).

    Args:
        spec: tiny, weather, sd15-layout, a diffusers folder, a single .safetensors/.ckpt file, or a hub id in the local
            cache. Local paths are kept absolute, so a later stage run from another folder names the same model.
        config: for a single file only: a diffusers folder or cached hub id holding the configs that describe it.
    """

    spec: str
    config: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.spec, Path):
            object.__setattr__(self, "spec", str(self.spec))
        if isinstance(self.config, Path):
            object.__setattr__(self, "config", str(self.config))
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise SDLoadError(f"SD spec must be a non-empty string, got {self.spec!r}")
        object.__setattr__(self, "spec", self.spec if self.spec in BUILTIN else _local(self.spec.strip()))
        if self.config is not None:
            object.__setattr__(self, "config", _local(self.config))

    @classmethod
    def of(cls, value: SDSource | str | Path) -> SDSource:
        return value if isinstance(value, SDSource) else cls(value)

    def __str__(self) -> str:
        return self.spec if self.config is None else f"{self.spec} (configs from {self.config})"


def default_device(device: str | None = None) -> str:
    """The device a stage runs on when none is asked for: `device` itself, else cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str | torch.device) -> str:
    """The SD weights' dtype when none is asked for: float16 on a GPU, float32 on the CPU."""
    return "float16" if torch.device(device).type == "cuda" else "float32"


def build_tiny_sd(seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDParts:
    """A tiny Stable-Diffusion-shaped model with fixed-seed random weights, text encoder and tokenizer included
    (D = 32, 77 tokens; see synth/text_encoder.py).

    Args:
        seed: weight seed; equal seeds give equal weights and fingerprints.
        device: where the modules live.
        dtype: parameter dtype.
    """
    vae, unet = random_modules(TINY_UNET_CONFIG, TINY_VAE_CONFIG, seed, device, torch.float32)
    text_encoder, tokenizer = tiny_text_parts(seed, device=device, dtype=torch.float32)
    return assemble(vae, unet, DDIMScheduler(**SD15_SCHEDULER_CONFIG), "tiny", text_encoder, tokenizer, dtype=dtype)


def build_sd15_layout(
    dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu", *, seed: int = 0
) -> SDParts:
    """The SD1.5 UNet and VAE layouts with random weights, for timing the real architecture offline.

    Args:
        dtype: parameter dtype (fp16/bf16 on a GPU; fp16 activations of a random VAE may overflow, which does
            not change the timing).
        device: where the modules are built.
        seed: weight seed.
    """
    vae, unet = sd15_modules(device, torch.float32, seed=seed)
    return assemble(vae, unet, DDIMScheduler(**SD15_SCHEDULER_CONFIG), "sd15-layout", dtype=dtype)


def write_model_index(folder: Path, text_parts: dict[str, list[str]] | None = None) -> Path:
    """FOLDER/model_index.json, diffusers' StableDiffusionPipeline index of a saved SD: the UNet, VAE and DDIM
    scheduler, no safety checker, plus `text_parts` ({"text_encoder": ["transformers", "CLIPTextModel"], ...})."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        **(text_parts or {}),
    }
    path = Path(folder) / "model_index.json"
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def save_sd(parts: SDParts, folder: str | Path) -> Path:
    """Write `parts` as a diffusers folder that `load_sd` reads: unet/, vae/, scheduler/, text_encoder/ and
    tokenizer/ (vocab.json + merges.txt, as SD repositories ship it) when there is a text encoder, and
    model_index.json."""
    folder = Path(folder)
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.scheduler.save_pretrained(folder / "scheduler")
    text_parts = {}
    if parts.text_encoder is not None and parts.tokenizer is not None:
        parts.text_encoder.save_pretrained(folder / "text_encoder")
        save_tokenizer(parts.tokenizer, folder / "tokenizer")
        text_parts = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    write_model_index(folder, text_parts)
    return folder


def load_sd(
    source: SDSource | str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SDParts:
    """Load a frozen Stable Diffusion; never downloads.

    Args:
        source: an `SDSource` (or its spec string): tiny, weather, sd15-layout, a diffusers folder, a .safetensors/.ckpt
            file (with the configs that describe it) or a cached hub id.
        device: where the modules go.
        dtype: parameter dtype (float32 on the CPU, float16/bfloat16 on a GPU).
    Raises:
        SDLoadError: nothing loadable at `source`; the message lists what was tried.
    """
    source = SDSource.of(source)
    spec, config = source.spec, source.config
    if spec == "tiny":
        return build_tiny_sd(0, device=device, dtype=dtype)
    if spec == "sd15-layout":
        return build_sd15_layout(dtype, device)
    if spec == "weather":
        if not (WEATHER_DIR / "unet" / "config.json").is_file():
            raise SDLoadError(f"the shipped weather model is missing from {WEATHER_DIR} (a broken install?)")
        return load_folder(WEATHER_DIR, device, dtype, model_id="weather")
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_folder(path, device, dtype)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
            raise SDLoadError(f"SD file '{path}' is not a .safetensors/.ckpt checkpoint")
        return load_single_file(path, device, dtype, config)
    tried = [f"folder '{path}': does not exist", f"file '{path}': does not exist"]
    if _HUB_ID.match(spec) and not spec.endswith((".safetensors", ".ckpt")):
        try:
            snapshot = hub_snapshot(spec)
        except Exception as exc:
            tried.append(f"hub id '{spec}' in the local cache {hub_cache_dir(spec)}: {type(exc).__name__}: {exc}")
        else:
            return load_folder(snapshot, device, dtype, model_id=spec)
    else:
        tried.append("hub id: not of the form 'org/name'")
    raise SDLoadError(
        f"SD model '{spec}' not found (nothing is downloaded at run time). Tried: " + "; ".join(tried)
        + ". Give a diffusers folder, a .safetensors file, 'tiny', 'weather', or download the hub id first."
    )


_CACHE: dict[tuple, SDParts] = {}


def load_sd_cached(source: SDSource | str, device: str, dtype: str) -> SDParts:
    """`load_sd` once per process and (source, device, dtype); a new key frees the previous model first."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    key = (SDSource.of(source), str(device), dtype)
    if key not in _CACHE:
        _CACHE.clear()  # one model per process: free the previous one first
        _CACHE[key] = load_sd(key[0], device=device, dtype=getattr(torch, dtype))
    return _CACHE[key]
