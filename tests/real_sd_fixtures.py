"""Stable Diffusion 1.5 and 2.1 as users have them, at narrow widths, for tests/test_real_sd.py.

Each layout is the released hub configs (unet/, vae/, scheduler/, text_encoder/, tokenizer/) with only the
widths narrowed: the block structure, cross_attention_dim (768 / 1024), SD2's head layout (attention_head_dim
[5, 10, 20, 20], channels divisible by it), use_linear_projection, upcast_attention, the v-prediction DDIM
scheduler and the CLIP text encoder width (768 / 1024) are kept. Weights are random (fixed seeds); the
tokenizer is the tiny BPE of synth/text_encoder.py in CLIP's files (the real 49408-token vocabulary cannot be
downloaded here). Three ways of having the model on disk:

(a) a diffusers folder as the hub ships it (hub-style config.json files; the text encoder's weights under
    transformers 4's `text_model.` key prefix, as in the SD repositories);
(b) one CompVis .safetensors file: `to_compvis` is the inverse of the key conversion diffusers' single-file
    loaders apply (model.diffusion_model.*, first_stage_model.*, and cond_stage_model.transformer.* for SD1.x's
    HF-CLIP or cond_stage_model.model.* for SD2.x's OpenCLIP, whose q/k/v are one in_proj);
(c) a hub-cache snapshot: HF_HOME/hub/models--org--name/{blobs, snapshots/<commit>, refs/main}.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from d4ir.synth.text_encoder import EOS, load_tokenizer, text_model, tiny_tokenizer_folder
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# The hub configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1; "narrow" lists
# what is changed (widths only).
LAYOUTS: dict[str, dict] = {
    "sd15": {
        "unet": {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
                 "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
                 "cross_attention_dim": 768, "down_block_types": _DOWN, "downsample_padding": 1,
                 "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
                 "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
                 "sample_size": 64, "up_block_types": _UP},
        "vae": {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
                "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4},
        "scheduler": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **_BETAS,
                      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                      "clip_sample": False},
        "text_encoder": {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
                         "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
                         "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
                         "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
                         "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
                         "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408},
        "pad_token": EOS,
        "narrow": {"unet": {"block_out_channels": [32, 64, 128, 128]},
                   "vae": {"block_out_channels": [32, 64, 64, 64]},
                   "text_encoder": {"num_hidden_layers": 2}},
    },
    "sd21": {
        "unet": {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
                 "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
                 "center_input_sample": False, "cross_attention_dim": 1024, "down_block_types": _DOWN,
                 "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
                 "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
                 "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
                 "sample_size": 96, "up_block_types": _UP, "use_linear_projection": True,
                 "upcast_attention": True},
        "vae": {"_class_name": "AutoencoderKL", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
                "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                "out_channels": 3, "sample_size": 768, "up_block_types": ["UpDecoderBlock2D"] * 4},
        "scheduler": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", **_BETAS, "clip_sample": False,
                      "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
                      "steps_offset": 1, "trained_betas": None},
        "text_encoder": {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
                         "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024,
                         "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
                         "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
                         "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
                         "projection_dim": 512, "torch_dtype": "float32", "vocab_size": 49408},
        "pad_token": "!",
        # 40/80/160 channels over 5/10/20 heads: 8 channels per head; GroupNorm groups narrowed to 8 with them
        "narrow": {"unet": {"block_out_channels": [40, 80, 160, 160], "norm_num_groups": 8},
                   "vae": {"block_out_channels": [32, 64, 64, 64]},
                   "text_encoder": {"num_hidden_layers": 2}},
    },
}


def narrowed(kind: str, part: str) -> dict:
    """The hub config of `part` with the layout's narrowed widths."""
    layout = LAYOUTS[kind]
    return {**layout[part], **layout["narrow"].get(part, {})}


def _public(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def save_folder(kind: str, folder: Path, seed: int = 0) -> Path:
    """(a) A diffusers folder of the narrowed layout with fixed-seed random weights."""
    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_public(narrowed(kind, "unet")))
        vae = AutoencoderKL(**_public(narrowed(kind, "vae")))
    for name, module in (("unet", unet), ("vae", vae)):
        module.save_pretrained(folder / name)
        (folder / name / "config.json").write_text(json.dumps(narrowed(kind, name), indent=2))  # as on the hub
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(narrowed(kind, "scheduler"), indent=2))

    tokenizer = load_tokenizer(tiny_tokenizer_folder(folder / "tokenizer", pad_token=LAYOUTS[kind]["pad_token"]))
    cfg = narrowed(kind, "text_encoder")
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "projection_dim", "layer_norm_eps")
    encoder = text_model(tokenizer, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                         heads=cfg["num_attention_heads"], intermediate=cfg["intermediate_size"],
                         hidden_act=cfg["hidden_act"], seed=seed + 1, **{k: cfg[k] for k in keep})
    (folder / "text_encoder").mkdir()
    weights = {"text_model." + k.removeprefix("text_model."): v.contiguous()  # the keys transformers 4 wrote
               for k, v in encoder.state_dict().items()}
    save_file(weights, str(folder / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    (folder / "text_encoder" / "config.json").write_text(json.dumps(cfg | {"vocab_size": len(tokenizer)}, indent=2))

    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", LAYOUTS[kind]["scheduler"]["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# ------------------------------------------------------------------------------- (b) diffusers -> CompVis
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_prefixes(cfg: dict) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, CompVis prefix, renames inside) for every UNet module."""
    n, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    out = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
           ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
           ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
           ("mid_block.attentions.0.", "middle_block.1.", {}),
           ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    for i in range(n):
        for j in range(layers):  # input_blocks: conv_in, then per level its layers and a downsampler
            k = 1 + i * (layers + 1) + j
            out += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", _UNET_RESNET),
                    (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", {})]
        out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", {}))
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            out += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", _UNET_RESNET),
                    (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", {})]
        slot = 2 if cfg["up_block_types"][i].startswith("CrossAttn") else 1  # after the resnet (and attention)
        out.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv.", {}))
    return out


def _vae_prefixes(cfg: dict) -> list[tuple[str, str, dict]]:
    n, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    resnet = {"conv_shortcut": "nin_shortcut"}
    out = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        out += [(f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", resnet),
                (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", resnet),
                (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
    for i in range(n):
        for j in range(layers + 1):  # the decoder has one resnet more per level than the encoder
            out += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", resnet),
                    (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", resnet)]
        out += [(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}),
                (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", {})]
    return out


def _convert(state: dict, prefixes: list[tuple[str, str, dict]], root: str) -> dict:
    out = {}
    for key, value in state.items():
        src, dst, renames = max(((s, d, r) for s, d, r in prefixes if key.startswith(s)), key=lambda p: len(p[0]))
        rest = key[len(src):]
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[root + dst + rest] = value
    return out


def _text_to_compvis(state: dict, kind: str, hidden: int) -> dict:
    if kind == "sd15":  # HF-CLIP under cond_stage_model.transformer.text_model.
        return {f"cond_stage_model.transformer.text_model.{k}": v for k, v in state.items()}
    root, out = "cond_stage_model.model.", {}  # OpenCLIP: one in_proj for q, k, v; c_fc/c_proj; ln_1/ln_2
    out[root + "token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    out[root + "positional_embedding"] = state["embeddings.position_embedding.weight"]
    out[root + "ln_final.weight"] = state["final_layer_norm.weight"]
    out[root + "ln_final.bias"] = state["final_layer_norm.bias"]
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"{root}transformer.resblocks.{i}."
        for kind_ in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind_}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind_}"] for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{kind_}"] = state[src + f"{a}.{kind_}"]
    g = torch.Generator().manual_seed(0)  # parts of the OpenCLIP model SD never uses (diffusers ignores them)
    out[root + "text_projection"] = torch.randn(hidden, hidden, generator=g)
    out[root + "logit_scale"] = torch.tensor(4.6052)
    return out


def to_compvis(folder: Path, kind: str, file: Path) -> Path:
    """(b) The diffusers folder `folder` as one CompVis .safetensors file."""
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    text = {k.removeprefix("text_model."): v for k, v in load_file(str(folder / "text_encoder" /
                                                                        "model.safetensors")).items()}
    state = _convert(unet, _unet_prefixes(narrowed(kind, "unet")), "model.diffusion_model.")
    vae_state = _convert(vae, _vae_prefixes(narrowed(kind, "vae")), "first_stage_model.")
    for key, value in vae_state.items():  # the VAE's attention projections are 1x1 convolutions in CompVis
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            vae_state[key] = value[:, :, None, None]
    state |= vae_state | _text_to_compvis(text, kind, narrowed(kind, "text_encoder")["hidden_size"])
    state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)  # CompVis files carry the DDPM buffers too
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return file


# ------------------------------------------------------------------------------------ (c) the hub cache
def to_hub_cache(folder: Path, hf_home: Path, repo_id: str) -> Path:
    """(c) `folder` as the hub cache holds a download: blobs by content hash, snapshots/<commit>/ of links to
    them, refs/main naming the commit. Returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(str(p.relative_to(folder)) for p in files).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def make_images(folder: Path, n: int, side: int = 48, seed: int = 0) -> Path:
    """`n` random-noise RGB PNGs of side x side (web photos stand-ins)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder
