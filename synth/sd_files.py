"""Loading a frozen Stable Diffusion from disk: a diffusers folder, a single CompVis checkpoint file, or a
hub id in the local Hugging Face cache. Nothing is ever downloaded (``local_files_only=True``).

- folder: unet/, vae/, optional scheduler/; text_encoder/ + tokenizer/ when the model has a text encoder (a
  folder without text_encoder/ loads as "no text encoder", one whose text encoder fails to load is an error);
- hub id: the cache's snapshot of refs/main (models--org--name/snapshots/<hash>/), loaded as a folder;
- single file: the CompVis keys (``model.diffusion_model.*``, ``first_stage_model.*`` and the text encoder,
  SD1.x's HF-CLIP ``cond_stage_model.transformer.*`` or SD2.x's OpenCLIP ``cond_stage_model.model.*``) are
  converted by diffusers' own single-file loaders, with the configs (and the tokenizer) of a diffusers folder
  or cached hub id.

Whatever the source, the sampler is DDIM: the source's scheduler config (e.g. SD1.5's PNDM config) is re-read
as a DDIMScheduler, the usual diffusers swap.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from d4ir.shards.errors import brief
from d4ir.shards.state import load_plain
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .sd_configs import SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from .sd_parts import SDLoadError, SDParts, assemble


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers 5 draws a "Loading weights" bar for every text encoder it loads: one stderr line too many
    for a stage whose own output is a few lines (and for one-line errors)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls: Any, folder: Path, subfolder: str, dtype: torch.dtype) -> Any:
    # Some repositories ship only the fp16 variant of the weights; try the plain files first. diffusers takes
    # the dtype as torch_dtype, transformers 5 as dtype.
    kwargs: dict[str, Any] = {"subfolder": subfolder, "local_files_only": True}
    if cls.__module__.startswith("transformers"):
        kwargs["dtype"] = dtype
    else:  # without accelerate, diffusers warns on every load unless told not to try low_cpu_mem_usage
        kwargs.update(torch_dtype=dtype, low_cpu_mem_usage=False)
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as plain_error:
        try:
            return cls.from_pretrained(str(folder), **kwargs, variant="fp16")
        except (OSError, ValueError):
            raise plain_error from None


def _scheduler_from(folder: Path | None) -> DDIMScheduler:
    if folder is not None:
        try:
            return DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
        except (OSError, ValueError):
            warnings.warn(f"no scheduler config in '{folder}': using SD1.5's DDIM settings", stacklevel=3)
    return DDIMScheduler(**SD15_SCHEDULER_CONFIG)


def _has_text_files(folder: Path) -> bool:
    """A diffusers folder describes a text encoder: text_encoder/config.json (tokenizer/ is then required)."""
    return (folder / "text_encoder" / "config.json").is_file()


def _tokenizer_from(folder: Path, what: str) -> Any:
    from .text_encoder import load_tokenizer

    if not (folder / "tokenizer").is_dir():
        raise SDLoadError(f"{what}: '{folder}' has text_encoder/ but no tokenizer/ (a CLIP text encoder needs both)")
    return load_tokenizer(folder / "tokenizer")


def _folder_text_parts(folder: Path, dtype: torch.dtype, what: str) -> tuple[Any, Any]:
    """CLIP text encoder and tokenizer of a diffusers folder; (None, None) when it has no text_encoder/ (prompts
    then come as embeddings); an SDLoadError when they exist but do not load."""
    if not _has_text_files(folder):
        return None, None
    from transformers import CLIPTextModel

    try:
        tokenizer = _tokenizer_from(folder, what)
        with _no_progress_bars():
            return _from_pretrained(CLIPTextModel, folder, "text_encoder", dtype), tokenizer
    except SDLoadError:
        raise
    except Exception as exc:
        raise SDLoadError(f"{what}: the text encoder in '{folder}' (text_encoder/, tokenizer/) does not load: "
                          f"{type(exc).__name__}: {exc}") from exc


def load_folder(folder: Path, device: Any, dtype: torch.dtype, model_id: str | None = None) -> SDParts:
    """A diffusers folder (or a hub cache snapshot, then named by `model_id`): unet/, vae/ and optionally
    scheduler/, text_encoder/ + tokenizer/."""
    missing = [f"{sub}/config.json" for sub in ("unet", "vae") if not (folder / sub / "config.json").is_file()]
    if missing:
        raise SDLoadError(
            f"'{folder}' is not a diffusers Stable Diffusion folder: missing {', '.join(missing)} "
            "(expected unet/, vae/ and optionally scheduler/, text_encoder/, tokenizer/)"
        )
    model_id = model_id or str(folder)
    # float32 first: `assemble` fingerprints the weights, then casts them to `dtype`
    unet = _from_pretrained(UNet2DConditionModel, folder, "unet", torch.float32)
    vae = _from_pretrained(AutoencoderKL, folder, "vae", torch.float32)
    text_encoder, tokenizer = _folder_text_parts(folder, torch.float32, f"SD '{model_id}'")
    if text_encoder is not None:
        text_encoder = text_encoder.to(device)
    return assemble(vae.to(device), unet.to(device), _scheduler_from(folder), model_id, text_encoder, tokenizer,
                    dtype=dtype)


def hub_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot folder of `repo_id` (refs/main); never downloads."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_files_only=True))


def config_folder(config: str) -> Path:
    """The folder holding a single file's configs: `config` itself, or the cache snapshot of a hub id."""
    path = Path(config).expanduser()
    if path.is_dir():
        return path
    try:
        return hub_snapshot(config)
    except Exception as exc:
        raise SDLoadError(f"SD config '{config}' is neither a folder nor a hub id in the local cache "
                          f"{hub_cache_dir(config)} ({type(exc).__name__}: {exc})") from exc


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_plain(path)
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


def _single_file_text(
    state: dict[str, torch.Tensor], path: Path, folder: Path | None, dtype: torch.dtype
) -> tuple[Any, Any]:
    """The CLIP text encoder a CompVis file holds (SD1.x `cond_stage_model.transformer.*`, SD2.x OpenCLIP
    `cond_stage_model.model.*`), converted by diffusers, with config and tokenizer from `folder`; for a file
    with only the UNet and VAE, the text encoder of `folder` itself (with a warning), so that the same weights
    give the same model and fingerprint as the folder."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        is_clip_model,
        is_open_clip_model,
    )

    if not (is_clip_model(state) or is_open_clip_model(state)):
        if folder is None or not _has_text_files(folder):
            return None, None
        warnings.warn(f"SD file '{path}' holds no text encoder: the text encoder and tokenizer come from its configs "
                      f"'{folder}' (text_encoder/, tokenizer/)", stacklevel=4)
        return _folder_text_parts(folder, dtype, f"SD file '{path}'")
    if folder is None:
        warnings.warn(f"SD file '{path}' holds a text encoder, but its config and tokenizer are not in the file: "
                      "give config= (--sd-config) a diffusers folder or cached hub id of the same SD version to "
                      "load it; text prompts and the empty-text base prompt are unavailable", stacklevel=4)
        return None, None
    what = f"SD file '{path}'"
    if not _has_text_files(folder):
        raise SDLoadError(f"{what} holds a text encoder, but its configs '{folder}' have no text_encoder/ and "
                          "tokenizer/ to load it with")
    from transformers import CLIPTextModel

    tokenizer = _tokenizer_from(folder, what)
    try:
        with _no_progress_bars():
            encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint=state, subfolder="text_encoder",
                                                           config=str(folder), torch_dtype=dtype,
                                                           local_files_only=True)
    except Exception as exc:
        raise SDLoadError(f"{what}: its text encoder does not load with the config in '{folder}/text_encoder': "
                          f"{type(exc).__name__}: {exc}") from exc
    return encoder, tokenizer


def load_single_file(path: Path, device: Any, dtype: torch.dtype, config: str | None) -> SDParts:
    """A CompVis single file; its configs from `config` (a diffusers folder or cached hub id), or for an SD1.x
    file without one the built-in SD1.5 UNet/VAE configs (its text encoder is then not loaded, with a warning)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state = _read_checkpoint(path)
    kind = infer_diffusers_model_type(state)
    folder = None if config is None else config_folder(config)
    with tempfile.TemporaryDirectory() as tmp:
        source = folder
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
            source = Path(tmp)
        try:
            unet = UNet2DConditionModel.from_single_file(  # float32 first, see load_folder
                state, config=str(source), subfolder="unet", torch_dtype=torch.float32, local_files_only=True
            )
            vae = AutoencoderKL.from_single_file(
                state, config=str(source), subfolder="vae", torch_dtype=torch.float32, local_files_only=True
            )
        except Exception as exc:
            raise SDLoadError(
                f"cannot load single-file SD checkpoint '{path}' (detected type '{kind}') with configs from "
                f"'{config or 'built-in SD1.5'}': {brief(str(exc))}. Pass config=<diffusers folder> matching the file."
            ) from exc
    text_encoder, tokenizer = _single_file_text(state, path, folder, torch.float32)
    if text_encoder is not None:
        text_encoder = text_encoder.to(device)
    return assemble(vae.to(device), unet.to(device), _scheduler_from(folder), str(path), text_encoder, tokenizer,
                    dtype=dtype)


def hub_cache_dir(repo_id: str) -> str:
    from huggingface_hub import constants

    return str(Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")))
