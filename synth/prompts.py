"""Stage 1 (`d4ir prompts`): train the prompt adapter with MoCo and write one prompt per degraded image.

Training (paper Eq. (3)): for each image of a batch, two random crops of the same degraded image are the
query and its positive key; the negatives are the queue of keys from earlier batches; the key encoder is
a momentum copy of the query encoder. Only random crops are used as augmentation: flips and colour jitter
would alter exactly what the encoder must see (streak direction, haze colour).

Determinism: the encoder init, the queue's start, each epoch's image order and every crop are pure
functions of `seed` (and of the step and slot), so a rerun reproduces the weights and the embeddings
exactly on the CPU, and a resumed run continues along the same path as an uninterrupted one.

Outputs in `out_dir`: train.jsonl (one line per step), checkpoint.pt (resumable state, also the key
encoder and queue that stage 3's joint L_cl can start from), encoder.safetensors + encoder.json,
embeddings.safetensors + index.jsonl.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from shards.embeddings import save_embeddings
from shards.images import ImageSkipped, read_rgb, scan_images, to_tensor
from shards.io import (
    append_jsonl,
    atomic_torch_save,
    atomic_write_text,
    load_weights,
    read_jsonl,
    save_weights,
    sha256_file,
    state_dict_sha256,
)

from .adapter import DEFAULT_PROMPT_TOKENS, PromptEncoder
from .moco import MoCoQueue, info_nce, momentum_update

log = logging.getLogger(__name__)

CHECKPOINT_FILE, LOG_FILE, ENCODER_STEM = "checkpoint.pt", "train.jsonl", "encoder"


@dataclass
class PromptsResult:
    out_dir: Path
    encoder_path: Path
    embeddings_path: Path
    num_images: int  # rows of prompt_embeds
    steps: int
    final_loss: float | None  # None when no step ran in this call
    encoder_sha256: str
    counts: dict[str, int] = field(default_factory=dict)  # {"usable": n, reason: n, ...}
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _sd_handle(sd: Any, device: str) -> Any:
    if isinstance(sd, str | Path):
        from .sd import load_sd  # only needed when given a spec; keeps this module light

        sd = load_sd(str(sd), device=device, dtype=torch.float32)
    for attr in ("cross_attention_dim", "model_id", "fingerprint", "empty_prompt"):
        if not hasattr(sd, attr):
            raise TypeError(f"sd must be a spec string or SDParts-like object; {type(sd).__name__} has no {attr}")
    return sd


def _check_width(what: str, found: int, want: int) -> None:
    if found != want:
        raise ValueError(
            f"embedding width mismatch: {what} has D={found}, but the SD model has "
            f"cross_attention_dim={want}; use the matching SD, another out_dir or resume=False"
        )


def _crop_pair(img: torch.Tensor, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random crop x crop windows of one degraded image [3,H,W]."""
    _, h, w = img.shape
    y = rng.integers(0, h - crop + 1, size=2)
    x = rng.integers(0, w - crop + 1, size=2)
    return img[:, y[0] : y[0] + crop, x[0] : x[0] + crop], img[:, y[1] : y[1] + crop, x[1] : x[1] + crop]


def _batch(paths: list[Path], step: int, *, batch_size: int, crop: int, seed: int):
    """Query and positive crops [B,3,crop,crop] for `step`: a pure function of (seed, step)."""
    per_epoch = len(paths) // batch_size  # whole batches only, so a batch never repeats an image
    epoch, slot0 = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 0, epoch]).permutation(len(paths))
    queries, keys = [], []
    for slot, i in enumerate(order[slot0 * batch_size : (slot0 + 1) * batch_size]):
        try:
            img = to_tensor(read_rgb(paths[i], min_side=crop))
        except ImageSkipped as err:
            raise RuntimeError(
                f"{paths[i]} became unreadable during training ({err.reason}); restore it and rerun with resume=True"
            ) from err
        q, k = _crop_pair(img, crop, np.random.default_rng([seed, 1, step, slot]))
        queries.append(q)
        keys.append(k)
    return torch.stack(queries), torch.stack(keys)


def load_checkpoint(out_dir: str | Path) -> dict:
    """The resumable state: step, query/key encoder, queue and optimizer state dicts, and the run's args."""
    return torch.load(Path(out_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


@torch.no_grad()
def _embed(encoder: PromptEncoder, paths: list[Path], *, side: int, batch_size: int, device: str) -> torch.Tensor:
    """One prompt per image from its central square of side min(H, W, side), at native scale.

    No resizing, so rain-streak width or flake size look as they did in the training crops; the encoder
    is fully convolutional and average-pooled, so a window larger than the training crop just averages
    more of the image. Images are grouped by window size and run in batches (eval mode: BN uses running
    statistics, so a row does not depend on its batch-mates beyond float rounding).
    """
    out = torch.empty(len(paths), encoder.prompt_tokens, encoder.prompt_dim, dtype=torch.float16)
    pending: dict[int, list[tuple[int, torch.Tensor]]] = {}  # window side -> [(row, [3, s, s])]

    def flush(window: int) -> None:
        rows, crops = zip(*pending.pop(window))
        out[list(rows)] = encoder.prompt(torch.stack(crops).to(device)).cpu().half()

    for row, p in enumerate(paths):  # streamed: at most batch_size crops per window side in memory
        img = to_tensor(read_rgb(p, min_side=1))
        _, h, w = img.shape
        s = min(h, w, side)
        top, left = (h - s) // 2, (w - s) // 2
        pending.setdefault(s, []).append((row, img[:, top : top + s, left : left + s]))
        if len(pending[s]) == batch_size:
            flush(s)
    for s in list(pending):
        flush(s)
    return out


def train_prompts(
    degraded_dir: str | Path,
    sd: Any,
    out_dir: str | Path,
    *,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    feat_dim: int = 256,
    widths: tuple[int, int, int] = (64, 128, 256),
    token_rank: int = 64,
    steps: int = 1000,
    batch_size: int = 32,
    crop: int = 64,
    queue_size: int = 1024,
    lr: float = 1e-3,
    tau: float = 0.07,
    momentum: float = 0.999,
    prompt_strength: float = 0.25,
    embed_side: int = 256,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 100,
    device: str = "cpu",
    progress: bool = True,
    min_side: int | None = None,
) -> PromptsResult:
    """Stage 1: train the degradation-aware prompt adapter on web degraded images and embed each one.

    Args:
        degraded_dir: folder of web degraded images (searched recursively; unusable files are counted).
        sd: an SD spec for `synth.sd.load_sd` or an object with cross_attention_dim, model_id, fingerprint
            and empty_prompt(num_tokens) (the base prompt; None when the model has no text encoder).
        out_dir: where the stage-1 files go.
        prompt_tokens, feat_dim, widths, token_rank: PromptEncoder shape (D comes from the SD).
        steps: total optimizer steps (a resumed run continues up to this number).
        batch_size: images per step; fewer usable images than this is an error.
        crop: side of the query/positive crops; images with a shorter side are skipped as too small.
        queue_size: K, negatives kept from earlier batches (best below the number of images, else crops
            of the query's own image come back as negatives).
        lr: Adam learning rate (constant, so that a resumed run matches an uninterrupted one).
        tau, momentum: Eq. (3) temperature and MoCo key-encoder momentum.
        prompt_strength: with a base prompt, the residual gain set after training, as a fraction of the
            base's median token RMS (0: every prompt equals the empty text; see PromptEncoder).
        embed_side: largest central square used to compute each image's prompt.
        seed: everything random derives from it.
        resume: continue from out_dir/checkpoint.pt when the run's settings match.
        checkpoint_every: steps between checkpoints (one is also written at the end).
        device: torch device for training and embedding.
        progress: show a tqdm bar.
        min_side: shortest usable image side (default and floor: `crop`).
    """
    degraded_dir, out_dir = Path(degraded_dir), Path(out_dir)
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("crop", crop),
        ("queue_size", queue_size),
        ("checkpoint_every", checkpoint_every),
        ("embed_side", embed_side),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    sd = _sd_handle(sd, device)
    dim = int(sd.cross_attention_dim)
    base = sd.empty_prompt(num_tokens=prompt_tokens)
    if base is not None:
        base = base.detach().float().cpu()
        if base.ndim != 3 or base.shape[0] != 1 or base.shape[1] != prompt_tokens:
            raise ValueError(f"SD empty prompt has shape {tuple(base.shape)}, expected [1, {prompt_tokens}, {dim}]")
        _check_width(f"the empty prompt of SD {sd.model_id!r}", int(base.shape[2]), dim)
    ckpt_path, log_path = out_dir / CHECKPOINT_FILE, out_dir / LOG_FILE
    ckpt = None
    if resume:
        enc_json = out_dir / f"{ENCODER_STEM}.json"
        if enc_json.exists():
            _, cfg = load_weights(enc_json)
            _check_width(f"the encoder in {enc_json}", int(cfg.get("encoder", {}).get("prompt_dim", dim)), dim)
        if ckpt_path.exists():
            ckpt = load_checkpoint(out_dir)
            _check_width(f"the checkpoint {ckpt_path}", int(ckpt["args"]["prompt_dim"]), dim)

    scan = scan_images(degraded_dir, min_side=max(min_side or crop, crop))
    paths, counts = scan.paths, scan.counts()
    log.info("degraded images in %s: %s", degraded_dir, scan.summary())
    if len(paths) < batch_size:
        raise ValueError(
            f"{degraded_dir}: {len(paths)} usable degraded images ({scan.summary()}), fewer than one "
            f"batch of {batch_size}; add images or lower batch_size"
        )
    if queue_size > len(paths) - batch_size:
        log.warning(
            "queue_size %d > images - batch_size (%d): crops of an image may come back as its own negatives",
            queue_size,
            len(paths) - batch_size,
        )

    args = {
        "prompt_dim": dim,
        "prompt_tokens": prompt_tokens,
        "feat_dim": feat_dim,
        "widths": list(widths),
        "token_rank": token_rank,
        "batch_size": batch_size,
        "crop": crop,
        "queue_size": queue_size,
        "lr": lr,
        "tau": tau,
        "momentum": momentum,
        "seed": seed,
        "images": [str(p) for p in paths],
        "base_sha256": None if base is None else state_dict_sha256({"base": base}),
    }
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        query_enc = PromptEncoder(
            prompt_dim=dim,
            prompt_tokens=prompt_tokens,
            feat_dim=feat_dim,
            widths=widths,
            token_rank=token_rank,
            base_prompt=base,
        )
    key_enc = PromptEncoder(**query_enc.config, base_prompt=base)
    key_enc.load_state_dict(query_enc.state_dict())
    key_enc.requires_grad_(False)
    queue = MoCoQueue(feat_dim, queue_size, generator=torch.Generator().manual_seed(seed))
    for m in (query_enc, key_enc, queue):
        m.to(device).train()
    optimizer = torch.optim.Adam(query_enc.parameters(), lr=lr)

    start = 0
    if ckpt is not None:
        changed = sorted(k for k in args if ckpt["args"].get(k) != args[k])
        if changed:
            raise ValueError(
                f"cannot resume {ckpt_path}: settings changed ({', '.join(changed)}); "
                "use resume=False or another out_dir"
            )
        start = int(ckpt["step"])
        if start > steps:
            raise ValueError(f"{ckpt_path} is at step {start}, past steps={steps}")
        query_enc.load_state_dict(ckpt["query"])
        key_enc.load_state_dict(ckpt["key"])
        queue.load_state_dict(ckpt["queue"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # Steps logged after the checkpoint are redone: keep the log equal to an uninterrupted run's.
        kept = [r for r in read_jsonl(log_path) if r.get("step", 0) <= start]
        atomic_write_text(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        log.info("resuming %s from step %d", out_dir, start)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)

    def checkpoint(step: int) -> None:
        atomic_torch_save(
            ckpt_path,
            {
                "step": step,
                "args": args,
                "query": query_enc.state_dict(),
                "key": key_enc.state_dict(),
                "queue": queue.state_dict(),
                "optimizer": optimizer.state_dict(),
            },
        )

    loss_value = None
    bar = tqdm(total=steps, initial=start, desc="prompts", disable=not progress)
    for step in range(start, steps):
        xq, xk = (t.to(device) for t in _batch(paths, step, batch_size=batch_size, crop=crop, seed=seed))
        q = query_enc.features(xq)  # [B, F]
        with torch.no_grad():
            momentum_update(query_enc, key_enc, momentum)
            k = key_enc.features(xk)  # [B, F]
        negatives = queue.keys()  # [K, F], keys of earlier batches
        loss = info_nce(q, k, negatives, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        queue.enqueue(k)
        loss_value = float(loss.detach())
        with torch.no_grad():
            pos = float((q * k).sum(1).mean())
            neg = float((q @ negatives.T).mean()) if len(negatives) else 0.0
        append_jsonl(log_path, {"step": step + 1, "loss": loss_value, "pos_sim": pos, "neg_sim": neg})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
    bar.close()

    # The exported encoder: the query encoder, with the prompt gate opened (see PromptEncoder).
    encoder = query_enc.eval()
    if encoder.has_base:
        encoder.set_prompt_strength(prompt_strength)
    training = {k: v for k, v in args.items() if k != "images"} | {
        "steps": steps,
        "prompt_strength": prompt_strength,
        "embed_side": embed_side,
        "num_images": len(paths),
        "degraded_dir": str(degraded_dir),
    }
    enc_path, emb_path, enc_sha = export_prompts(
        encoder, paths, out_dir, sd, training=training, embed_side=embed_side, batch_size=batch_size, device=device
    )
    log.info("wrote %d prompts [%d x %d] to %s", len(paths), prompt_tokens, dim, emb_path)
    return PromptsResult(
        out_dir=out_dir,
        encoder_path=enc_path,
        embeddings_path=emb_path,
        num_images=len(paths),
        steps=steps,
        final_loss=loss_value,
        encoder_sha256=enc_sha,
        counts=counts,
        skipped=list(scan.skipped),
    )


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
) -> tuple[Path, Path, str]:
    """Write encoder.safetensors/.json, embeddings.safetensors and index.jsonl for `encoder` into `out_dir`.

    Stage 1 calls it once; stage 3 calls it again for every regeneration round with the KD-updated encoder.
    Returns (encoder path, embeddings path, encoder sha256).
    """
    was_training = encoder.training
    encoder.eval()
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    enc_sha = state_dict_sha256(state)
    sd_info = {"model_id": str(sd.model_id), "fingerprint": str(sd.fingerprint)}
    enc_path = save_weights(
        out_dir / ENCODER_STEM,
        state,
        {"arch": "PromptEncoder", "encoder": encoder.config, "training": training, "sd": sd_info},
        metadata={"sd_model_id": sd_info["model_id"], "sd_fingerprint": sd_info["fingerprint"]},
    )
    prompts = _embed(encoder, paths, side=embed_side, batch_size=batch_size, device=device)  # [N, L, D]
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
    return enc_path, emb_path, enc_sha


def load_prompt_encoder(path: str | Path, device: str = "cpu") -> PromptEncoder:
    """Rebuild the PromptEncoder from a prompts folder or an encoder.safetensors/.json (eval mode)."""
    path = Path(path)
    stem = path / ENCODER_STEM if path.is_dir() else path
    state, cfg = load_weights(stem, device="cpu")
    if cfg.get("arch") != "PromptEncoder" or "encoder" not in cfg:
        raise ValueError(f"{stem}: not a PromptEncoder config (arch={cfg.get('arch')!r})")
    encoder = PromptEncoder(**cfg["encoder"])
    encoder.load_state_dict(state, strict=True)
    return encoder.to(device).eval()
