"""The frozen Stable Diffusion as stage 2 samples with it (and stage 3 backpropagates through it).

`SDParts` holds the VAE, the UNet, the DDIM scheduler and, when the model has one, the CLIP text encoder and
its tokenizer, all frozen (eval mode, ``requires_grad=False``; activations may still carry gradients, which
stage 3's feedback surrogate relies on). Its `fingerprint` identifies the model by content, not by path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from d4ir.shards.errors import StageFailedError
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel


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
        fingerprint: sha256 of the UNet/VAE/scheduler (and text encoder) configs and a sample of the weights (see
            `sd_fingerprint`).
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
            raise StageFailedError(
                f"SD model '{self.model_id}' has no text encoder loaded (a folder without text_encoder/, or a single "
                f"file loaded without --sd-config). Pass prompt embeddings [B,L,{self.cross_attention_dim}] instead "
                "of text."
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


def freeze(module: torch.nn.Module | None) -> None:
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


# The CLIPTextConfig fields that decide the text encoder's output (its config also holds bookkeeping such as
# "architectures" and "transformers_version", which differ between a built and a loaded model).
TEXT_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                      "pad_token_id")


def text_identity(text_encoder: torch.nn.Module, tokenizer: Any | None) -> dict[str, Any]:
    """What decides `encode_text`: the text model's class and config fields, and the tokenizer's BPE model
    (vocabulary and merges), length and padding token."""
    cfg = text_encoder.config
    ident: dict[str, Any] = {"class": type(text_encoder).__name__}
    ident |= {k: getattr(cfg, k, None) for k in TEXT_CONFIG_FIELDS}
    if tokenizer is not None:
        model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        bpe = json.dumps({"vocab": model.get("vocab"), "merges": model.get("merges")}, sort_keys=True)
        ident["tokenizer"] = {"bpe_sha256": hashlib.sha256(bpe.encode()).hexdigest(),
                              "model_max_length": int(tokenizer.model_max_length),
                              "pad_token": str(tokenizer.pad_token)}
    return ident


def sd_fingerprint(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    text_encoder: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
) -> str:
    """sha256 over the UNet, VAE and scheduler configs and a sample of the weights (as `assemble` sees them: in
    float32, whatever dtype the run then uses); when there is a text encoder, also over `text_identity` and a
    sample of its weights."""
    h = hashlib.sha256()
    configs = {k: _public_config(m.config) for k, m in (("unet", unet), ("vae", vae), ("scheduler", scheduler))}
    if text_encoder is not None:
        configs["text_encoder"] = text_identity(text_encoder, tokenizer)
    h.update(json.dumps(configs, sort_keys=True, default=str).encode())
    _weight_sample_digest(h, unet)
    _weight_sample_digest(h, vae)
    if text_encoder is not None:
        _weight_sample_digest(h, text_encoder)
    return h.hexdigest()


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast to `dtype`, keeping float32 the submodules the library marks so (`_keep_in_fp32_modules` of
    diffusers and transformers models), as from_pretrained(torch_dtype=...) does. torch's own `to`: diffusers'
    override warns on any dtype cast, even with nothing to keep."""
    if dtype == torch.float32:
        return
    torch.nn.Module.to(module, dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, sub in module.named_modules():
        if any(k in name.split(".") for k in keep):
            sub.float()


def assemble(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    model_id: str,
    text_encoder: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> SDParts:
    """SDParts of modules loaded or built in float32: fingerprinted as they are, then frozen and cast to `dtype`.

    Loaders hand over float32 modules (float16 weights upcast exactly), so the fingerprint names the weights, not
    the dtype a run computes in: prompts made with the SD in float32 on a CPU serve a float16 synthesis on a GPU.
    The run's dtype is recorded beside the fingerprint in each round's manifest."""
    modules = [m for m in (vae, unet, text_encoder) if m is not None]
    wrong = sorted({str(p.dtype) for m in modules for p in m.parameters() if p.dtype != torch.float32})
    if wrong:
        raise ValueError(f"assemble: load the SD in float32 and pass dtype= (got parameters in {wrong})")
    fingerprint = sd_fingerprint(vae, unet, scheduler, text_encoder, tokenizer)
    for module in modules:
        freeze(module)
        _cast(module, dtype)
    return SDParts(vae=vae, unet=unet, scheduler=scheduler, model_id=model_id, fingerprint=fingerprint,
                   text_encoder=text_encoder, tokenizer=tokenizer)
