"""Loading a frozen Stable Diffusion from disk: a diffusers folder, a single CompVis checkpoint file, or a
hub id in the local Hugging Face cache. Nothing is ever downloaded (``local_files_only=True``).

Whatever the source, the sampler is DDIM: the source's scheduler config (e.g. SD1.5's PNDM config) is re-read
as a DDIMScheduler, the usual diffusers swap.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .sd_configs import SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from .sd_parts import SDLoadError, SDParts, assemble


def _from_pretrained(cls: Any, source: str, subfolder: str, dtype: torch.dtype, local_only: bool) -> Any:
    # Some repositories ship only the fp16 variant of the weights; try the plain files first.
    try:
        return cls.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as plain_error:
        try:
            return cls.from_pretrained(
                source, subfolder=subfolder, torch_dtype=dtype, local_files_only=local_only, variant="fp16"
            )
        except (OSError, ValueError):
            raise plain_error from None


def _scheduler_from(source: str | None, local_only: bool) -> DDIMScheduler:
    if source is not None:
        try:
            return DDIMScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=local_only)
        except (OSError, ValueError):
            warnings.warn(f"no scheduler config in '{source}': using SD1.5's DDIM settings", stacklevel=3)
    return DDIMScheduler(**SD15_SCHEDULER_CONFIG)


def _text_parts(source: str, dtype: torch.dtype, local_only: bool) -> tuple[Any, Any]:
    """CLIP text encoder and tokenizer, or (None, None) when transformers or the files are missing."""
    if importlib.util.find_spec("transformers") is None:
        return None, None
    try:
        from transformers import CLIPTextModel, CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only)
        enc = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", torch_dtype=dtype, local_files_only=local_only
        )
        return enc, tok
    except Exception as exc:  # a missing text encoder is allowed: prompts come as embeddings
        warnings.warn(f"SD '{source}': text encoder not loaded ({exc}); text prompts unavailable", stacklevel=3)
        return None, None


def load_components(source: str, model_id: str, device: Any, dtype: torch.dtype, local_only: bool) -> SDParts:
    unet = _from_pretrained(UNet2DConditionModel, source, "unet", dtype, local_only)
    vae = _from_pretrained(AutoencoderKL, source, "vae", dtype, local_only)
    scheduler = _scheduler_from(source, local_only)
    text_encoder, tokenizer = _text_parts(source, dtype, local_only)
    if text_encoder is not None:
        text_encoder = text_encoder.to(device)
    return assemble(vae.to(device), unet.to(device), scheduler, model_id, text_encoder, tokenizer)


def load_folder(folder: Path, device: Any, dtype: torch.dtype) -> SDParts:
    missing = [f"{sub}/config.json" for sub in ("unet", "vae") if not (folder / sub / "config.json").is_file()]
    if missing:
        raise SDLoadError(
            f"'{folder}' is not a diffusers Stable Diffusion folder: missing {', '.join(missing)} "
            "(expected unet/, vae/ and optionally scheduler/, text_encoder/, tokenizer/)"
        )
    return load_components(str(folder), str(folder), device, dtype, local_only=True)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        hint = " (.ckpt files are read with weights_only=True; convert pickled ones to .safetensors)"
        raise SDLoadError(
            f"cannot read SD checkpoint file '{path}': {exc}" + (hint if path.suffix != ".safetensors" else "")
        ) from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise SDLoadError(f"SD checkpoint file '{path}' holds no state dict")
    return state


def load_single_file(path: Path, device: Any, dtype: torch.dtype, config: str | None) -> SDParts:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state = _read_checkpoint(path)
    kind = infer_diffusers_model_type(state)
    with tempfile.TemporaryDirectory() as tmp:
        source = config
        if source is None:
            if kind != "v1":
                raise SDLoadError(
                    f"'{path}' looks like a '{kind}' checkpoint; only SD1.x single files load without a config. "
                    "Pass config=<diffusers folder or cached hub id holding unet/ and vae/ configs>."
                )
            # Built-in SD1.5 configs make SD1.x single files load offline.
            for sub, cfg in (("unet", SD15_UNET_CONFIG), ("vae", SD15_VAE_CONFIG)):
                (Path(tmp) / sub).mkdir()
                (Path(tmp) / sub / "config.json").write_text(json.dumps(cfg))
            source = tmp
        try:
            unet = UNet2DConditionModel.from_single_file(
                state, config=source, subfolder="unet", torch_dtype=dtype, local_files_only=True
            )
            vae = AutoencoderKL.from_single_file(
                state, config=source, subfolder="vae", torch_dtype=dtype, local_files_only=True
            )
        except Exception as exc:
            raise SDLoadError(
                f"cannot load single-file SD checkpoint '{path}' (detected type '{kind}') with configs from "
                f"'{config or 'built-in SD1.5'}': {exc}. Pass config=<diffusers folder> matching the file."
            ) from exc
    scheduler = _scheduler_from(config, local_only=True)
    return assemble(vae.to(device), unet.to(device), scheduler, str(path))


def hub_cache_dir(repo_id: str) -> str:
    from huggingface_hub import constants

    return str(Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")))
