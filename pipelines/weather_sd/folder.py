"""Writing the weather LDM as a diffusers folder that `synth.sd.load_sd(folder)` reads, with its model card.

    FOLDER/vae/{config.json, diffusion_pytorch_model.safetensors}
    FOLDER/unet/{config.json, diffusion_pytorch_model.safetensors}
    FOLDER/scheduler/scheduler_config.json          (DDIM, SD1.5's settings)
    FOLDER/text_encoder/, FOLDER/tokenizer/          when a text encoder with `.model` / `.tokenizer` is given
    FOLDER/model_index.json                          diffusers' StableDiffusionPipeline index
    FOLDER/README.md                                 model card: photos and licences, recipe, measurements
    FOLDER/training.json                             the same measurements, machine-readable

Weights are stored as safetensors in `dtype` (float16 by default: half the size; loading with any dtype
casts back). The folder is written under a temporary name and renamed, so a crash never leaves half a model.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from d4ir.pipelines.weather_sd.data import CAPTIONS, EXCLUDED, HELD_OUT, LICENCES, TRAIN_PHOTOS
from d4ir.synth.sd import write_model_index
from d4ir.synth.text_encoder import save_tokenizer
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel


def _save_module(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    clone = torch.nn.Module.to(copy.deepcopy(module), dtype=dtype)
    clone.save_pretrained(path)  # safetensors: the default of diffusers and transformers


def save_weather_sd(
    folder: str | Path,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    sched: DDIMScheduler,
    text_encoder: Any | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    info: dict | None = None,
) -> Path:
    """Write the model (replacing an existing FOLDER) and return FOLDER.

    Args:
        folder: output folder.
        vae, unet, sched: the trained parts (vae.config.scaling_factor already set).
        text_encoder: optional; its `.model` (a transformers model) goes to text_encoder/ and its `.tokenizer`
            (anything with save_pretrained) to tokenizer/.
        dtype: weight dtype on disk.
        info: training settings and measurements for the model card and training.json.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_module(vae, tmp / "vae", dtype)
    _save_module(unet, tmp / "unet", dtype)
    sched.save_pretrained(tmp / "scheduler")
    text_parts: dict[str, list[str]] = {}
    for sub in ("model", "tokenizer"):
        part = getattr(text_encoder, sub, None) if text_encoder is not None else None
        if part is None or not hasattr(part, "save_pretrained"):
            continue
        name = "text_encoder" if sub == "model" else "tokenizer"
        if isinstance(part, torch.nn.Module):
            _save_module(part, tmp / name, dtype)
        elif hasattr(part, "backend_tokenizer"):  # a CLIPTokenizer: vocab.json + merges.txt, as SD ships it
            save_tokenizer(part, tmp / name)
        else:
            part.save_pretrained(tmp / name)
        library = type(part).__module__.split(".")[0]
        if library == "transformers":  # a stand-in tokenizer is not listed: pipelines could not build it
            text_parts[name] = [library, type(part).__name__]
    write_model_index(tmp, text_parts)
    write_card(tmp, {**(info or {}), "size_mb": round(weights_mb(tmp), 3)})
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def write_card(folder: str | Path, info: dict) -> None:
    """(Re)write FOLDER/training.json and FOLDER/README.md from `info`."""
    folder = Path(folder)
    (folder / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")
    (folder / "README.md").write_text(model_card(info))


def weights_mb(folder: str | Path) -> float:
    """Total size of the safetensors files under `folder`, in MB (1e6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / 1e6


def _section(title: str, body: str | list[str] | None) -> str:
    if not body:
        return ""
    text = "\n".join(f"- {b}" for b in body) if isinstance(body, list) else body
    return f"## {title}\n\n{text.strip()}\n\n"


def model_card(info: dict) -> str:
    """The README.md of the folder: what the model is, its photos and their licences, how it was trained, and,
    when `info` has them, the sections "command" (the training command), "quality" (markdown of the
    measurements), "can" / "cannot" (lists) and "use" (how to load it)."""
    rows = "\n".join(
        f"| {p} | {'held out (measurement only)' if p in HELD_OUT else 'training'} | {lic} |"
        for p, lic in LICENCES.items()
    )
    excluded = "\n".join(f"- {p}: {why}" for p, why in EXCLUDED.items())
    captions = "\n".join(f"- {w}: \"{c}\"" for w, c in CAPTIONS.items())
    settings = {k: v for k, v in info.items() if k not in ("command", "quality", "can", "cannot", "use")}
    command = f"```\n{info['command']}\n```" if info.get("command") else None
    sections = "".join(_section(title, body) for title, body in (
        ("Use", info.get("use")), ("Training command", command), ("Measured quality", info.get("quality")),
        ("What it can do", info.get("can")), ("What it cannot do", info.get("cannot"))))
    return f"""# Weather LDM (D4IR embedded latent diffusion model)

A small Stable-Diffusion-shaped latent diffusion model (AutoencoderKL + UNet2DConditionModel with
cross-attention, DDIM, a CLIP text encoder and tokenizer) trained from scratch on 64x64 crops of
redistributable scikit-image sample photos, each clean and with the physical rain, haze and snow of
`pipelines/weather.py`. Made by `bench/train_weather_sd.py` (`pipelines/weather_sd/`). Load it with
`synth.sd.load_sd(<this folder>)`.

{sections}## Training photos and their licences

Every photo ships inside the scikit-image wheel; licences as stated in the `skimage.data` docstrings.
Training photos: {", ".join(TRAIN_PHOTOS)}. Held out: {", ".join(HELD_OUT)}.

| photo | use | licence |
|---|---|---|
{rows}

Not used:

{excluded}

## Captions

{captions}

Captions are dropped to "" with the probability in the settings below, so "" is the unconditional model.

## Settings and measurements

```json
{json.dumps(settings, indent=1, sort_keys=True, default=str)}
```
"""
