"""Stage 1's outputs from a prompt encoder: its weights, and one prompt per web degraded image.

Stage 1 writes them once (RUN/prompts); stage 3 writes them again for every regeneration round with the
KD-updated encoder. Each image's prompt comes from its central square of side min(H, W, embed_side) at
native scale: no resizing, so rain-streak width or flake size look as they did in the training crops (the
encoder is fully convolutional and average-pooled, so a window larger than the training crop just averages
more of the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from d4ir.shards.embeddings import save_embeddings
from d4ir.shards.images import read_rgb, to_tensor
from d4ir.shards.io import load_weights, save_weights, sha256_file, state_dict_sha256
from d4ir.shards.layout import PROMPT_ENCODER_STEM, weights_file

from .prompt_encoder import PromptEncoder


@dataclass(frozen=True)
class ExportedPrompts:
    encoder_path: Path  # prompt_encoder.safetensors
    embeddings_path: Path  # embeddings.safetensors
    encoder_sha256: str


@torch.no_grad()
def embed_images(
    encoder: PromptEncoder, paths: list[Path], *, side: int, batch_size: int, device: str
) -> torch.Tensor:
    """Prompts [N, L, D] fp16 of the images at `paths`, from their central squares (module docstring).

    Images are grouped by window size and run in batches in eval mode (BatchNorm uses running statistics, so
    a row does not depend on its batch-mates beyond float rounding); at most batch_size crops per window
    side are held in memory.
    """
    out = torch.empty(len(paths), encoder.prompt_tokens, encoder.prompt_dim, dtype=torch.float16)
    pending: dict[int, list[tuple[int, torch.Tensor]]] = {}  # window side -> [(row, [3, s, s])]

    def flush(window: int) -> None:
        rows, crops = zip(*pending.pop(window))
        out[list(rows)] = encoder.prompt(torch.stack(crops).to(device)).cpu().half()

    for row, p in enumerate(paths):
        img = read_rgb(p, min_side=1)  # [H, W, 3] uint8: cropped before conversion, so a pending crop holds
        h, w = img.shape[:2]  # only its own s x s floats, never the whole image
        s = min(h, w, side)
        top, left = (h - s) // 2, (w - s) // 2
        pending.setdefault(s, []).append((row, to_tensor(img[top : top + s, left : left + s])))
        if len(pending[s]) == batch_size:
            flush(s)
    for s in list(pending):
        flush(s)
    return out


def export_prompts(
    encoder: PromptEncoder,
    paths: list[Path],
    out_dir: Path,
    sd: Any,
    *,
    training: dict,
    embed_side: int,
    batch_size: int = 32,
    device: str = "cpu",
) -> ExportedPrompts:
    """Write prompt_encoder.safetensors/.json, embeddings.safetensors and index.jsonl into `out_dir`.

    Args:
        encoder: the prompt encoder (put in eval mode for the export, its mode restored afterwards).
        paths: the web degraded images, one prompt each (row i is paths[i]).
        out_dir: a prompts folder (RUN/prompts, or a student's round folder).
        sd: the loaded SD the prompts condition (`model_id` and `fingerprint` are recorded).
        training: how the encoder was trained (recorded in prompt_encoder.json).
        embed_side: largest central square each prompt is computed from.
    """
    was_training = encoder.training
    encoder.eval()
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    enc_sha = state_dict_sha256(state)
    sd_info = {"model_id": str(sd.model_id), "fingerprint": str(sd.fingerprint)}
    enc_path = save_weights(
        Path(out_dir) / PROMPT_ENCODER_STEM,
        state,
        {"arch": "PromptEncoder", "encoder": encoder.config, "training": training, "sd": sd_info},
        metadata={"sd_model_id": sd_info["model_id"], "sd_fingerprint": sd_info["fingerprint"]},
    )
    prompts = embed_images(encoder, paths, side=embed_side, batch_size=batch_size, device=device)  # [N, L, D]
    sources = [{"path": str(p), "sha256": sha256_file(p)} for p in paths]
    emb_path = save_embeddings(
        out_dir,
        prompts,
        sources,
        {
            "L": encoder.prompt_tokens,
            "D": encoder.prompt_dim,
            "encoder_sha256": enc_sha,
            "sd_model_id": sd_info["model_id"],
            "sd_fingerprint": sd_info["fingerprint"],
            "prompt_strength": training.get("prompt_strength", ""),
            "embed_rule": f"central square min(H, W, {embed_side}), native scale",
        },
    )
    encoder.train(was_training)
    return ExportedPrompts(enc_path, emb_path, enc_sha)


def prompt_encoder_file(path: str | Path) -> Path:
    """The prompt encoder's .safetensors meant by `path` (a prompts folder or the file); clear error if absent."""
    file = weights_file(path, PROMPT_ENCODER_STEM)
    if not file.is_file():
        raise FileNotFoundError(f"no prompt encoder at {file}: run `d4ir prompts` first")
    return file


def prompt_encoder_info(path: str | Path) -> dict:
    """The JSON beside the prompt encoder's weights: {"arch", "encoder", "training", "sd", "sha256"}."""
    _, cfg = load_weights(prompt_encoder_file(path))
    if cfg.get("arch") != "PromptEncoder" or "encoder" not in cfg:
        raise ValueError(f"{path}: not a PromptEncoder config (arch={cfg.get('arch')!r})")
    return cfg


def load_prompt_encoder(path: str | Path, device: str = "cpu") -> PromptEncoder:
    """Rebuild the PromptEncoder from a prompts folder or its .safetensors/.json (eval mode)."""
    state, cfg = load_weights(prompt_encoder_file(path), device="cpu")
    if cfg.get("arch") != "PromptEncoder" or "encoder" not in cfg:
        raise ValueError(f"{path}: not a PromptEncoder config (arch={cfg.get('arch')!r})")
    encoder = PromptEncoder(**cfg["encoder"])
    encoder.load_state_dict(state, strict=True)
    return encoder.to(device).eval()
