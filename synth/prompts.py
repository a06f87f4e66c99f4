"""Stage 1 (`d4ir prompts`): train the prompt encoder with MoCo and write one prompt per degraded image.

Training (paper Eq. (3)): for each image of a batch, two random crops of the same degraded image are the
query and its positive key; the negatives are the queue of keys from earlier batches; the key encoder is a
momentum copy of the query encoder. Only random crops are used as augmentation: flips and colour jitter
would alter exactly what the encoder must see (streak direction, haze colour).

Determinism: the encoder init, the queue's start, each epoch's image order and every crop are pure
functions of the seed (and of the step and slot), so a rerun reproduces the weights and the embeddings
exactly on the CPU, and a resumed run continues along the same path as an uninterrupted one.

Outputs in the prompts folder: train.jsonl (one line per step), state.pt (resumable state), and through
`synth.embed.export_prompts` prompt_encoder.safetensors + .json, embeddings.safetensors + index.jsonl.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from d4ir.shards.checks import check_positive_ints, check_rate
from d4ir.shards.errors import StageFailedError
from d4ir.shards.folders import scan_images
from d4ir.shards.images import ImageSkipped, random_windows, read_rgb, to_tensor
from d4ir.shards.io import append_jsonl, state_dict_sha256
from d4ir.shards.layout import LOG_FILE, PROMPT_ENCODER_STEM, STATE_FILE
from d4ir.shards.progress import progress_bar
from d4ir.shards.state import StateError, changed_settings, load_state, restoring, save_state, trim_log
from d4ir.shards.tracking import track_record

from .embed import EncoderTraining, export_prompts, prompt_encoder_info
from .moco import MoCoConfig, MoCoQueue, moco_step
from .prompt_encoder import DEFAULT_PROMPT_TOKENS, PromptEncoder
from .sd_parts import SDParts

log = logging.getLogger(__name__)
# what `checkpoint` writes; a state without it (or with other types) is refused naming the file and the key
STATE_SCHEMA = {"step": int, "args": {"prompt_dim": int}, "query": dict, "key": dict, "queue": dict,
                "optimizer": dict}


@dataclass(frozen=True)
class PromptsConfig:
    """Stage 1's settings (the paper gives the MoCo ones; the rest are this project's defaults).

    Args:
        prompt_tokens: L, tokens per prompt (77 matches SD's text length; see synth/prompt_encoder.py).
        feat_dim: F, width of the contrastive feature.
        widths: channels of the encoder's three residual blocks.
        token_rank: width of the per-token codes before the shared token projection.
        steps: optimizer steps in all (a resumed run continues up to this number).
        batch_size: images per step; fewer usable images than this is an error.
        crop: side of the query/positive crops; images with a shorter side are skipped as too small.
        moco: the contrastive loss (queue size K, temperature tau, key-encoder momentum).
        lr: Adam learning rate (constant, so that a resumed run matches an uninterrupted one).
        prompt_strength: residual gain set after training, as a fraction of the empty-text prompt's median
            token RMS (0: every prompt equals the empty text; see PromptEncoder).
        embed_side: largest central square each image's prompt is computed from.
        checkpoint_every: steps between saved states (one is also written at the end).
        seed: everything random derives from it.
    """

    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    feat_dim: int = 256
    widths: tuple[int, int, int] = (64, 128, 256)
    token_rank: int = 64
    steps: int = 2000
    batch_size: int = 32
    crop: int = 64
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    lr: float = 1e-3
    prompt_strength: float = 0.25
    embed_side: int = 256
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        check_positive_ints(self, ("prompt_tokens", "feat_dim", "token_rank", "steps", "batch_size", "crop",
                                   "embed_side", "checkpoint_every"), owner="PromptsConfig.")
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"PromptsConfig.widths must be three positive ints, got {self.widths}")
        check_rate("lr", self.lr, owner="PromptsConfig.")
        if not self.prompt_strength >= 0:
            raise ValueError(f"PromptsConfig.prompt_strength must be >= 0, got {self.prompt_strength!r}")


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


def _check_width(what: str, found: int, want: int) -> None:
    if found != want:
        raise ValueError(
            f"embedding width mismatch: {what} has D={found}, but the SD model has "
            f"cross_attention_dim={want}; use the matching SD, another run folder or no --resume"
        )


def _batch(paths: list[Path], step: int, config: PromptsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and positive crops [B,3,crop,crop] for `step`: a pure function of (seed, step)."""
    per_epoch = len(paths) // config.batch_size  # whole batches only, so a batch never repeats an image
    epoch, slot0 = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, 0, epoch]).permutation(len(paths))
    queries, keys = [], []
    for slot, i in enumerate(order[slot0 * config.batch_size : (slot0 + 1) * config.batch_size]):
        try:
            img = read_rgb(paths[i], min_side=config.crop)  # [H, W, 3] uint8; only the crops become floats
        except ImageSkipped as err:
            raise StageFailedError(
                f"{paths[i]} became unreadable during training ({err.reason}); restore it and rerun with --resume"
            ) from err
        rng = np.random.default_rng([config.seed, 1, step, slot])
        (t0, l0), (t1, l1) = random_windows(rng, img.shape[0], img.shape[1], config.crop, 2)
        queries.append(to_tensor(img[t0 : t0 + config.crop, l0 : l0 + config.crop]))
        keys.append(to_tensor(img[t1 : t1 + config.crop, l1 : l1 + config.crop]))
    return torch.stack(queries), torch.stack(keys)


def _resolved(paths: list) -> list[str]:
    """Image paths as absolute, resolved strings: the same folder named relatively, absolutely or through a link
    holds the same images, so a resume must not see changed settings."""
    return [str(Path(p).resolve()) for p in paths]


def _resume_args(config: PromptsConfig, dim: int, paths: list[Path], base: torch.Tensor | None) -> dict:
    """What a resumed run must share with the state it resumes (steps and the export settings may change)."""
    args = dataclasses.asdict(config)
    for free in ("steps", "prompt_strength", "embed_side", "checkpoint_every"):
        args.pop(free)
    args["widths"] = list(config.widths)
    return args | {
        "prompt_dim": dim,
        "images": _resolved(paths),
        "base_sha256": None if base is None else state_dict_sha256({"base": base}),
    }


def _warn_about_base(sd: SDParts, base: torch.Tensor | None, tokens: int) -> None:
    """Stage 1 starts from the empty-text prompt; say so loudly when it cannot, or when it is truncated."""
    if base is None:
        msg = (f"SD {sd.model_id!r} has no text encoder: the prompt encoder's base prompt is zeros, not the empty-text "
               "embedding, so a fresh encoder is not SD's unconditional context (see synth/prompt_encoder.py)")
        warnings.warn(msg, stacklevel=4)
        return
    length = int(getattr(getattr(sd, "tokenizer", None), "model_max_length", tokens))
    if tokens < length:
        msg = (f"prompt_tokens={tokens} < the text encoder's {length} tokens: the base prompt is the empty text cut "
               f"to {tokens} tokens, which is not SD's unconditional context (see synth/prompt_encoder.py)")
        warnings.warn(msg, stacklevel=4)


def check_inputs(config: PromptsConfig, *, sd: SDParts) -> torch.Tensor | None:
    """The SD's base prompt checked (the input-check contract: docs/architecture.md): its empty-text prompt
    [1, L, D] in float32 on the CPU, or None (with a warning) when it has no text encoder."""
    base = sd.empty_prompt(num_tokens=config.prompt_tokens)
    _warn_about_base(sd, base, config.prompt_tokens)
    if base is None:
        return None
    base, dim = base.detach().float().cpu(), int(sd.cross_attention_dim)
    if base.ndim != 3 or base.shape[0] != 1 or base.shape[1] != config.prompt_tokens:
        raise ValueError(f"SD empty prompt has shape {tuple(base.shape)}, expected [1, {config.prompt_tokens}, {dim}]")
    _check_width(f"the empty prompt of SD {sd.model_id!r}", int(base.shape[2]), dim)
    return base


def train_prompts(
    degraded_dir: str | Path,
    sd: SDParts,
    out_dir: str | Path,
    config: PromptsConfig = PromptsConfig(),
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> PromptsResult:
    """Stage 1: train the prompt encoder on web degraded images and embed each one.

    Args:
        degraded_dir: folder of web degraded images (searched recursively; unusable files are counted).
        sd: the loaded frozen SD (its cross_attention_dim is D; its empty-text prompt, when it has a text
            encoder, is the encoder's base prompt).
        out_dir: the prompts folder (RUN/prompts).
        config: see `PromptsConfig`.
        resume: continue from out_dir/state.pt when the run's settings match.
        device: torch device for training and embedding.
        progress: show a tqdm bar.
    """
    degraded_dir, out_dir = Path(degraded_dir), Path(out_dir)
    for attr in ("cross_attention_dim", "model_id", "fingerprint", "empty_prompt"):
        if not hasattr(sd, attr):
            raise TypeError(f"sd must be a loaded SD (synth.sd.load_sd); {type(sd).__name__} has no {attr}")
    dim = int(sd.cross_attention_dim)
    base = check_inputs(config, sd=sd)
    state_path, log_path = out_dir / STATE_FILE, out_dir / LOG_FILE
    state = None
    if resume:
        if (out_dir / f"{PROMPT_ENCODER_STEM}.json").exists():
            width = int(prompt_encoder_info(out_dir)["encoder"].get("prompt_dim", dim))
            _check_width(f"the prompt encoder in {out_dir}", width, dim)
        if state_path.exists():
            state = load_state(state_path, schema=STATE_SCHEMA)
            _check_width(f"the state {state_path}", state["args"]["prompt_dim"], dim)

    scan = scan_images(degraded_dir, min_side=config.crop)
    paths, counts = scan.paths, scan.counts()
    log.info("degraded images in %s: %s", degraded_dir, scan.summary())
    if len(paths) < config.batch_size:
        raise ValueError(
            f"{degraded_dir}: {len(paths)} usable degraded images ({scan.summary()}), fewer than one "
            f"batch of {config.batch_size}; add images or lower --batch-size"
        )
    moco = config.moco
    if moco.queue_size > len(paths) - config.batch_size:
        log.warning("queue_size %d > images - batch_size (%d): crops of an image may come back as its own "
                    "negatives", moco.queue_size, len(paths) - config.batch_size)

    args = _resume_args(config, dim, paths, base)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        query_enc = PromptEncoder(
            prompt_dim=dim,
            prompt_tokens=config.prompt_tokens,
            feat_dim=config.feat_dim,
            widths=config.widths,
            token_rank=config.token_rank,
            base_prompt=base,
        )
    key_enc = PromptEncoder(**query_enc.config, base_prompt=base)
    key_enc.load_state_dict(query_enc.state_dict())
    key_enc.requires_grad_(False)
    queue = MoCoQueue(config.feat_dim, moco.queue_size, generator=torch.Generator().manual_seed(config.seed))
    for m in (query_enc, key_enc, queue):
        m.to(device).train()
    optimizer = torch.optim.Adam(query_enc.parameters(), lr=config.lr)

    start = 0
    if state is not None:
        saved = dict(state["args"])
        if isinstance(saved.get("images"), list) and all(isinstance(p, str) for p in saved["images"]):
            saved["images"] = _resolved(saved["images"])  # a state written before paths were resolved
        if changed := changed_settings(saved, args):
            raise StateError(f"cannot resume {state_path}: settings changed ({', '.join(changed)}); "
                             "drop --resume or use another run folder")
        start = state["step"]
        if start < 0:
            raise StateError(f"{state_path}: malformed training state: 'step' is {start}, below 0")
        if start > config.steps:
            raise StateError(f"{state_path} is at step {start}, past steps={config.steps}")
        for key, obj in (("query", query_enc), ("key", key_enc), ("queue", queue), ("optimizer", optimizer)):
            with restoring(state_path, key):
                obj.load_state_dict(state[key])
        trim_log(log_path, "step", start)  # steps logged after the state are redone
        log.info("resuming %s from step %d", out_dir, start)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)

    def checkpoint(step: int) -> None:
        save_state(state_path, {"step": step, "args": args, "query": query_enc.state_dict(),
                                "key": key_enc.state_dict(), "queue": queue.state_dict(),
                                "optimizer": optimizer.state_dict()})

    loss_value = None
    bar = progress_bar(total=config.steps, initial=start, desc="prompts", enabled=progress)
    for step in range(start, config.steps):
        xq, xk = (t.to(device) for t in _batch(paths, step, config))
        loss, q, k, negatives = moco_step(query_enc, key_enc, queue, xq, xk, moco)  # q, k [B, F]; negatives [K, F]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        with torch.no_grad():
            pos = float((q * k).sum(1).mean())
            neg = float((q @ negatives.T).mean()) if len(negatives) else 0.0
        append_jsonl(log_path, {"step": step + 1, "loss": loss_value, "pos_sim": pos, "neg_sim": neg})
        track_record(out_dir, {"loss": loss_value, "pos_sim": pos, "neg_sim": neg, "lr": config.lr}, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            checkpoint(step + 1)
    bar.close()

    # The exported encoder: the query encoder, with the prompt gate opened (see PromptEncoder).
    encoder = query_enc.eval()
    if encoder.has_base:
        encoder.set_prompt_strength(config.prompt_strength)
    training = EncoderTraining(
        crop=config.crop, embed_side=config.embed_side, moco=config.moco, degraded_dir=str(degraded_dir.resolve()),
        num_images=len(paths), round=0, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
        seed=config.seed, base="zeros" if base is None else "empty-text", base_sha256=args["base_sha256"],
        prompt_strength=config.prompt_strength)
    exported = export_prompts(encoder, paths, out_dir, sd, training=training, batch_size=config.batch_size,
                              device=device)
    log.info("wrote %d prompts [%d x %d] to %s", len(paths), config.prompt_tokens, dim, exported.embeddings_path)
    return PromptsResult(
        out_dir=out_dir,
        encoder_path=exported.encoder_path,
        embeddings_path=exported.embeddings_path,
        num_images=len(paths),
        steps=config.steps,
        final_loss=loss_value,
        encoder_sha256=exported.encoder_sha256,
        counts=counts,
        skipped=list(scan.skipped),
    )
