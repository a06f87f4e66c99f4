"""The stage-1 -> stage-2 contract: one prompt embedding per web degraded image.

`embeddings.safetensors` holds `prompt_embeds` [N, L, D] in fp16 with string metadata (L, D, encoder
sha256, SD id and fingerprint); `index.jsonl` maps row i to its source image path and sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .io import atomic_save_safetensors, atomic_write_text
from .layout import EMBEDDINGS_FILE, INDEX_FILE


@dataclass
class Embeddings:
    prompt_embeds: torch.Tensor  # [N, L, D] fp16
    metadata: dict[str, str]
    index: list[dict]  # row -> {"row", "path", "sha256"}

    @property
    def num_tokens(self) -> int:
        return self.prompt_embeds.shape[1]

    @property
    def dim(self) -> int:
        return self.prompt_embeds.shape[2]


def save_embeddings(
    out_dir: str | Path, prompt_embeds: torch.Tensor, sources: list[dict], metadata: dict
) -> Path:
    """Write embeddings.safetensors (fp16) and index.jsonl; `sources[i]` needs "path" and "sha256"."""
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be [N, L, D], got shape {tuple(prompt_embeds.shape)}")
    if len(sources) != prompt_embeds.shape[0]:
        raise ValueError(f"{len(sources)} sources for {prompt_embeds.shape[0]} embeddings")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, length, dim = prompt_embeds.shape
    meta = {k: str(v) for k, v in metadata.items()} | {"L": str(length), "D": str(dim), "N": str(n)}
    path = out_dir / EMBEDDINGS_FILE
    atomic_save_safetensors(
        path, {"prompt_embeds": prompt_embeds.detach().to("cpu", torch.float16).contiguous()}, meta
    )
    lines = [
        json.dumps({"row": i, "path": str(s["path"]), "sha256": s["sha256"]}) for i, s in enumerate(sources)
    ]
    atomic_write_text(out_dir / INDEX_FILE, "\n".join(lines) + "\n")
    return path


def load_embeddings(path: str | Path) -> Embeddings:
    """Read a prompts folder (or its embeddings.safetensors) back; a missing file is a clear error."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = folder / EMBEDDINGS_FILE
    if not file.exists():
        raise FileNotFoundError(f"no {EMBEDDINGS_FILE} in {folder}: run `d4ir prompts` first")
    with safe_open(str(file), framework="pt") as f:
        meta = dict(f.metadata() or {})
        embeds = f.get_tensor("prompt_embeds")
    index_file = folder / INDEX_FILE
    index = []
    if index_file.exists():
        index = [json.loads(x) for x in index_file.read_text().splitlines() if x.strip()]
    return Embeddings(embeds, meta, index)
