"""Loading the frozen Stable Diffusion that stage 2 samples with (and stage 3 backpropagates through).

`load_sd(spec)` accepts, in this order:

- ``"tiny"``: a Stable-Diffusion-shaped model built from a config with fixed-seed random weights (4 latent
  channels, 8x VAE downsampling, cross-attention width 32). It proves the plumbing offline; its images are
  noise-like.
- ``"sd15-layout"``: the real SD1.5 UNet/VAE layout with random weights, for benchmarks only.
- a diffusers folder (``unet/``, ``vae/``, optional ``scheduler/``, ``text_encoder/``, ``tokenizer/``);
- a single ``.safetensors``/``.ckpt`` file in the original (CompVis) layout; SD1.x files load offline with
  built-in configs, other layouts need ``config=`` (a diffusers folder or cached hub id with the configs);
- a hub id (``org/name``), loaded only from the local Hugging Face cache (``local_files_only=True``).

Whatever the source, the sampler is DDIM (the scheduler config of the source, e.g. SD1.5's PNDM config, is
re-read as a DDIMScheduler, the usual diffusers swap), and every module is in eval mode with
``requires_grad=False``: SD stays frozen, though activations may still carry gradients (stage 3).

The text encoder needs ``transformers``; without it (or for the tiny model) ``text_encoder`` is None and
prompts must be given as embeddings, which is what D4IR does anyway (Eq. (4)-(5)).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import re
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

# SD1.5's DDIM settings (scheduler_config.json of stable-diffusion-v1-5, read as DDIM).
SD15_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

# The real SD1.5 layouts (860M-parameter UNet, 84M-parameter VAE).
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE_CONFIG: dict[str, Any] = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)

# Tiny but SD-shaped: 4 VAE levels (8x downsampling, 4 latent channels), a 3-level UNet with cross-attention
# on the two upper levels, as in SD where the lowest level has none.
TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    SD15_VAE_CONFIG, sample_size=64, block_out_channels=(32, 64, 64, 64), layers_per_block=1
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SDLoadError(FileNotFoundError):
    """The SD spec names nothing loadable; the message says what was tried."""


@dataclass
class SDParts:
    """The frozen SD pieces stage 2 needs.

    Args:
        vae: AutoencoderKL (images [B,3,H,W] in [-1,1] <-> latents [B,4,H/8,W/8]).
        unet: UNet2DConditionModel; its ``encoder_hidden_states`` are the prompt embeddings [B,L,D].
        scheduler: DDIMScheduler (the template; samplers copy it, so it is never mutated by them).
        model_id: "tiny", "sd15-layout", the folder/file path or the hub id.
        fingerprint: sha256 of the UNet/VAE/scheduler configs and a sample of the weights (see `sd_fingerprint`).
        text_encoder: CLIP text model or None.
        tokenizer: CLIP tokenizer or None.
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    model_id: str
    fingerprint: str
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any | None = None

    @property
    def cross_attention_dim(self) -> int:
        """Width D of a prompt token (768 for SD1.x, 1024 for SD2.x, 32 for tiny)."""
        return int(self.unet.config.cross_attention_dim)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP embeddings of `texts`, padded to the tokenizer's length: [B, L, D] in the UNet's dtype."""
        if self.text_encoder is None or self.tokenizer is None:
            why = (
                "the tiny model has no text encoder"
                if self.model_id == "tiny"
                else "it was not found or could not be loaded (it needs the `transformers` package"
                + (", which is not installed)" if importlib.util.find_spec("transformers") is None else ")")
            )
            raise RuntimeError(
                f"SD model '{self.model_id}' has no text encoder: {why}. Pass prompt embeddings [B,L,"
                f"{self.cross_attention_dim}] instead of text."
            )
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_text expects a list of strings")
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        with torch.inference_mode():
            hidden = self.text_encoder(tokens.input_ids.to(device))[0]
        return hidden.to(self.dtype)

    def empty_prompt(self, num_tokens: int | None = None) -> torch.Tensor | None:
        """Embedding of the empty text, [1, L, D] (L = `num_tokens` or the tokenizer's 77); None without a
        text encoder (callers then use zeros, e.g. as the negative prompt of classifier-free guidance)."""
        if self.text_encoder is None or self.tokenizer is None:
            return None
        emb = self.encode_text([""])
        if num_tokens is not None:
            if num_tokens > emb.shape[1]:
                raise ValueError(f"num_tokens={num_tokens} exceeds the text encoder's length {emb.shape[1]}")
            emb = emb[:, :num_tokens]
        return emb


def _freeze(module: torch.nn.Module | None) -> None:
    if module is not None:
        module.eval()
        module.requires_grad_(False)


def _public_config(config: Any) -> dict[str, Any]:
    # Keys starting with "_" hold the load path and library version: not part of the model's identity.
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _weight_sample_digest(h: Any, module: torch.nn.Module, per_tensor: int = 64) -> None:
    """Feed name, shape, dtype and `per_tensor` evenly spaced values of every tensor into hash `h`.

    Exact values at fixed positions make the digest device-independent (no reductions whose order could
    differ between CPU and GPU) and cheap (hundreds of KB for SD1.5 instead of 3.4 GB)."""
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        n = flat.numel()
        k = min(n, per_tensor)
        idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
        values = flat[idx.to(flat.device)].float().cpu().numpy().tobytes()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(values)


def sd_fingerprint(vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler: DDIMScheduler) -> str:
    """sha256 over the UNet, VAE and scheduler configs and a sample of the weights as loaded (dtype
    included: the same model in fp16 and fp32 gives different images, hence different fingerprints)."""
    h = hashlib.sha256()
    configs = {k: _public_config(m.config) for k, m in (("unet", unet), ("vae", vae), ("scheduler", scheduler))}
    h.update(json.dumps(configs, sort_keys=True, default=str).encode())
    _weight_sample_digest(h, unet)
    _weight_sample_digest(h, vae)
    return h.hexdigest()


def _assemble(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    model_id: str,
    text_encoder: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
) -> SDParts:
    for module in (vae, unet, text_encoder):
        _freeze(module)
    return SDParts(
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        model_id=model_id,
        fingerprint=sd_fingerprint(vae, unet, scheduler),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def _place(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # torch.nn.Module.to directly: diffusers' override warns about fp32-only modules on every dtype cast,
    # and SD's UNet/VAE have none.
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def _build_random(
    unet_config: dict, vae_config: dict, seed: int, device: str | torch.device, dtype: torch.dtype
) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    # fork_rng(devices=[]) restores the global CPU RNG afterwards, so building never shifts a caller's
    # random stream; weights are drawn on the CPU so they do not depend on the device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    return _place(vae, device, dtype), _place(unet, device, dtype)


def build_tiny_sd(seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDParts:
    """A tiny Stable-Diffusion-shaped model with fixed-seed random weights (no text encoder).

    Args:
        seed: weight seed; equal seeds give equal weights and fingerprints.
        device: where the modules live.
        dtype: parameter dtype.
    """
    vae, unet = _build_random(TINY_UNET_CONFIG, TINY_VAE_CONFIG, seed, device, dtype)
    return _assemble(vae, unet, DDIMScheduler(**SD15_SCHEDULER_CONFIG), "tiny")


def sd15_modules(
    device: str | torch.device, dtype: torch.dtype, *, seed: int = 0
) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """Random-weight SD1.5 VAE and UNet built directly on `device` ("meta" gives shapes only)."""
    dev = torch.device(device)
    # Initialising on a GPU draws from its RNG: fork that one too, so callers' streams stay untouched.
    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    return _place(vae, device, dtype), _place(unet, device, dtype)


def build_sd15_layout(
    dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu", *, seed: int = 0
) -> SDParts:
    """The SD1.5 UNet and VAE layouts with random weights, for timing the real architecture offline.

    Weights are initialised directly on `device` (fast on a GPU) and are therefore device-dependent; they
    mean nothing, and fp16 activations of a random VAE may overflow, which does not change the timing.

    Args:
        dtype: parameter dtype (fp16/bf16 on a GPU).
        device: where the modules are built.
        seed: weight seed.
    """
    vae, unet = sd15_modules(device, dtype, seed=seed)
    return _assemble(vae, unet, DDIMScheduler(**SD15_SCHEDULER_CONFIG), "sd15-layout")


def save_sd(parts: SDParts, folder: str | Path) -> Path:
    """Write `parts` as a diffusers folder (unet/, vae/, scheduler/, model_index.json) that `load_sd` reads."""
    folder = Path(folder)
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


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


def _load_components(source: str, model_id: str, device: Any, dtype: torch.dtype, local_only: bool) -> SDParts:
    unet = _from_pretrained(UNet2DConditionModel, source, "unet", dtype, local_only)
    vae = _from_pretrained(AutoencoderKL, source, "vae", dtype, local_only)
    scheduler = _scheduler_from(source, local_only)
    text_encoder, tokenizer = _text_parts(source, dtype, local_only)
    if text_encoder is not None:
        text_encoder = text_encoder.to(device)
    return _assemble(vae.to(device), unet.to(device), scheduler, model_id, text_encoder, tokenizer)


def _load_folder(folder: Path, device: Any, dtype: torch.dtype) -> SDParts:
    missing = [f"{sub}/config.json" for sub in ("unet", "vae") if not (folder / sub / "config.json").is_file()]
    if missing:
        raise SDLoadError(
            f"'{folder}' is not a diffusers Stable Diffusion folder: missing {', '.join(missing)} "
            "(expected unet/, vae/ and optionally scheduler/, text_encoder/, tokenizer/)"
        )
    return _load_components(str(folder), str(folder), device, dtype, local_only=True)


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


def _load_single_file(path: Path, device: Any, dtype: torch.dtype, config: str | None) -> SDParts:
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
    return _assemble(vae.to(device), unet.to(device), scheduler, str(path))


def _hub_cache_dir(repo_id: str) -> str:
    from huggingface_hub import constants

    return str(Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")))


def load_sd(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
) -> SDParts:
    """Load a frozen Stable Diffusion; never downloads.

    Args:
        spec: "tiny", "sd15-layout", a diffusers folder, a .safetensors/.ckpt file or a cached hub id.
        device: where the modules go.
        dtype: parameter dtype (float32 on the CPU, float16/bfloat16 on a GPU).
        config: for single files only: a diffusers folder or cached hub id with unet/ and vae/ configs.
    Raises:
        SDLoadError: nothing loadable at `spec`; the message lists what was tried.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SDLoadError(f"SD spec must be a non-empty string, got {spec!r}")
    if spec == "tiny":
        return build_tiny_sd(0, device=device, dtype=dtype)
    if spec == "sd15-layout":
        return build_sd15_layout(dtype, device)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, device, dtype)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
            raise SDLoadError(f"SD file '{path}' is not a .safetensors/.ckpt checkpoint")
        return _load_single_file(path, device, dtype, config)
    tried = [f"folder '{path}': does not exist", f"file '{path}': does not exist"]
    if _HUB_ID.match(spec) and not spec.endswith((".safetensors", ".ckpt")):
        try:
            return _load_components(spec, spec, device, dtype, local_only=True)
        except Exception as exc:
            tried.append(f"hub id '{spec}' in the local cache {_hub_cache_dir(spec)}: {type(exc).__name__}: {exc}")
    else:
        tried.append("hub id: not of the form 'org/name'")
    raise SDLoadError(
        f"SD model '{spec}' not found (nothing is downloaded at run time). Tried: " + "; ".join(tried)
        + ". Give a diffusers folder, a .safetensors file, 'tiny', or download the hub id first."
    )


_TRANSFORMERS_NAMES = (
    "CLIPImageProcessor",
    "CLIPTextModel",
    "CLIPTokenizer",
    "CLIPVisionModelWithProjection",
    "CLIPConfig",
    "CLIPVisionModel",
    "PreTrainedModel",
)
_LOADER_MIXINS = (
    "FromSingleFileMixin",
    "StableDiffusionLoraLoaderMixin",
    "TextualInversionLoaderMixin",
    "IPAdapterMixin",
)


def _img2img_class() -> type:
    """diffusers' StableDiffusionImg2ImgPipeline class, even without `transformers` installed.

    Without transformers diffusers exposes only a placeholder. The pipeline module needs the CLIP class
    names only for type hints and the loader mixins only for LoRA/textual-inversion/IP-adapter loading, so
    we import it with empty stand-ins for those names, then remove them again: the sampling code that
    runs (prepare_latents, get_timesteps, the denoising loop) is diffusers' own.
    """
    name = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"
    if name in sys.modules:
        return sys.modules[name].StableDiffusionImg2ImgPipeline
    if importlib.util.find_spec("transformers") is not None:
        return importlib.import_module(name).StableDiffusionImg2ImgPipeline
    import diffusers.loaders as loaders
    import diffusers.pipelines.pipeline_utils  # noqa: F401  (availability flags are computed before the stub)

    stub = types.ModuleType("transformers")
    stub.__spec__ = importlib.machinery.ModuleSpec("transformers", None)
    for attr in _TRANSFORMERS_NAMES:
        setattr(stub, attr, type(attr, (), {}))
    added = [m for m in _LOADER_MIXINS if m not in vars(loaders)]
    sys.modules["transformers"] = stub
    for mixin in added:
        setattr(loaders, mixin, type(mixin, (), {}))
    try:
        return importlib.import_module(name).StableDiffusionImg2ImgPipeline
    finally:
        del sys.modules["transformers"]
        for mixin in added:
            delattr(loaders, mixin)


def diffusers_img2img(parts: SDParts) -> Any:
    """diffusers' StableDiffusionImg2ImgPipeline over `parts` (DDIM, no safety checker): the reference
    that tests compare `ccd_sample` against and the per-image baseline that bench/synth.py times."""
    cls = _img2img_class()
    pipe = cls(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
