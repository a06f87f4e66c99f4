"""Stage 1's outputs from a prompt encoder: its weights, and one prompt per web degraded image.

Stage 1 writes them once (RUN/prompts); stage 3 writes them again for every regeneration round with the
KD-updated encoder. Each image's prompt comes from its central square of side min(H, W, embed_side) at
native scale: no resizing, so rain-streak width or flake size look as they did in the training crops (the
encoder is fully convolutional and average-pooled, so a window larger than the training crop just averages
more of the image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from d4ir.shards.embeddings import save_embeddings
from d4ir.shards.images import read_rgb, to_tensor
from d4ir.shards.io import load_weights, save_weights, sha256_file, state_dict_sha256
from d4ir.shards.layout import PROMPT_ENCODER_STEM, weights_file
from d4ir.shards.records import need

from .moco import MoCoConfig
from .prompt_encoder import PromptEncoder

# Version of prompt_encoder.json's "training" record; a record without one was written before it was typed
# (stage 1's then also held the encoder's architecture, a regeneration round's only crop, embed_side, moco,
# degraded_dir and round): both read.
ENCODER_TRAINING_FORMAT = 1
_OPTIONAL_INT, _OPTIONAL_NUMBER, _OPTIONAL_STR = (int, type(None)), (int, float, type(None)), (str, type(None))


@dataclass(frozen=True)
class EncoderTraining:
    """How a prompt encoder was trained: prompt_encoder.json's "training", and the settings stage 3 reuses.

    Stage 1 writes it for round 0; each regeneration round of stage 3 writes stage 1's record with its own round,
    degraded folder and image count (`FeedbackLoop.record`: the encoder trained further by the joint phase with
    the same crop, MoCo settings and embedding rule). The encoder's architecture is not repeated here: it is the
    file's "encoder".

    Args:
        crop: side of the contrastive crops (stage 1's MoCo and the joint phase's L_cl).
        embed_side: largest central square a prompt is computed from (synth.embed).
        moco: the contrastive loss's settings.
        degraded_dir: the web degraded folder (absolute) the prompts were computed from.
        num_images: the images of it that were used (None in records of rounds written before it was kept).
        round: 0 for stage 1, N for a student's regeneration round N.
        steps, batch_size, lr, seed: stage 1's optimisation; base: "empty-text" or "zeros", the prompt the
            encoder's residual adds to, base_sha256 its hash; prompt_strength: the residual gain stage 1 set
            (all None in records of regeneration rounds written before stage 1's record was carried into them).
    """

    crop: int
    embed_side: int
    moco: MoCoConfig
    degraded_dir: str
    num_images: int | None = None
    round: int = 0
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    base: str | None = None
    base_sha256: str | None = None
    prompt_strength: float | None = None
    format_version: int = ENCODER_TRAINING_FORMAT

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"moco": asdict(self.moco)}

    @classmethod
    def from_json(cls, d: Any, where: str | Path) -> EncoderTraining:
        """The record of file `where`; another format version, or a missing or ill-typed field, is one ValueError
        naming the file and the field."""
        where = str(where)
        if not isinstance(d, dict):
            raise ValueError(f"{where}: the training record must be a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version is not None and (version != ENCODER_TRAINING_FORMAT or isinstance(version, bool)):
            raise ValueError(f"{where}: a training record of format version {version!r}; this d4ir reads version "
                             f"{ENCODER_TRAINING_FORMAT}: run `d4ir prompts` again")
        moco = need(d, "moco", dict, where)
        try:
            moco = MoCoConfig(**moco)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: field 'moco' is not a MoCo config ({err})") from err
        return cls(crop=need(d, "crop", int, where), embed_side=need(d, "embed_side", int, where), moco=moco,
                   degraded_dir=need(d, "degraded_dir", str, where),
                   num_images=need(d, "num_images", _OPTIONAL_INT, where),
                   round=need(d, "round", int, where) if "round" in d else 0,  # stage 1's record had none
                   steps=need(d, "steps", _OPTIONAL_INT, where),
                   batch_size=need(d, "batch_size", _OPTIONAL_INT, where),
                   lr=need(d, "lr", _OPTIONAL_NUMBER, where), seed=need(d, "seed", _OPTIONAL_INT, where),
                   base=need(d, "base", _OPTIONAL_STR, where), base_sha256=need(d, "base_sha256", _OPTIONAL_STR, where),
                   prompt_strength=need(d, "prompt_strength", _OPTIONAL_NUMBER, where))

    @classmethod
    def read(cls, path: str | Path) -> EncoderTraining:
        """The training record of the prompt encoder at `path` (a prompts folder or its file)."""
        file = prompt_encoder_file(path).with_suffix(".json")
        info = prompt_encoder_info(path)
        if "training" not in info:
            raise ValueError(f"{file} has no training record (not written by `d4ir prompts`): run it again")
        return cls.from_json(info["training"], file)


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
    training: EncoderTraining,
    batch_size: int = 32,
    device: str = "cpu",
) -> ExportedPrompts:
    """Write prompt_encoder.safetensors/.json, embeddings.safetensors and index.jsonl into `out_dir`.

    Args:
        encoder: the prompt encoder (put in eval mode for the export, its mode restored afterwards).
        paths: the web degraded images, one prompt each (row i is paths[i]).
        out_dir: a prompts folder (RUN/prompts, or a student's round folder).
        sd: the loaded SD the prompts condition (`model_id` and `fingerprint` are recorded).
        training: how the encoder was trained (recorded in prompt_encoder.json; its embed_side is the largest
            central square each prompt is computed from).
    """
    was_training = encoder.training
    encoder.eval()
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    enc_sha = state_dict_sha256(state)
    sd_info = {"model_id": str(sd.model_id), "fingerprint": str(sd.fingerprint)}
    enc_path = save_weights(
        Path(out_dir) / PROMPT_ENCODER_STEM,
        state,
        encoder_record(encoder, training) | {"sd": sd_info},
        metadata={"sd_model_id": sd_info["model_id"], "sd_fingerprint": sd_info["fingerprint"]},
    )
    prompts = embed_images(encoder, paths, side=training.embed_side, batch_size=batch_size, device=device)  # [N, L, D]
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
            "prompt_strength": "" if training.prompt_strength is None else training.prompt_strength,
            "embed_rule": f"central square min(H, W, {training.embed_side}), native scale",
        },
    )
    encoder.train(was_training)
    return ExportedPrompts(enc_path, emb_path, enc_sha)


def encoder_record(encoder: PromptEncoder, training: EncoderTraining) -> dict[str, Any]:
    """The JSON saved beside a prompt encoder's weights (its architecture and training record): what
    `load_prompt_encoder` rebuilds it from and `EncoderTraining.read` reads."""
    return {"arch": "PromptEncoder", "encoder": encoder.config, "training": training.to_json()}


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
